"""The OpenAPI 3.1 document served at /openapi.json: request bodies from the pydantic
models of schema.py (the same ones that validate), responses as the routes shape them."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from .. import __version__
from . import anthropic_schema as A
from . import schema as S

_REF = "#/components/schemas/{model}"


def _obj(required: list[str], **props) -> dict:
    """An object with at least these properties (more may come, as the APIs add fields)."""
    return {"type": "object", "required": required, "properties": props}


_STR, _INT, _BOOL, _ANY = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {}
_NUM = {"type": "number"}
_FINISH = {"type": ["string", "null"]}
_USAGE = _obj(["prompt_tokens", "completion_tokens", "total_tokens"], prompt_tokens=_INT,
              completion_tokens=_INT, total_tokens=_INT,
              prompt_tokens_details=_obj(["cached_tokens"], cached_tokens=_INT))

_TOOL_CALLS = {"type": "array", "items": _obj(["id", "type", "function"], id=_STR, type={"const": "function"},
                                              function=_obj(["name", "arguments"], name=_STR, arguments=_STR))}

RESPONSES = {
    "OpenAIError": _obj(["error"], error=_obj(["message", "type", "param", "code"], message=_STR, type=_STR,
                                              param={"type": ["string", "null"]},
                                              code={"type": ["string", "null"]})),
    "OllamaError": _obj(["error"], error=_STR),
    "ChatCompletion": _obj(["id", "object", "created", "model", "choices", "usage"], id=_STR, object=_STR,
                           created=_INT, model=_STR, usage=_USAGE,
                           choices={"type": "array", "items": _obj(
                               ["index", "message", "finish_reason"], index=_INT, finish_reason=_FINISH,
                               message=_obj(["role", "content"], role=_STR, content={"type": ["string", "null"]},
                                            reasoning_content=_STR, tool_calls=_TOOL_CALLS))}),
    "Completion": _obj(["id", "object", "created", "model", "choices", "usage"], id=_STR, object=_STR,
                       created=_INT, model=_STR, usage=_USAGE,
                       choices={"type": "array", "items": _obj(["index", "text", "finish_reason"], index=_INT,
                                                               text=_STR, finish_reason=_FINISH)}),
    "Model": _obj(["id", "object", "created", "owned_by"], id=_STR, object=_STR, created=_INT, owned_by=_STR),
    "ModelList": _obj(["object", "data"], object=_STR,
                      data={"type": "array", "items": {"$ref": "#/components/schemas/Model"}}),
    "OllamaGenerateResponse": _obj(["model", "created_at", "response", "done"], model=_STR, created_at=_STR,
                                   response=_STR, thinking=_STR, done=_BOOL, done_reason=_STR),
    "OllamaChatResponse": _obj(["model", "created_at", "message", "done"], model=_STR, created_at=_STR,
                               message=_obj(["role", "content"], role=_STR, content=_STR, thinking=_STR,
                                            tool_calls={"type": "array", "items": _obj(["function"], function=_obj(
                                                ["name", "arguments"], name=_STR, arguments={"type": "object"}))}),
                               done=_BOOL),
    "OllamaModels": _obj(["models"], models={"type": "array", "items": _obj(["name", "model"], name=_STR,
                                                                           model=_STR)}),
    "OllamaShowResponse": _obj(["modelfile", "parameters", "template", "details", "model_info"], modelfile=_STR,
                               parameters=_STR, template=_STR, details={"type": "object"},
                               model_info={"type": "object"}),
    "AnthropicError": _obj(["type", "error"], type={"const": "error"},
                           error=_obj(["type", "message"], type=_STR, message=_STR)),
    "MessageResponse": _obj(["id", "type", "role", "model", "content", "stop_reason", "usage"], id=_STR,
                             type={"const": "message"}, role={"const": "assistant"}, model=_STR,
                             content={"type": "array", "items": _obj(["type"], type={
                                 "enum": ["text", "tool_use"]}, text=_STR, id=_STR, name=_STR,
                                 input={"type": "object"})},
                             stop_reason={"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
                             stop_sequence={"type": ["string", "null"]},
                             usage=_obj(["input_tokens", "output_tokens"], input_tokens=_INT, output_tokens=_INT,
                                        cache_read_input_tokens=_INT, cache_creation_input_tokens=_INT)),
    "Version": _obj(["version"], version=_STR),
    "Health": _obj(["status"], status={"enum": ["ok", "loading", "draining", "error"]}, model=_STR, error=_STR),
}


def _json(name: str) -> dict:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _errors(ollama: bool, *codes: int, anthropic: bool = False) -> dict:
    what = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or route",
            413: "body too large", 429: "busy: retry after Retry-After seconds",
            500: "internal error (with a request id)", 503: "loading or shutting down: retry after Retry-After"}
    err = _json("OllamaError" if ollama else "AnthropicError" if anthropic else "OpenAIError")
    return {str(c): {"description": what[c], "content": err} for c in codes}


_TEXT = {"text/plain": {"schema": _STR}}


def _op(summary: str, ok: dict, *, body: str | None = None, ollama: bool = False, public: bool = False,
        errors=(401, 500, 503), params=None, anthropic: bool = False) -> dict:
    op = {"summary": summary, "responses": {"200": {"description": "OK", "content": ok}}}
    codes = set(errors) - ({401} if public else set())
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"$ref": _REF.format(
            model=body)}}}}
        codes |= {400, 413}
    op["responses"].update(_errors(ollama, *sorted(codes), anthropic=anthropic))
    if not public:
        op["security"] = [{"bearer": []}, {"apiKey": []}, {}]
    if params:
        op["parameters"] = params
    return op


def document() -> dict:
    models = [S.ChatCompletionRequest, S.CompletionRequest, S.OllamaGenerateRequest, S.OllamaChatRequest,
              S.OllamaShowRequest, A.MessagesRequest]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    schemas = {**defs.get("$defs", {}), **RESPONSES}
    gen = (401, 404, 429, 500, 503)
    # OpenAPI 3.1: an event stream's `schema` describes one event; `data` is a chunk's JSON or [DONE]
    sse = {"text/event-stream": {"schema": _obj(["data"], data=_STR, event=_STR, id=_STR)}}
    ndjson = {"application/x-ndjson": {"schema": _STR}}
    paths = {
        "/v1/chat/completions": {"post": _op("Chat completion (stream: server-sent events)",
                                             {**_json("ChatCompletion"), **sse}, body="ChatCompletionRequest",
                                             errors=gen)},
        "/v1/completions": {"post": _op("Text completion (stream: server-sent events)",
                                        {**_json("Completion"), **sse}, body="CompletionRequest", errors=gen)},
        "/v1/messages": {"post": _op("Anthropic Messages API (stream: Anthropic's server-sent events)",
                                     {**_json("MessageResponse"), **sse}, body="MessagesRequest", errors=gen,
                                     anthropic=True)},
        "/v1/models": {"get": _op("The served model", _json("ModelList"))},
        "/v1/models/{model_id}": {"get": _op("One model", _json("Model"), errors=(401, 404, 500, 503), params=[
            {"name": "model_id", "in": "path", "required": True, "schema": _STR}])},
        "/api/generate": {"post": _op("Ollama generate (stream, the default: NDJSON)",
                                      {**_json("OllamaGenerateResponse"), **ndjson}, body="OllamaGenerateRequest",
                                      ollama=True, errors=gen)},
        "/api/chat": {"post": _op("Ollama chat (stream, the default: NDJSON)",
                                  {**_json("OllamaChatResponse"), **ndjson}, body="OllamaChatRequest",
                                  ollama=True, errors=gen)},
        "/api/show": {"post": _op("Ollama model details", _json("OllamaShowResponse"), body="OllamaShowRequest",
                                  ollama=True, errors=(401, 404, 500, 503))},
        "/api/tags": {"get": _op("Ollama model list", _json("OllamaModels"), ollama=True)},
        "/api/ps": {"get": _op("Ollama running models", _json("OllamaModels"), ollama=True)},
        "/api/version": {"get": _op("Server version", _json("Version"), ollama=True, public=True, errors=(500,))},
        "/health": {"get": _op("Liveness and readiness (503 while loading or draining)", _json("Health"),
                               public=True, errors=())},
        "/metrics": {"get": _op("Prometheus metrics", _TEXT, errors=(401, 500))},
        "/": {"get": _op("Whether the server runs", _TEXT, public=True, errors=(500,))},
    }
    paths["/health"]["get"]["responses"]["503"] = {"description": "loading, draining or failed to load",
                                                   "content": _json("Health")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "hybrid", "version": __version__,
                 "description": "OpenAI-, Anthropic- and Ollama-compatible API of `hybrid serve` (docs/api.md)"},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "only when the server has an API key"},
                                           "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                                                      "description": "the same key, as Anthropic's clients send it"}}},
    }
