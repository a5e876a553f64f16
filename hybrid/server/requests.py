"""Request bodies -> what the routes use: the pydantic models of schema.py validate each
field; this module adds the checks that span fields and builds SamplingParams.

Every check raises `APIError` (400) naming the offending parameter. Token ids are checked
against the vocabulary later, by the backend, which knows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from hybrid.engine.grammar import GrammarError, json_object_grammar, json_schema_grammar
from hybrid.engine.sampling import SamplingParams
from . import schema as S
from .errors import invalid

MAX_CHOICES = S.MAX_CHOICES


def _checked(params: SamplingParams) -> SamplingParams:
    """SamplingParams' own validation as a last guard (the models already enforce it)."""
    try:
        params.validate()
    except ValueError as e:
        raise invalid(str(e)) from None
    return params


def _or(value, default):
    return default if value is None else value


def _stops(v) -> list[str]:
    return [] if v is None else [v] if isinstance(v, str) else list(v)


def _seed(v):
    return None if v is None else v % 2**63


GREEDY_BELOW = 1e-4   # a temperature this small is greedy decoding (dividing by it would overflow)


def _temperature(v, default: float) -> float:
    v = _or(v, default)
    return 0.0 if v < GREEDY_BELOW else v


# ---------------------------------------------------------------- OpenAI

@dataclass
class OpenAIRequest:
    """What /v1/chat/completions and /v1/completions share."""
    params: SamplingParams
    model: str | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    grammar: str | None = None       # compiled (hybrid.engine.grammar): response_format, or tool calls forced


@dataclass
class ChatRequest(OpenAIRequest):
    messages: list[dict] = field(default_factory=list)   # role/content strings, templates' form
    tools: list | None = None                            # OpenAI's form: [{"type": "function", "function": ...}]
    tool_choice: str | None = None                       # None (auto), "none", "required" or a function's name
    parallel_tool_calls: bool = True
    reasoning_format: str = "deepseek"
    template_vars: dict = field(default_factory=dict)     # more chat template variables (reasoning_effort)

    @property
    def forced_call(self) -> str | None:
        """"required", a function's name, or None when the model decides."""
        return None if self.tool_choice in (None, "none") else self.tool_choice


@dataclass
class CompletionRequest(OpenAIRequest):
    prompts: list = field(default_factory=list)         # each a string or a list of token ids
    echo: bool = False
    logprobs: int | None = None                         # legacy: the number of alternatives


def _openai_common(b: S.OpenAISampling, max_tokens: int | None, *, logprobs: bool, top_logprobs: int) -> dict:
    params = _checked(SamplingParams(
        temperature=_temperature(b.temperature, 1.0),
        top_p=_or(b.top_p, 1.0),
        top_k=max(0, _or(b.top_k, 0)),                 # -1 (vLLM's "off") = 0
        min_p=_or(b.min_p, 0.0),
        repetition_penalty=_or(b.repetition_penalty, 1.0),
        presence_penalty=_or(b.presence_penalty, 0.0),
        frequency_penalty=_or(b.frequency_penalty, 0.0),
        logit_bias={int(k): v for k, v in b.logit_bias.items()} if b.logit_bias else None,
        seed=_seed(b.seed),
        max_tokens=max_tokens,
        stop=_stops(b.stop),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    ))
    stream = bool(b.stream)
    return dict(params=params, model=b.model, n=_or(b.n, 1), stream=stream,
                include_usage=stream and bool(b.stream_options and b.stream_options.include_usage),
                grammar=_response_format(b.response_format))


def _response_format(f: S.ResponseFormat | None) -> str | None:
    if f is None or f.type == "text":
        return None
    if f.type == "json_object":
        return json_object_grammar()
    if f.json_schema is None or f.json_schema.schema_ is None:
        raise invalid("'response_format.json_schema.schema' is required with type json_schema",
                      "response_format.json_schema.schema")
    return compiled_schema(f.json_schema.schema_, "response_format.json_schema.schema")


def compiled_schema(schema, param: str) -> str:
    """A JSON schema's grammar, or 400 naming the part of the schema that cannot compile."""
    try:
        return json_schema_grammar(schema)
    except GrammarError as e:
        where = f"{param}.{e.where}" if e.where else param
        raise invalid(f"'{where}': {e}", where, code="invalid_json_schema") from None


def parse_chat(body: dict) -> ChatRequest:
    b = S.validate(S.ChatCompletionRequest, body)
    max_tokens = _or(b.max_completion_tokens, b.max_tokens)
    top = _or(b.top_logprobs, 0)
    if top and not b.logprobs:
        raise invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    tools = [t.model_dump(exclude_none=True) for t in b.tools or []]
    choice = b.tool_choice
    if isinstance(choice, S.ToolChoiceFunction):
        choice = choice.function.name
        if choice not in [t["function"]["name"] for t in tools]:
            raise invalid(f"'tool_choice' names the function {choice!r}, which is not among 'tools' "
                          f"({', '.join(t['function']['name'] for t in tools) or 'none given'})", "tool_choice")
    elif choice == "required" and not tools:
        raise invalid("'tool_choice' required needs 'tools'", "tool_choice")
    return ChatRequest(**_openai_common(b, max_tokens, logprobs=bool(b.logprobs), top_logprobs=top),
                       messages=[_message(m, i) for i, m in enumerate(b.messages)], tools=tools or None,
                       tool_choice=None if choice == "auto" else choice,
                       parallel_tool_calls=_or(b.parallel_tool_calls, True),
                       reasoning_format=_or(b.reasoning_format, "deepseek"),
                       template_vars={"reasoning_effort": b.reasoning_effort} if b.reasoning_effort else {})


def _message(m: S.ChatMessage, i: int) -> dict:
    where = f"messages[{i}]"
    calls = m.role == "assistant" and bool(m.tool_calls)
    msg = {"role": "system" if m.role == "developer" else m.role,
           "content": _content(m.content, f"{where}.content", optional=calls)}
    if m.name is not None:
        msg["name"] = m.name
    if m.role == "tool":
        msg["tool_call_id"] = m.tool_call_id
    if calls:
        msg["tool_calls"] = [template_call(c.id, c.function.name, c.function.arguments,
                                           f"{where}.tool_calls[{j}].function.arguments")
                             for j, c in enumerate(m.tool_calls)]
    if m.role == "assistant" and m.reasoning_content is not None:
        msg["reasoning_content"] = m.reasoning_content
    return msg


def template_call(call_id, name: str, arguments, where: str) -> dict:
    """A call as chat templates read it: arguments as an object (templates write them with
    tojson), under "function" and at the top level (templates differ)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise invalid(f"'{where}' is not valid JSON", where) from None
    if not isinstance(arguments, dict):
        raise invalid(f"'{where}' must be a JSON object", where)
    fn = {"name": name, "arguments": arguments}
    return {"id": call_id, "type": "function", "function": fn, **fn}


def _content(v, where: str, optional: bool) -> str:
    """A string, or an array of text parts (joined with newlines)."""
    if v is None:
        if optional:
            return ""
        raise invalid(f"'{where}' is required", where)
    if isinstance(v, str):
        return v
    texts = []
    for j, part in enumerate(v):
        if part.text is None:
            raise invalid(f"'{where}[{j}].text' is required", f"{where}[{j}].text")
        texts.append(part.text)
    return "\n".join(texts)


def parse_completion(body: dict) -> CompletionRequest:
    b = S.validate(S.CompletionRequest, body)
    if b.suffix:
        raise invalid("'suffix' is not supported", "suffix")
    common = _openai_common(b, _or(b.max_tokens, 16), logprobs=b.logprobs is not None,
                            top_logprobs=b.logprobs or 0)
    if b.best_of is not None and b.best_of != common["n"]:
        raise invalid("'best_of' other than 'n' is not supported", "best_of")
    p = b.prompt
    prompts = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
    if len(prompts) * common["n"] > MAX_CHOICES:
        raise invalid(f"at most {MAX_CHOICES} choices (prompts times n) per request", "n")
    return CompletionRequest(**common, prompts=prompts, echo=bool(b.echo), logprobs=b.logprobs)


# ---------------------------------------------------------------- Ollama

# Ollama's own defaults for the options a client leaves out.
OLLAMA_DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, repeat_penalty=1.1)


@dataclass
class OllamaRequest:
    params: SamplingParams
    model: str | None = None
    stream: bool = True
    grammar: str | None = None       # compiled (hybrid.engine.grammar) from `format`
    num_ctx: int | None = None


@dataclass
class OllamaGenerate(OllamaRequest):
    think: bool | None = None
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    context: list[int] | None = None


@dataclass
class OllamaChat(OllamaRequest):
    messages: list[dict] = field(default_factory=list)
    tools: list | None = None
    think: bool | None = None


def _ollama_common(b: S.OllamaRequest) -> dict:
    o = b.options or S.OllamaOptions()
    d = OLLAMA_DEFAULTS
    if o.num_predict == 0:
        raise invalid("'options.num_predict' must be -1 (no limit), -2 (fill the context) or >= 1",
                      "options.num_predict")
    params = _checked(SamplingParams(
        temperature=_temperature(o.temperature, d["temperature"]),
        top_p=_or(o.top_p, d["top_p"]),
        top_k=_or(o.top_k, d["top_k"]),
        min_p=_or(o.min_p, d["min_p"]),
        repetition_penalty=_or(o.repeat_penalty, d["repeat_penalty"]),
        presence_penalty=_or(o.presence_penalty, 0.0),
        frequency_penalty=_or(o.frequency_penalty, 0.0),
        seed=_seed(o.seed),
        max_tokens=o.num_predict if o.num_predict and o.num_predict > 0 else None,
        stop=_stops(o.stop),
        logprobs=bool(b.logprobs),
        top_logprobs=_or(b.top_logprobs, 0) if b.logprobs else 0,
    ))
    return dict(params=params, model=b.model, stream=_or(b.stream, True), grammar=_ollama_format(b.format),
                num_ctx=o.num_ctx)


def _ollama_format(f) -> str | None:
    if not f:
        return None
    return json_object_grammar() if f == "json" else compiled_schema(f, "format")


def _no_images(v, where: str) -> None:
    if v:
        raise invalid(f"'{where}': this model does not accept images", where)


def parse_ollama_generate(body: dict) -> OllamaGenerate:
    b = S.validate(S.OllamaGenerateRequest, body)
    _no_images(b.images, "images")
    return OllamaGenerate(**_ollama_common(b), think=b.think, prompt=b.prompt or "", system=b.system,
                          raw=bool(b.raw), context=b.context or None)


def parse_ollama_chat(body: dict) -> OllamaChat:
    b = S.validate(S.OllamaChatRequest, body)
    out = []
    for i, m in enumerate(b.messages or []):
        _no_images(m.images, f"messages[{i}].images")
        msg = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            msg["tool_calls"] = [template_call(None, c.function.name, c.function.arguments,
                                               f"messages[{i}].tool_calls[{j}].function.arguments")
                                 for j, c in enumerate(m.tool_calls)]
        if m.thinking is not None:
            msg["reasoning_content"] = m.thinking
        if m.tool_name is not None:
            msg["name"] = m.tool_name
        out.append(msg)
    tools = [t.model_dump(exclude_none=True) for t in b.tools or []]
    return OllamaChat(**_ollama_common(b), messages=out, tools=tools or None, think=b.think)


def parse_ollama_show(body: dict) -> str | None:
    b = S.validate(S.OllamaShowRequest, body)
    return b.model or b.name
