"""OpenAI routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import logging

from flask import Blueprint, Response

from . import responses as R
from .context import backend, client_gone, json_body
from .backend import ClientGone, failure
from .chat_output import ChatOutput
from .errors import APIError, internal, model_not_found, sse_error
from .requests import parse_chat, parse_completion

log = logging.getLogger(__name__)
bp = Blueprint("openai", __name__, url_prefix="/v1")


@bp.get("/models")
def list_models():
    be = backend()
    return {"object": "list", "data": [R.model_card(be.name, be.created)]}


@bp.get("/models/<path:model_id>")
def get_model(model_id: str):
    be = backend()
    if not be.knows(model_id):
        raise model_not_found(model_id)
    return R.model_card(be.name, be.created)


@bp.post("/chat/completions")
def chat_completions():
    req = parse_chat(json_body())
    be = backend()
    be.check_model(req.model)
    prompt = be.chat_prompt(req.messages, req.tools, **req.template_vars)
    grammar = req.grammar
    if req.forced_call:
        grammar = be.call_grammar(req.tools, req.forced_call, req.parallel_tool_calls)
    gen = be.submit([prompt], req.params, n=req.n, grammar=grammar, client_gone=client_gone())
    shape = R.OpenAIShape("chatcmpl", be.name, be.fingerprint)
    tool_fmt = be.tool_format if req.tools and req.tool_choice != "none" else None
    thinking, harmony = be.opens_thinking(prompt), be.harmony

    def output():
        return ChatOutput(thinking, req.reasoning_format, tool_fmt, harmony)

    if req.stream:
        return event_stream(_chat_stream(gen, shape, req, be.tokenizer, len(prompt), output), gen)
    choices = gen.collect()
    logprobs = req.params.logprobs
    out = []
    for c in choices:
        parts = output().whole(c.text)
        out.append(shape.chat_choice(c.index, parts.content, _finish(c.finish_reason, parts.calls),
                                     R.chat_logprobs(c.samples, be.tokenizer) if logprobs else None,
                                     tool_calls=[call.openai() for call in parts.calls],
                                     reasoning=parts.reasoning))
    return shape.chat(out, R.usage(len(prompt), sum(c.usage.get("completion_tokens", 0) for c in choices),
                                   _cached({c.index: c.usage for c in choices}, req.n)))


def _finish(reason: str, calls) -> str:
    """tool_calls when the answer is calls (also when max_tokens closed the last one early)."""
    return "tool_calls" if calls and reason in ("stop", "length") else reason


def _chat_stream(gen, shape, req, tok, prompt_len, output):
    u, want_lp = req.include_usage, req.params.logprobs
    for i in range(req.n):
        yield R.sse(shape.chat_chunk(i, {"role": "assistant", "content": ""}, with_usage=u))
    pending = {i: [] for i in range(req.n)}     # samples whose text has not gone out yet
    outputs = {i: output() for i in range(req.n)}
    completion, finals = 0, {}
    for i, ev in gen:
        _raise_if_error(ev)
        if want_lp and ev.logprobs is not None:
            pending[i].append(ev.logprobs)
        if ev.text:
            for delta in _deltas(outputs[i], outputs[i].push(ev.text)):
                lp = None
                if want_lp and "content" in delta:
                    lp, pending[i] = R.chat_logprobs(pending[i], tok), []
                yield R.sse(shape.chat_chunk(i, delta, logprobs=lp, with_usage=u))
        if ev.finish_reason:
            for delta in _deltas(outputs[i], outputs[i].flush()):
                yield R.sse(shape.chat_chunk(i, delta, with_usage=u))
            completion += (ev.usage or {}).get("completion_tokens", 0)
            finals[i] = ev.usage or {}
            lp = R.chat_logprobs(pending[i], tok) if want_lp and pending[i] else None
            reason = _finish(ev.finish_reason, range(outputs[i].n_calls))
            yield R.sse(shape.chat_chunk(i, {}, reason, logprobs=lp, with_usage=u))
    if u:
        yield R.sse(shape.chat_usage_chunk(R.usage(prompt_len, completion, _cached(finals, req.n))))


def _deltas(out, parts):
    """The stream deltas of one piece: reasoning, content, then the tool calls' heads (index,
    id, name) and argument fragments."""
    if parts.reasoning:
        yield {"reasoning_content": parts.reasoning}
    if parts.content:
        yield {"content": parts.content}
    for d in parts.deltas:
        yield {"tool_calls": [d.openai()]}


@bp.post("/completions")
def completions():
    req = parse_completion(json_body())
    be = backend()
    be.check_model(req.model)
    prompts = [be.check_ids(p, "prompt") if isinstance(p, list) else be.text_prompt(p) for p in req.prompts]
    gen = be.submit(prompts, req.params, n=req.n, grammar=req.grammar, param="prompt",
                    client_gone=client_gone())
    shape = R.OpenAIShape("cmpl", be.name, be.fingerprint)
    echoes = [_echo_text(be, p, ids) if req.echo else "" for p, ids in zip(req.prompts, prompts)]
    if req.stream:
        return event_stream(_completion_stream(gen, shape, req, be.tokenizer, prompts, echoes), gen)
    out, completion, finals = [], 0, {}
    for c in gen.collect():
        p = c.index // req.n
        lp = None
        if req.logprobs is not None:
            lp = R.completion_logprobs(c.samples, be.tokenizer, prompt_ids=prompts[p] if req.echo else ())
        out.append(shape.completion_choice(c.index, echoes[p] + c.text, c.finish_reason, lp))
        completion += c.usage.get("completion_tokens", 0)
        finals[c.index] = c.usage
    return shape.completion(out, R.usage(sum(len(p) for p in prompts), completion, _cached(finals, req.n)))


def _completion_stream(gen, shape, req, tok, prompts, echoes):
    u, want_lp = req.include_usage, req.logprobs is not None
    offsets = {}
    if req.echo:
        for i in range(len(prompts) * req.n):
            p = i // req.n
            lp = R.completion_logprobs([], tok, prompt_ids=prompts[p]) if want_lp else None
            offsets[i] = len(echoes[p])
            yield R.sse(shape.completion_chunk(i, echoes[p], logprobs=lp, with_usage=u))
    pending: dict[int, list] = {}
    completion, finals = 0, {}
    for i, ev in gen:
        _raise_if_error(ev)
        if want_lp and ev.logprobs is not None:
            pending.setdefault(i, []).append(ev.logprobs)
        if ev.text or ev.finish_reason:
            samples = pending.pop(i, [])
            lp = R.completion_logprobs(samples, tok, offsets.get(i, 0)) if want_lp else None
            offsets[i] = offsets.get(i, 0) + sum(len(tok.token_text(s.token)) for s in samples)
            yield R.sse(shape.completion_chunk(i, ev.text or "", ev.finish_reason, logprobs=lp, with_usage=u))
        if ev.finish_reason:
            completion += (ev.usage or {}).get("completion_tokens", 0)
            finals[i] = ev.usage or {}
    if u:
        yield R.sse(shape.completion_usage_chunk(R.usage(sum(len(p) for p in prompts), completion,
                                                         _cached(finals, req.n))))


def _cached(usages: dict[int, dict], n: int) -> int:
    """Prompt tokens reused from the prefix cache ({choice index: its usage}), counted as
    prompt_tokens counts them, once per prompt: for its n choices, the most any reused."""
    per_prompt: dict[int, int] = {}
    for index, u in usages.items():
        per_prompt[index // n] = max(per_prompt.get(index // n, 0), u.get("cached_tokens", 0))
    return sum(per_prompt.values())


def _echo_text(be, prompt, ids) -> str:
    return prompt if isinstance(prompt, str) else be.tokenizer.decode(ids)


# ---------------------------------------------------------------- streaming plumbing

def _raise_if_error(ev) -> None:
    err = failure(ev)
    if err is not None:
        raise err


def event_stream(chunks, gen) -> Response:
    """SSE response. An error after the headers went out ends the stream with an error
    event; a client that goes away cancels the generation (noticed within Generation's POLL,
    or at the next write), and so does the response being closed unread."""
    def body():
        try:
            yield from chunks
        except ClientGone:
            return
        except APIError as e:
            yield sse_error(e)
        except Exception as e:  # a bug: logged, and reported in the stream's envelope
            log.exception("stream failed")
            yield sse_error(internal(f"Internal server error: {type(e).__name__}"))
        finally:
            chunks.close()
            gen.cancel()
        yield R.SSE_DONE

    response = Response(body(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(gen.cancel)
    return response
