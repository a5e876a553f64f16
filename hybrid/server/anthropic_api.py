"""Anthropic Messages API: POST /v1/messages, so the `anthropic` SDK (and tools built on it)
work with only the base URL changed. See docs/api.md.

The request is validated by anthropic_schema.py, its conversation rendered through the
model's chat template (system prompt, text, tool_use and tool_result blocks; `tools` given
to the template in the OpenAI form templates expect), submitted through the backend like
every other route, and answered as a message or as Anthropic's server-sent events. Tool
calls in the model's output come back as tool_use blocks, read by the same parser as the
OpenAI route's (tools.py: the model's call format, from its chat template or family);
`tool_choice` `any` / `tool` is enforced by the same call grammar as OpenAI's `required` /
a named function.

Usage follows Anthropic's split of the prompt: `input_tokens` are the prompt tokens that
were prefilled, `cache_read_input_tokens` those whose KV came from the prefix cache.
"""

from __future__ import annotations

import json
import logging
import uuid

from flask import Blueprint, Response

from . import anthropic_schema as A
from .context import backend, client_gone, json_body
from .backend import ClientGone, failure
from .errors import APIError, internal, invalid
from .requests import GREEDY_BELOW
from .schema import validate
from .chat_output import ChatOutput
from .tools import HARMONY, HarmonyToolStream, ToolStream, parse_tool_calls
from hybrid.engine.sampling import SamplingParams

log = logging.getLogger(__name__)
bp = Blueprint("anthropic", __name__)


# ---------------------------------------------------------------- tool calls in the output

def _hermes(name: str, arguments: dict) -> str:
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{call}\n</tool_call>"


def _as_tool_use(calls) -> list[dict]:
    """tools.ToolCall (arguments a JSON string) -> {"name", "input"} of a tool_use block."""
    out = []
    for c in calls:
        try:
            args = json.loads(c.arguments or "{}")
        except json.JSONDecodeError:
            args = {}
        out.append({"name": c.name, "input": args if isinstance(args, dict) else {}})
    return out


# ---------------------------------------------------------------- the request

class MessagesCall:
    """A validated request, in the form the backend takes."""

    def __init__(self, b: A.MessagesRequest, template: str):
        self.model, self.stream = b.model, bool(b.stream)
        choice = b.tool_choice.type if b.tool_choice else "auto"
        _check_tool_choice(b)
        self.use_tools = bool(b.tools) and choice != "none"
        self.tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                        "parameters": t.input_schema}}
                      for t in b.tools] if self.use_tools else None
        self.declared = self.tools   # what a forced call's grammar chooses from
        self.forced = {"any": "required", "tool": b.tool_choice.name}.get(choice) if b.tool_choice else None
        self.parallel = not (b.tool_choice and b.tool_choice.disable_parallel_tool_use)
        self.messages = _history(b, "tool_calls" in template)
        if self.use_tools and "tools" not in template:   # the template would drop them: say them in the system prompt
            self.messages = _with_tools_in_system(self.messages, self.tools)
            self.tools = None
        temperature = 1.0 if b.temperature is None else b.temperature
        self.params = SamplingParams(temperature=0.0 if temperature < GREEDY_BELOW else temperature,
                                     top_p=1.0 if b.top_p is None else b.top_p, top_k=b.top_k or 0,
                                     max_tokens=b.max_tokens, stop=list(b.stop_sequences or []))
        try:
            self.params.validate()
        except ValueError as e:
            raise invalid(str(e)) from None


def _check_tool_choice(b: A.MessagesRequest) -> None:
    tc = b.tool_choice
    if tc is None or tc.type in ("auto", "none"):
        return
    if not b.tools:
        raise invalid(f"'tool_choice' of type '{tc.type}' needs 'tools'", "tool_choice")
    if tc.type == "tool":
        names = [t.name for t in b.tools]
        if not tc.name:
            raise invalid("'tool_choice.name' is required with type 'tool'", "tool_choice.name")
        if tc.name not in names:
            raise invalid(f"'tool_choice.name': no tool named {tc.name!r} in 'tools' ({', '.join(names)})",
                          "tool_choice.name")


def _text(content) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "\n".join(block.text for block in content)


def _history(b: A.MessagesRequest, renders_tool_calls: bool) -> list[dict]:
    """The conversation as chat-template messages: the system prompt first; a user
    message's tool_result blocks become `tool` messages (before its text); an assistant
    message's tool_use blocks become `tool_calls` (arguments as objects), or Hermes text
    in its content when the template has no notion of tool calls."""
    out = [{"role": "system", "content": _text(b.system)}] if b.system else []
    names = {}   # tool_use id -> tool name, for the results that answer them
    for i, m in enumerate(b.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts, calls, results = [], [], []
        for j, block in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if block.type == "text":
                texts.append(block.text)
            elif block.type == "tool_use":
                if m.role != "assistant":
                    raise invalid(f"'{where}': tool_use blocks belong in assistant messages", where)
                names[block.id] = block.name
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": block.input}})
            else:
                if m.role != "user":
                    raise invalid(f"'{where}': tool_result blocks belong in user messages", where)
                if block.tool_use_id not in names:
                    raise invalid(f"'{where}.tool_use_id': {block.tool_use_id!r} answers no earlier tool_use block",
                                  f"{where}.tool_use_id")
                text = _text(block.content)
                results.append({"role": "tool", "tool_call_id": block.tool_use_id, "name": names[block.tool_use_id],
                                "content": f"Error: {text}" if block.is_error else text})
        out.extend(results)
        if texts or calls or not results:
            msg = {"role": m.role, "content": "\n".join(texts)}
            if calls and renders_tool_calls:
                msg["tool_calls"] = calls
            elif calls:
                msg["content"] = "\n".join([*texts, *(_hermes(c["function"]["name"], c["function"]["arguments"])
                                                      for c in calls)])
            out.append(msg)
    return out


def _with_tools_in_system(messages: list[dict], tools: list[dict]) -> list[dict]:
    """For a template without tools: the tools and the Hermes call format, in the system prompt."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    text = ("You can call these tools (JSON Schema signatures inside <tools></tools>):\n<tools>\n" + listed +
            "\n</tools>\nTo call one, answer with a JSON object of its name and arguments inside "
            "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <tool name>, \"arguments\": <arguments object>}"
            "\n</tool_call>")
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# ---------------------------------------------------------------- the answer

def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def stop_reason(ev, calls: list) -> str:
    if calls:
        return "tool_use"
    if ev.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if ev.stop_sequence is not None else "end_turn"


def usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict:
    return {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _tool_use(call: dict) -> dict:
    return {"type": "tool_use", "id": new_id("toolu"), "name": call["name"], "input": call["input"]}


@bp.post("/v1/messages")
def messages():
    body = json_body()
    be = backend()
    call = MessagesCall(validate(A.MessagesRequest, body), be.tokenizer.chat_template or "")
    be.check_model(call.model)
    prompt = be.chat_prompt(call.messages, call.tools)
    grammar = be.call_grammar(call.declared, call.forced, call.parallel) if call.forced else None
    fmt = be.tool_format if call.use_tools else None
    gen = be.submit([prompt], call.params, grammar=grammar, client_gone=client_gone())
    head = {"id": new_id("msg"), "type": "message", "role": "assistant", "model": be.name}
    if call.stream:
        return _event_stream(_events(gen, head, fmt, len(prompt), be.harmony), gen)
    parts, last = [], None
    for _, ev in gen:
        err = failure(ev)
        if err is not None:
            raise err
        parts.append(ev.text or "")
        last = ev
    text, calls = "".join(parts), []
    if be.harmony:      # the analysis channel is reasoning, never part of the text
        out = ChatOutput(reasoning_format="hidden", tools=fmt, harmony=True).whole(text)
        text, calls = out.content, _as_tool_use(out.calls)
    elif fmt is not None:
        text, found = parse_tool_calls(text, fmt)
        calls = _as_tool_use(found)
    content = ([{"type": "text", "text": text}] if text or not calls else []) + [_tool_use(c) for c in calls]
    u = last.usage or {}
    return {**head, "content": content, "stop_reason": stop_reason(last, calls),
            "stop_sequence": last.stop_sequence if not calls else None,
            "usage": usage(len(prompt), u.get("completion_tokens", 0), u.get("cached_tokens", 0))}


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _events(gen, head: dict, fmt, prompt_tokens: int, harmony: bool = False):
    """message_start (once the prompt is in: its usage counts the cached tokens), ping, a
    text block as text comes, tool_use blocks at the end (the input in one input_json_delta),
    message_delta (stop_reason, usage), message_stop. Harmony output is always read by
    message, so its analysis channel stays out of the text."""
    calls_stream = (HarmonyToolStream(HARMONY, calls=fmt is not None) if harmony
                    else ToolStream(fmt) if fmt is not None else None)
    index, text_open, started, last, calls = 0, False, False, None, []
    for _, ev in gen:
        err = failure(ev)
        if err is not None:
            raise err
        if not started:
            started = True
            cached = gen.streams[0].cached_tokens
            yield _sse("message_start", {"type": "message_start", "message": {
                **head, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": usage(prompt_tokens, 1, cached)}})
            yield _sse("ping", {"type": "ping"})
        last = ev
        text = ev.text or ""
        if calls_stream is not None:
            text, done = calls_stream.push(text)
            calls += _as_tool_use(done)
            if ev.finish_reason is not None:
                tail, done = calls_stream.flush()
                text, calls = text + tail, calls + _as_tool_use(done)
        if text:
            if not text_open:
                text_open = True
                yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "text", "text": ""}})
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                               "delta": {"type": "text_delta", "text": text}})
    if last is None:
        raise internal("the generation ended without a result")
    if not text_open and not calls:   # an empty answer is still one (empty) text block
        text_open = True
        yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                                           "content_block": {"type": "text", "text": ""}})
    if text_open:
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    for c in calls:
        block = _tool_use(c)
        yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                                           "content_block": {**block, "input": {}}})
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
            "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}})
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    u = last.usage or {}
    cached = u.get("cached_tokens", 0)
    yield _sse("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": stop_reason(last, calls),
                                           "stop_sequence": last.stop_sequence if not calls else None},
                                 "usage": usage(prompt_tokens, u.get("completion_tokens", 0), cached)})
    yield _sse("message_stop", {"type": "message_stop"})


def _event_stream(events, gen) -> Response:
    """SSE response; an error after the headers went out ends the stream with Anthropic's
    `error` event; a client that goes away cancels the generation."""
    def body():
        try:
            yield from events
        except ClientGone:
            return
        except APIError as e:
            yield _sse("error", e.anthropic_body())
        except Exception as e:  # a bug: logged, and reported in the stream's envelope
            log.exception("stream failed")
            yield _sse("error", internal(f"Internal server error: {type(e).__name__}").anthropic_body())
        finally:
            events.close()
            gen.cancel()

    response = Response(body(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(gen.cancel)
    return response
