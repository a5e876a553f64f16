"""Request bodies -> what the routes use: the pydantic models of schema.py validate each
field; this module adds the checks that span fields and builds SamplingParams.

Every check raises `APIError` (400) naming the offending parameter. Token ids are checked
against the vocabulary later, by the backend, which knows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    json_mode: bool = False


@dataclass
class ChatRequest(OpenAIRequest):
    messages: list[dict] = field(default_factory=list)   # role/content strings, templates' form
    tools: list | None = None


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
    fmt = b.response_format.type if b.response_format else "text"
    return dict(params=params, model=b.model, n=_or(b.n, 1), stream=stream,
                include_usage=stream and bool(b.stream_options and b.stream_options.include_usage),
                json_mode=fmt != "text")   # a json_schema is served as json_object: valid JSON, schema not enforced


def parse_chat(body: dict) -> ChatRequest:
    b = S.validate(S.ChatCompletionRequest, body)
    max_tokens = _or(b.max_completion_tokens, b.max_tokens)
    top = _or(b.top_logprobs, 0)
    if top and not b.logprobs:
        raise invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    return ChatRequest(**_openai_common(b, max_tokens, logprobs=bool(b.logprobs), top_logprobs=top),
                       messages=[_message(m, i) for i, m in enumerate(b.messages)], tools=b.tools or None)


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
        msg["tool_calls"] = m.tool_calls
    return msg


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
    json_mode: bool = False
    num_ctx: int | None = None


@dataclass
class OllamaGenerate(OllamaRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    context: list[int] | None = None


@dataclass
class OllamaChat(OllamaRequest):
    messages: list[dict] = field(default_factory=list)
    tools: list | None = None


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
    return dict(params=params, model=b.model, stream=_or(b.stream, True), json_mode=bool(b.format),
                num_ctx=o.num_ctx)


def _no_images(v, where: str) -> None:
    if v:
        raise invalid(f"'{where}': this model does not accept images", where)


def parse_ollama_generate(body: dict) -> OllamaGenerate:
    b = S.validate(S.OllamaGenerateRequest, body)
    _no_images(b.images, "images")
    return OllamaGenerate(**_ollama_common(b), prompt=b.prompt or "", system=b.system, raw=bool(b.raw),
                          context=b.context or None)


def parse_ollama_chat(body: dict) -> OllamaChat:
    b = S.validate(S.OllamaChatRequest, body)
    out = []
    for i, m in enumerate(b.messages or []):
        _no_images(m.images, f"messages[{i}].images")
        msg = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        out.append(msg)
    return OllamaChat(**_ollama_common(b), messages=out, tools=b.tools or None)


def parse_ollama_show(body: dict) -> str | None:
    b = S.validate(S.OllamaShowRequest, body)
    return b.model or b.name
