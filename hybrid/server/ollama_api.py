"""Ollama routes: /api/generate, /api/chat (NDJSON streams), /api/tags, /api/show, /api/ps, /api/version."""

from __future__ import annotations

import json
import logging

from flask import Blueprint, Response, g

from .. import __version__
from . import responses as R
from .context import backend, client_gone, json_body
from .backend import ClientGone, failure
from .chat_output import ChatOutput
from .errors import APIError, model_not_found
from .requests import parse_ollama_chat, parse_ollama_generate, parse_ollama_show

log = logging.getLogger(__name__)
bp = Blueprint("ollama", __name__, url_prefix="/api")


@bp.get("/version")
def version():
    return {"version": __version__}


@bp.get("/tags")
def tags():
    be = backend()
    return {"models": [R.ollama_tag(be.name, be.model_info())]}


@bp.get("/ps")
def ps():
    be = backend()
    info = be.model_info()
    return {"models": [{**R.ollama_tag(be.name, info), "expires_at": "2099-01-01T00:00:00Z",
                        "size_vram": info["size_vram"], "context_length": be.ctx}]}


@bp.post("/show")
def show():
    name = parse_ollama_show(json_body(require_json_type=False))
    be = backend()
    if not name or not be.knows(name):
        raise model_not_found(name or "")
    info = be.model_info()
    return {"modelfile": be.modelfile(), "parameters": be.ollama_parameters(),
            "template": be.tokenizer.chat_template or "", "details": R.ollama_details(info),
            "model_info": info["model_info"], "capabilities": _capabilities(be.tokenizer.chat_template or ""), "modified_at": info["modified_at"]}


def _capabilities(template: str) -> list[str]:
    thinks = "<think>" in template or "<|channel|>analysis" in template     # harmony's analysis channel
    return ["completion"] + ["tools"] * ("tools" in template) + ["thinking"] * thinks


@bp.post("/generate")
def generate():
    req = parse_ollama_generate(json_body(require_json_type=False))
    be = backend()
    be.check_model(req.model)
    model = req.model or be.name
    if not req.prompt and not req.context:     # Ollama's "load the model" request
        return {"model": model, "created_at": R.created_at(), "response": "", "done": True, "done_reason": "load"}
    if req.raw:
        ids = be.text_prompt(req.prompt, add_bos=not req.context)
    else:
        msgs = ([{"role": "system", "content": req.system}] if req.system else []) + \
               [{"role": "user", "content": req.prompt}]
        ids = be.chat_prompt(msgs)
    prompt = be.check_ids(req.context or [], "context") + ids
    gen = be.submit([prompt], req.params, grammar=req.grammar, ctx=req.num_ctx, param="prompt",
                    client_gone=client_gone())
    received = g.received
    thinking, harmony = not req.raw and be.opens_thinking(prompt), not req.raw and be.harmony

    def split():
        return ChatOutput(thinking, _reasoning_format(req.think), harmony=harmony)

    def piece(parts, samples):
        out = {"model": model, "created_at": R.created_at(), "response": parts.content, "done": False}
        if parts.reasoning:
            out["thinking"] = parts.reasoning
        if req.params.logprobs:
            out["logprobs"] = R.ollama_logprobs(samples, be.tokenizer)
        return out

    def final(c):
        return {"model": model, "created_at": R.created_at(), "response": "", "done": True,
                "done_reason": c.finish_reason, "context": prompt + c.token_ids,
                **R.ollama_stats(c.timing, len(prompt), c.usage.get("completion_tokens", 0), received)}

    return _respond(req.stream, gen, split, piece, final)


@bp.post("/chat")
def chat():
    req = parse_ollama_chat(json_body(require_json_type=False))
    be = backend()
    be.check_model(req.model)
    model = req.model or be.name
    if not req.messages:
        return {"model": model, "created_at": R.created_at(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    extra = {"enable_thinking": req.think} if req.think is not None else {}
    prompt = be.chat_prompt(req.messages, req.tools, **extra)
    gen = be.submit([prompt], req.params, grammar=req.grammar, ctx=req.num_ctx, client_gone=client_gone())
    received = g.received
    thinking, harmony = be.opens_thinking(prompt), be.harmony
    tool_fmt = be.tool_format if req.tools else None

    def split():
        return ChatOutput(thinking, _reasoning_format(req.think), tool_fmt, harmony)

    def piece(parts, samples):
        message = {"role": "assistant", "content": parts.content}
        if parts.reasoning:
            message["thinking"] = parts.reasoning
        if parts.calls:
            message["tool_calls"] = [{"function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                                     for c in parts.calls]
        out = {"model": model, "created_at": R.created_at(), "message": message, "done": False}
        if req.params.logprobs:
            out["logprobs"] = R.ollama_logprobs(samples, be.tokenizer)
        return out

    def final(c):
        return {"model": model, "created_at": R.created_at(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": c.finish_reason,
                **R.ollama_stats(c.timing, len(prompt), c.usage.get("completion_tokens", 0), received)}

    return _respond(req.stream, gen, split, piece, final)


# ---------------------------------------------------------------- shared by generate and chat

def _reasoning_format(think: bool | None) -> str:
    """think false: the reasoning is dropped; otherwise it comes apart from the answer."""
    return "hidden" if think is False else "deepseek"


def _respond(stream: bool, gen, split, piece, final):
    """One JSON object (stream false) or NDJSON: a piece per text delta, then the final object.
    `split()` makes the choice's ChatOutput (reasoning, content, tool calls)."""
    if not stream:
        c = gen.collect()[0]
        body = final(c)
        whole = piece(split().whole(c.text), c.samples)
        for key in ("response", "thinking", "message", "logprobs"):
            if key in whole:
                body[key] = whole[key]
        return body

    def lines():
        tokens, samples, out = [], [], split()
        try:
            for _, ev in gen:
                err = failure(ev)
                if err is not None:
                    raise err
                if ev.token is not None:
                    tokens.append(ev.token)
                if ev.logprobs is not None:
                    samples.append(ev.logprobs)
                parts = out.push(ev.text) if ev.text else None
                if ev.finish_reason:
                    parts = parts or out.push("")
                    parts += out.flush()
                if parts is not None and (parts.content or parts.reasoning or parts.calls):
                    yield R.ndjson(piece(parts, samples))
                    samples = []
                if ev.finish_reason:
                    c = _Finished(tokens, ev, gen)
                    yield R.ndjson(final(c))
        except ClientGone:
            return
        except APIError as e:
            yield R.ndjson(e.ollama_body())
        except Exception as e:
            log.exception("stream failed")
            yield R.ndjson({"error": f"Internal server error: {type(e).__name__}"})
        finally:
            gen.cancel()

    response = Response(lines(), mimetype="application/x-ndjson", headers={"Cache-Control": "no-cache"})
    response.call_on_close(gen.cancel)
    return response


class _Finished:
    """The final event of a streamed generation, seen as a Choice (what `final` reads)."""

    def __init__(self, tokens, ev, gen):
        self.token_ids, self.finish_reason = tokens, ev.finish_reason
        self.usage = dict(ev.usage or {})
        self.timing = gen.timing_of(0)
