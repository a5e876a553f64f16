"""OpenAI routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import logging

from flask import Blueprint, Response

from . import responses as R
from .app import backend, client_gone, json_body
from .backend import ClientGone, failure
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
    prompt = be.chat_prompt(req.messages, req.tools)
    gen = be.submit([prompt], req.params, n=req.n, json_mode=req.json_mode, client_gone=client_gone())
    shape = R.OpenAIShape("chatcmpl", be.name, be.fingerprint)
    if req.stream:
        return event_stream(_chat_stream(gen, shape, req, be.tokenizer, len(prompt)), gen)
    choices = gen.collect()
    logprobs = req.params.logprobs
    return shape.chat([shape.chat_choice(c.index, c.text, c.finish_reason,
                                         R.chat_logprobs(c.samples, be.tokenizer) if logprobs else None)
                       for c in choices],
                      R.usage(len(prompt), sum(c.usage.get("completion_tokens", 0) for c in choices),
                              _cached({c.index: c.usage for c in choices}, req.n)))


def _chat_stream(gen, shape, req, tok, prompt_len):
    u, want_lp = req.include_usage, req.params.logprobs
    for i in range(req.n):
        yield R.sse(shape.chat_chunk(i, {"role": "assistant", "content": ""}, with_usage=u))
    pending = {i: [] for i in range(req.n)}     # samples whose text has not gone out yet
    completion, finals = 0, {}
    for i, ev in gen:
        _raise_if_error(ev)
        if want_lp and ev.logprobs is not None:
            pending[i].append(ev.logprobs)
        if ev.text:
            lp = R.chat_logprobs(pending[i], tok) if want_lp else None
            pending[i] = []
            yield R.sse(shape.chat_chunk(i, {"content": ev.text}, logprobs=lp, with_usage=u))
        if ev.finish_reason:
            completion += (ev.usage or {}).get("completion_tokens", 0)
            finals[i] = ev.usage or {}
            lp = R.chat_logprobs(pending[i], tok) if want_lp and pending[i] else None
            yield R.sse(shape.chat_chunk(i, {}, ev.finish_reason, logprobs=lp, with_usage=u))
    if u:
        yield R.sse(shape.chat_usage_chunk(R.usage(prompt_len, completion, _cached(finals, req.n))))


@bp.post("/completions")
def completions():
    req = parse_completion(json_body())
    be = backend()
    be.check_model(req.model)
    prompts = [be.check_ids(p, "prompt") if isinstance(p, list) else be.text_prompt(p) for p in req.prompts]
    gen = be.submit(prompts, req.params, n=req.n, json_mode=req.json_mode, param="prompt",
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
