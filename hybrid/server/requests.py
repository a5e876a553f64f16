"""Request bodies: JSON objects -> dataclasses, validated before anything reaches the engine.

Every check raises `APIError` (400) naming the offending parameter. Unknown fields are
ignored, as the OpenAI and Ollama APIs do. Token ids are checked against the vocabulary
later, by the backend, which knows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..sampling import SamplingParams
from .errors import invalid

ROLES = ("system", "developer", "user", "assistant", "tool")
OLLAMA_ROLES = ("system", "user", "assistant", "tool")
MAX_CHOICES = 16     # n, times the number of prompts for /v1/completions
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20


# ---------------------------------------------------------------- typed field reads

class Fields:
    """Typed reads of one JSON object. A missing key or null gives the default."""

    def __init__(self, body, where: str = ""):
        if not isinstance(body, dict):
            raise invalid(f"{where or 'the request body'} must be a JSON object", where or None)
        self.body, self.where = body, where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def raw(self, key: str):
        return self.body.get(key)

    def number(self, key, default=None, lo=None, hi=None, lo_open=False):
        v = self.body.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise invalid(f"'{self.name(key)}' must be a number, got {v!r}", self.name(key))
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            lo_s = "-inf" if lo is None else lo
            hi_s = "inf" if hi is None else hi
            bracket = "(" if lo_open or lo is None else "["
            raise invalid(f"'{self.name(key)}' must be in {bracket}{lo_s}, {hi_s}], got {v}", self.name(key))
        return float(v)

    def integer(self, key, default=None, lo=None, hi=None):
        v = self.body.get(key)
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise invalid(f"'{self.name(key)}' must be an integer, got {v!r}", self.name(key))
        if lo is not None and v < lo:
            raise invalid(f"'{self.name(key)}' must be >= {lo}, got {v}", self.name(key))
        if hi is not None and v > hi:
            raise invalid(f"'{self.name(key)}' must be <= {hi}, got {v}", self.name(key))
        return v

    def boolean(self, key, default=False):
        v = self.body.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise invalid(f"'{self.name(key)}' must be a boolean, got {v!r}", self.name(key))
        return v

    def string(self, key, default=None):
        v = self.body.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise invalid(f"'{self.name(key)}' must be a string, got {type(v).__name__}", self.name(key))
        return v

    def object(self, key) -> "Fields":
        return Fields(self.body.get(key) or {}, self.name(key))

    def stop(self, key="stop") -> list[str]:
        v = self.body.get(key)
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise invalid(f"'{self.name(key)}' must be a string or a list of strings", self.name(key))
        if len(stops) > MAX_STOP:
            raise invalid(f"'{self.name(key)}' takes at most {MAX_STOP} sequences, got {len(stops)}", self.name(key))
        if any(not s for s in stops):
            raise invalid(f"'{self.name(key)}' sequences must not be empty", self.name(key))
        return list(stops)


def _checked(params: SamplingParams) -> SamplingParams:
    """SamplingParams' own validation as a last guard (the reads above already enforce it)."""
    try:
        params.validate()
    except ValueError as e:
        raise invalid(str(e)) from None
    return params


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


def _openai_common(f: Fields, max_tokens: int | None, *, logprobs: bool, top_logprobs: int) -> dict:
    seed = f.integer("seed", None, -(2**63), 2**64 - 1)
    params = _checked(SamplingParams(
        temperature=f.number("temperature", 1.0, 0, 2),
        top_p=f.number("top_p", 1.0, 0, 1, lo_open=True),
        top_k=max(0, f.integer("top_k", 0, -1)),               # -1 (vLLM's "off") = 0
        min_p=f.number("min_p", 0.0, 0, 1),
        repetition_penalty=f.number("repetition_penalty", 1.0, 0, None, lo_open=True),
        presence_penalty=f.number("presence_penalty", 0.0, -2, 2),
        frequency_penalty=f.number("frequency_penalty", 0.0, -2, 2),
        logit_bias=_logit_bias(f),
        seed=None if seed is None else seed % 2**63,
        max_tokens=max_tokens,
        stop=f.stop(),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    ))
    stream = f.boolean("stream")
    return dict(params=params, model=f.string("model"), n=f.integer("n", 1, 1, MAX_CHOICES), stream=stream,
                include_usage=stream and f.object("stream_options").boolean("include_usage"),
                json_mode=_response_format(f))


def _logit_bias(f: Fields) -> dict[int, float] | None:
    v = f.raw("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise invalid("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    out = {}
    for key in v:
        try:
            tok = int(key)
        except ValueError:
            raise invalid(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias") from None
        if tok < 0:
            raise invalid(f"'logit_bias' keys must be token ids >= 0, got {key!r}", "logit_bias")
        out[tok] = Fields(v, "logit_bias").number(key, lo=-100, hi=100)
    return out


def _response_format(f: Fields) -> bool:
    fmt = f.object("response_format")
    kind = fmt.string("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise invalid(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                      "response_format.type")
    return kind != "text"   # a json_schema is served as json_object: valid JSON, schema not enforced


def parse_chat(body) -> ChatRequest:
    f = Fields(body)
    max_tokens = f.integer("max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = f.integer("max_tokens", None, 1)
    logprobs = f.boolean("logprobs")
    top = f.integer("top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    tools = f.raw("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid("'tools' must be a list", "tools")
    return ChatRequest(**_openai_common(f, max_tokens, logprobs=logprobs, top_logprobs=top),
                       messages=_messages(f.raw("messages")), tools=tools or None)


def _messages(value) -> list[dict]:
    if value is None:
        raise invalid("'messages' is required", "messages")
    if not isinstance(value, list):
        raise invalid("'messages' must be a list of messages", "messages")
    if not value:
        raise invalid("'messages' must contain at least one message", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        f = Fields(m, where)
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"'{where}.role' must be one of {', '.join(ROLES)}; got {role!r}", f"{where}.role")
        content = _content(m.get("content"), f"{where}.content",
                           optional=role == "assistant" and bool(m.get("tool_calls")))
        msg = {"role": "system" if role == "developer" else role, "content": content}
        if f.string("name") is not None:
            msg["name"] = m["name"]
        if role == "tool":
            msg["tool_call_id"] = f.string("tool_call_id")
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise invalid(f"'{where}.tool_calls' must be a list", f"{where}.tool_calls")
            msg["tool_calls"] = m["tool_calls"]
        out.append(msg)
    return out


def _content(v, where: str, optional: bool) -> str:
    """A string, or an array of text parts (joined with newlines)."""
    if v is None:
        if optional:
            return ""
        raise invalid(f"'{where}' is required", where)
    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise invalid(f"'{where}' must be a string or an array of content parts", where)
    texts = []
    for j, part in enumerate(v):
        f = Fields(part, f"{where}[{j}]")
        kind = f.string("type")
        if kind != "text":
            raise invalid(f"'{f.name('type')}': only 'text' content parts are supported, got {kind!r}",
                          f.name("type"))
        text = f.string("text")
        if text is None:
            raise invalid(f"'{f.name('text')}' is required", f.name("text"))
        texts.append(text)
    return "\n".join(texts)


def parse_completion(body) -> CompletionRequest:
    f = Fields(body)
    logprobs = f.integer("logprobs", None, 0, MAX_TOP_LOGPROBS)
    if f.string("suffix"):
        raise invalid("'suffix' is not supported", "suffix")
    common = _openai_common(f, f.integer("max_tokens", 16, 0), logprobs=logprobs is not None,
                            top_logprobs=logprobs or 0)
    best_of = f.integer("best_of", None, 1)
    if best_of is not None and best_of != common["n"]:
        raise invalid("'best_of' other than 'n' is not supported", "best_of")
    prompts = _prompts(f.raw("prompt"))
    if len(prompts) * common["n"] > MAX_CHOICES:
        raise invalid(f"at most {MAX_CHOICES} choices (prompts times n) per request", "n")
    return CompletionRequest(**common, prompts=prompts, echo=f.boolean("echo"), logprobs=logprobs)


def _prompts(v) -> list:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    def is_ids(x):
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if v is None:
        raise invalid("'prompt' is required", "prompt")
    if isinstance(v, str):
        return [v]
    if is_ids(v):
        return [v]
    if isinstance(v, list) and v and all(isinstance(p, str) or is_ids(p) for p in v):
        return list(v)
    raise invalid("'prompt' must be a string, a list of strings, or token ids (a list of integers, "
                  "or a list of such lists), and not empty", "prompt")


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


def _ollama_common(f: Fields) -> dict:
    o = f.object("options")
    d = OLLAMA_DEFAULTS
    num_predict = o.integer("num_predict", None, -2)
    if num_predict == 0:
        raise invalid("'options.num_predict' must be -1 (no limit), -2 (fill the context) or >= 1",
                      "options.num_predict")
    logprobs = f.boolean("logprobs")
    params = _checked(SamplingParams(
        temperature=o.number("temperature", d["temperature"], 0, 2),
        top_p=o.number("top_p", d["top_p"], 0, 1, lo_open=True),
        top_k=o.integer("top_k", d["top_k"], 0),
        min_p=o.number("min_p", d["min_p"], 0, 1),
        repetition_penalty=o.number("repeat_penalty", d["repeat_penalty"], 0, None, lo_open=True),
        presence_penalty=o.number("presence_penalty", 0.0, -2, 2),
        frequency_penalty=o.number("frequency_penalty", 0.0, -2, 2),
        seed=o.integer("seed", None, -(2**63), 2**64 - 1),
        max_tokens=num_predict if num_predict and num_predict > 0 else None,
        stop=o.stop(),
        logprobs=logprobs,
        top_logprobs=f.integer("top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if logprobs else 0,
    ))
    if params.seed is not None:
        params.seed %= 2**63
    fmt = f.raw("format")
    if fmt not in (None, "", "json") and not isinstance(fmt, dict):
        raise invalid("'format' must be \"json\" or a JSON schema object", "format")
    return dict(params=params, model=f.string("model"), stream=f.boolean("stream", True),
                json_mode=bool(fmt), num_ctx=o.integer("num_ctx", None, 1))


def _no_images(v, where: str) -> None:
    if v:
        raise invalid(f"'{where}': this model does not accept images", where)


def parse_ollama_generate(body) -> OllamaGenerate:
    f = Fields(body)
    _no_images(f.raw("images"), "images")
    context = f.raw("context")
    if context is not None and not (isinstance(context, list)
                                    and all(isinstance(t, int) and not isinstance(t, bool) for t in context)):
        raise invalid("'context' must be a list of token ids", "context")
    return OllamaGenerate(**_ollama_common(f), prompt=f.string("prompt", ""), system=f.string("system"),
                          raw=f.boolean("raw"), context=context or None)


def parse_ollama_chat(body) -> OllamaChat:
    f = Fields(body)
    msgs = f.raw("messages")
    if msgs is None:
        msgs = []
    if not isinstance(msgs, list):
        raise invalid("'messages' must be a list of messages", "messages")
    out = []
    for i, m in enumerate(msgs):
        mf = Fields(m, f"messages[{i}]")
        role = m.get("role")
        if role not in OLLAMA_ROLES:
            raise invalid(f"'messages[{i}].role' must be one of {', '.join(OLLAMA_ROLES)}; got {role!r}",
                          f"messages[{i}].role")
        _no_images(m.get("images"), f"messages[{i}].images")
        msg = {"role": role, "content": mf.string("content", "")}
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        out.append(msg)
    tools = f.raw("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid("'tools' must be a list", "tools")
    return OllamaChat(**_ollama_common(f), messages=out, tools=tools or None)
