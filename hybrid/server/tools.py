"""Tool calls: how each model family writes them, parsing them out of generated text, and
the grammar that forces a valid call (tool_choice "required" or a named function).

A `ToolFormat` is one model's call syntax; `tool_format(template, family)` picks it from
the chat template's own markers (the family as a fallback), Hermes style when neither
says. Routes use `parse_tool_calls(text, fmt) -> (content, calls)`, `ToolStream` for
streamed output and `call_grammar(...)` for constrained decoding; calls are plain
`ToolCall`s that the OpenAI shape (and other APIs) map to their own.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from hybrid.engine.grammar import JSON_OPTIONS, lark_grammar

from .harmony import MESSAGE, HarmonySplit, Message, split_harmony


@dataclass
class ToolCall:
    name: str
    arguments: str                      # a JSON object, as a string (OpenAI's form)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


# ---------------------------------------------------------------- formats

@dataclass(frozen=True)
class ToolFormat:
    """One call syntax. `start`: the text that opens the calls in an output (content before
    it is plain text); `args_key`: the JSON key the arguments come under."""
    name: str
    start: str
    args_key: str = "arguments"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole output; text that fails to parse stays content."""
        at = self.find_start(text)
        if at < 0:
            return text, []
        if self.name == "harmony":     # the answer may come between (and after) the calls
            return _harmony_parse(self, text)
        calls = _PARSERS[self.name](self, text[at:])
        if calls is None:
            return text, []
        return text[:at].rstrip(), calls

    def find_start(self, text: str) -> int:
        if self.name == "harmony":     # the header of the first message with a recipient
            m = _HARMONY_CALL.search(text)
            return m.start() if m else -1
        if self.name == "llama3":      # bare JSON: a call object at the start of the output
            m = re.match(r"\s*(<\|python_tag\|>|\{\s*\"(name|type)\")", text)
            return m.start(1) if m else -1
        return text.find(self.start)


HERMES = ToolFormat("hermes", "<tool_call>")
LLAMA3 = ToolFormat("llama3", "<|python_tag|>", args_key="parameters")
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]")
DEEPSEEK_V3 = ToolFormat("deepseek_v3", "<｜tool▁calls▁begin｜>")
HARMONY = ToolFormat("harmony", "<|channel|>")   # gpt-oss: a message whose header names a recipient
FORMATS = {f.name: f for f in (HERMES, LLAMA3, MISTRAL, DEEPSEEK_V3, HARMONY)}

# the markers a chat template writes when it renders calls, in the order they are tried
_TEMPLATE_MARKERS = [("<|channel|>", HARMONY), ("tool▁calls▁begin", DEEPSEEK_V3), ("[TOOL_CALLS]", MISTRAL),
                     ("<tool_call>", HERMES), ("<|python_tag|>", LLAMA3), ("ipython", LLAMA3)]
_FAMILIES = {"mistral": MISTRAL, "mixtral": MISTRAL, "deepseek_v3": DEEPSEEK_V3, "llama": LLAMA3,
             "qwen2": HERMES, "qwen3": HERMES, "qwen2_moe": HERMES, "qwen3_moe": HERMES, "gpt_oss": HARMONY}
# a harmony message header that names a recipient (before or after its channel), up to <|message|>
_HARMONY_CALL = re.compile(r"(?:<\|start\|>[^<]*?)?(?:<\|channel\|>[^<]*?)?\bto=[^\s<]+"
                           r"(?=[^<]*(?:<\|(?:channel|constrain)\|>[^<]*)*<\|message\|>)")


def tool_format(template: str | None, family: str | None = None) -> ToolFormat:
    """The call syntax of a model: from its chat template's markers, else its family (only
    when the template renders tools at all, or the family has one format whatever it
    renders: gpt-oss), else Hermes."""
    template = template or ""
    for marker, fmt in _TEMPLATE_MARKERS:
        if marker in template:
            return fmt
    if family == "gpt_oss":
        return HARMONY
    if "tools" in template and family in _FAMILIES:
        return _FAMILIES[family]
    return HERMES


def parse_tool_calls(text: str, fmt: ToolFormat = HERMES) -> tuple[str, list[ToolCall]]:
    """Split a model's output into (content, tool calls) by its format."""
    return fmt.parse(text)


def _call(obj, fmt: ToolFormat) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    if obj.get("type") == "function" and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    args = next((obj[k] for k in (fmt.args_key, "arguments", "parameters") if k in obj), {})
    if not isinstance(name, str) or not name:
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


def _json_objects(text: str) -> list | None:
    """The JSON values written one after another (separated by whitespace, ';' or ',')."""
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i >= len(text):
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(value)


def _parse_hermes(fmt, text):
    calls = []
    for body in re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.S):
        values = _json_objects(body)
        if not values:
            return None
        calls += [_call(v, fmt) for v in values]
    return calls if calls and all(calls) else None


def _parse_llama3(fmt, text):
    values = _json_objects(text.removeprefix("<|python_tag|>"))
    if not values:
        return None
    calls = [_call(v, fmt) for v in values]
    return calls if all(calls) else None


def _parse_mistral(fmt, text):
    body = text[len(fmt.start):].strip()
    if body.startswith("["):                         # [TOOL_CALLS][{"name": ..., "arguments": ...}, ...]
        values = _json_objects(body)
        if not values or not isinstance(values[0], list):
            return None
        calls = [_call(v, fmt) for v in values[0]]
        return calls if calls and all(calls) else None
    calls = []                                        # newer: [TOOL_CALLS]name[ARGS]{...} per call
    for part in text.split(fmt.start)[1:]:
        name, sep, args = part.partition("[ARGS]")
        values = _json_objects(args) if sep else None
        if not values:
            return None
        calls.append(_call({"name": name.strip(), "arguments": values[0]}, fmt))
    return calls if calls and all(calls) else None


_DS_CALL = re.compile(r"<｜tool▁call▁begin｜>(?:function<｜tool▁sep｜>([^\n<]+)\n```(?:json)?\n(.*?)\n```"
                      r"|([^<]+?)<｜tool▁sep｜>(.*?))<｜tool▁call▁end｜>", re.S)


def _parse_deepseek(fmt, text):
    calls = []
    for m in _DS_CALL.finditer(text):
        name, args = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        values = _json_objects(args)
        if not values:
            return None
        calls.append(_call({"name": name.strip(), "arguments": values[0]}, fmt))
    return calls if calls and all(calls) else None


def _harmony_parse(fmt, text):
    """(the answer's text, calls): the bodies of the messages that are neither calls nor
    reasoning, and each call message's body as its arguments; the whole text stays
    content if a call's arguments are not a JSON object."""
    content, calls = "", []
    for m, body in split_harmony(text):
        if m.kind == "call":
            values = _json_objects(body.strip())
            calls.append(_call({"name": m.tool_name, "arguments": values[0]}, fmt) if values else None)
        elif m.kind == "content":
            content += body
    return (content.strip(), calls) if all(calls) else (text, [])


_PARSERS = {"hermes": _parse_hermes, "llama3": _parse_llama3, "mistral": _parse_mistral,
            "deepseek_v3": _parse_deepseek}


# ---------------------------------------------------------------- constrained calls

def call_grammar(fmt: ToolFormat, tools: list[dict], forced: str, parallel: bool = True, tokenizer=None) -> str:
    """The compiled grammar of `fmt`'s call syntax whose arguments follow the tools'
    parameter schemas: one call of the named function, or (forced "required") one or more
    calls (one only when `parallel` is false) of any of the tools. Marker texts that are
    single special tokens of `tokenizer` are matched as those tokens."""
    chosen = [t["function"] for t in tools if forced == "required" or t["function"]["name"] == forced]
    many = parallel and forced == "required"

    def lit(text: str) -> str:
        tid = tokenizer.token_to_id(text) if tokenizer is not None else None
        return f"<[{tid}]>" if tid is not None and tid in tokenizer.special_ids else json.dumps(text)

    def params(f):
        return f.get("parameters") or {"type": "object"}

    def obj(f, key):
        return {"type": "object", "properties": {"name": {"const": f["name"]}, key: params(f)},
                "required": ["name", key], "additionalProperties": False}

    def js(schema):
        return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})

    any_call = {"anyOf": [obj(f, fmt.args_key) for f in chosen]}
    if fmt is HARMONY:      # <|call|> ends the assistant's turn (a stop token), so one call
        heads = " | ".join(json.dumps(f"commentary to=functions.{f['name']} ") + " " + lit("<|constrain|>")
                           + ' "json" ' + lit(MESSAGE) + " " + js(params(f)) for f in chosen)
        return lark_grammar(f'start: {lit("<|channel|>")} call\ncall: {heads}\n')
    if fmt is MISTRAL:
        arr = {"type": "array", "items": any_call, "minItems": 1, **({} if many else {"maxItems": 1})}
        return lark_grammar(f"start: {lit(fmt.start)} {js(arr)}\n")
    if fmt is LLAMA3:
        rule = f"start: {js(any_call)}" + (f' ("; " {js(any_call)})*' if many else "")
        return lark_grammar(rule + "\n")
    if fmt is DEEPSEEK_V3:
        alts = " | ".join(f'{lit("<｜tool▁call▁begin｜>")} "function" {lit("<｜tool▁sep｜>")} '
                          f'{json.dumps(f["name"] + chr(10) + "```json" + chr(10))} {js(params(f))} '
                          f'{json.dumps(chr(10) + "```")} {lit("<｜tool▁call▁end｜>")}' for f in chosen)
        calls = f"call ({json.dumps(chr(10))} call)*" if many else "call"
        return lark_grammar(f'start: {lit(fmt.start)} {calls} {lit("<｜tool▁calls▁end｜>")}\ncall: {alts}\n')
    newline = json.dumps("\n")
    call = f'{lit("<tool_call>")} {newline} {js(any_call)} {newline} {lit("</tool_call>")}'
    more = f" ({newline} call)*" if many else ""
    return lark_grammar(f"start: call{more}\ncall: {call}\n")


# ---------------------------------------------------------------- streamed output

@dataclass
class CallDelta:
    """A piece of a streamed call: the first one of a call carries its id and name; the
    `arguments` fragments of one index, concatenated, are its arguments JSON."""
    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def openai(self) -> dict:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


def _object_prefix(text: str) -> str:
    """The part of `text` (which starts with a JSON object) that belongs to that object."""
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return text[: i + 1]
    return text


class ToolStream:
    """Feed generated text piece by piece: content goes out as soon as it cannot be the
    start of a call; once the calls' marker is seen, calls are emitted as each one is
    complete (hermes, deepseek) or at the end (the rest). `deltas()` gives the streamed
    form: Hermes arguments as they grow, the other formats' calls whole once complete.
    Harmony output is read message by message instead (`HarmonyToolStream`)."""

    def __new__(cls, fmt: ToolFormat | None = None, *args, **kwargs):
        return super().__new__(HarmonyToolStream if cls is ToolStream and fmt is HARMONY else cls)

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self._held = ""
        self._calls_text: str | None = None     # everything from the marker on
        self.calls: list[ToolCall] = []
        self._sent: dict[int, int] = {}         # call index -> characters of arguments sent
        self._ids: dict[int, str] = {}          # ids of calls whose head went out before they were complete

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content to send now, calls completed by this piece)."""
        if self._calls_text is not None:
            self._calls_text += text
            return "", self._new_calls()
        buf = self._held + text
        at = self.fmt.find_start(buf)
        if at >= 0:
            self._held, self._calls_text = "", buf[at:]
            return buf[:at], self._new_calls()
        keep = self._partial(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], []

    def flush(self) -> tuple[str, list[ToolCall]]:
        """At the end: (held-back or unparsable text, the calls not yet emitted)."""
        if self._calls_text is None:
            out, self._held = self._held, ""
            return out, []
        content, calls = self.fmt.parse(self._calls_text)
        if not calls:
            return (self._calls_text if not self.calls and not self._sent else ""), []
        return "", self._take(calls)

    def deltas(self) -> list[CallDelta]:
        """What to stream of the calls since the last call: heads and argument fragments."""
        out = []
        segments = self._calls_text.split("<tool_call>")[1:] if self.fmt is HERMES and self._calls_text else []
        for k in range(max(len(self.calls), len(segments))):
            raw = self._raw_arguments(segments[k]) if k < len(segments) else None
            if k < len(self.calls) and (k not in self._sent or raw is None):
                if k not in self._sent:      # a complete call not streamed as it grew
                    call = self.calls[k]
                    out += [CallDelta(k, "", call.id, call.name), CallDelta(k, call.arguments)]
                    self._sent[k] = len(call.arguments)
                continue
            if raw is None:
                continue
            name, args = raw
            if k not in self._sent:
                self._ids[k] = f"call_{uuid.uuid4().hex[:24]}"
                out.append(CallDelta(k, "", self._ids[k], name))
                self._sent[k] = 0
            if len(args) > self._sent[k]:
                out.append(CallDelta(k, args[self._sent[k]:]))
                self._sent[k] = len(args)
        return out

    @staticmethod
    def _raw_arguments(segment: str) -> tuple[str, str] | None:
        m = _HERMES_HEAD.match(segment)
        if not m:
            return None
        try:
            name = json.loads(f'"{m.group(1)}"')
        except ValueError:
            return None
        return name, _object_prefix(segment[m.end():])

    def _take(self, calls: list[ToolCall]) -> list[ToolCall]:
        new = calls[len(self.calls):]
        for k, call in enumerate(new, start=len(self.calls)):
            call.id = self._ids.get(k, call.id)
        self.calls += new
        return new

    def _new_calls(self) -> list[ToolCall]:
        if self.fmt.name not in ("hermes", "deepseek_v3"):
            return []
        done = self._calls_text
        end = {"hermes": "</tool_call>", "deepseek_v3": "<｜tool▁call▁end｜>"}[self.fmt.name]
        cut = done.rfind(end)
        if cut < 0:
            return []
        _, calls = self.fmt.parse(done[: cut + len(end)])
        return self._take(calls)

    def _partial(self, buf: str) -> int:
        """Length of the longest suffix of buf that could begin the calls' marker."""
        if self.fmt.name == "llama3":           # a call is an output that begins with '{' or the tag
            return len(buf) if buf.strip() and len(buf.strip()) < 16 and (
                "<|python_tag|>".startswith(buf.strip()) or buf.strip().startswith("{")) else 0
        start = self.fmt.start
        for n in range(min(len(start) - 1, len(buf)), 0, -1):
            if buf.endswith(start[:n]):
                return n
        return 0


class HarmonyToolStream(ToolStream):
    """ToolStream for harmony output: a call's head (id, name) goes out once its header is
    read, its arguments as the body arrives, the call itself when its message ends. The
    answer's messages are content; analysis is reasoning, kept apart in `reasoning` for
    the caller to take (see chat_output). `calls=False` (tool_choice none, no tools):
    call messages are left in the content as generated."""

    def __init__(self, fmt: ToolFormat = HARMONY, calls: bool = True):
        super().__init__(fmt)
        self.parse_calls = calls
        self.split = HarmonySplit()
        self.reasoning = ""
        self._pending: list[CallDelta] = []
        self._args: dict[int, str] = {}         # call index -> the arguments' text so far
        self._index: dict[int, int] = {}        # message index -> call index (-1: left in the content)

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        return self._read(self.split.push(text))

    def flush(self) -> tuple[str, list[ToolCall]]:
        return self._read(self.split.flush())

    def deltas(self) -> list[CallDelta]:
        out, self._pending = self._pending, []
        return out

    def _read(self, pieces: list[tuple[Message, str, bool]]) -> tuple[str, list[ToolCall]]:
        content, done = "", []
        for msg, text, ended in pieces:
            if msg.kind == "reasoning":
                self.reasoning += text
            elif msg.kind == "content":
                content += text
            elif not self.parse_calls:
                content += (msg.header + MESSAGE if msg.index not in self._index else "") + text
                self._index[msg.index] = -1
            else:
                k = self._index.get(msg.index)
                if k is None:
                    k = self._index[msg.index] = len(self._args)
                    self._ids[k] = f"call_{uuid.uuid4().hex[:24]}"
                    self._args[k] = ""
                    self._pending.append(CallDelta(k, "", self._ids[k], msg.tool_name))
                self._args[k] += text
                if text:
                    self._pending.append(CallDelta(k, text))
                if ended:
                    done.append(self._finish(k, msg.tool_name))
        return content, done

    def _finish(self, k: int, name: str) -> ToolCall:
        """The completed call; arguments that are not a JSON object go out as written."""
        raw = self._args[k].strip()
        call = _call({"name": name, "arguments": raw}, self.fmt) or ToolCall(name, raw)
        call.id = self._ids[k]
        self.calls.append(call)
        return call
