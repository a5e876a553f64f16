"""Response bodies and stream chunks, shaped exactly as the OpenAI and Ollama references show them.

Pure functions of plain values: routes decide what to send, this module decides how it looks.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone

_MIN_LOGPROB = -9999.0   # JSON has no -inf


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def ndjson(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens whose KV came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _lp(x: float) -> float:
    return max(float(x), _MIN_LOGPROB)


# ---------------------------------------------------------------- OpenAI: logprobs

def chat_logprobs(samples, tok) -> dict:
    """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null}"""
    def entry(t, lp):
        return {"token": tok.token_text(t), "logprob": _lp(lp), "bytes": list(tok.token_bytes(t))}

    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                        for s in samples],
            "refusal": None}


def completion_logprobs(samples, tok, offset: int = 0, prompt_ids=()) -> dict:
    """Legacy form: {tokens, token_logprobs, top_logprobs, text_offset}. Echoed prompt tokens
    come first with null logprobs (prompt scoring is not computed)."""
    tokens, lps, tops, offsets = [], [], [], []
    for t in prompt_ids:
        text = tok.token_text(t)
        tokens.append(text), lps.append(None), tops.append(None), offsets.append(offset)
        offset += len(text)
    for s in samples:
        text = tok.token_text(s.token)
        tokens.append(text)
        lps.append(_lp(s.logprob))
        tops.append({tok.token_text(t): _lp(lp) for t, lp in s.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


# ---------------------------------------------------------------- OpenAI: bodies and chunks

class OpenAIShape:
    """The id, creation time, model name and fingerprint shared by a response and all its chunks."""

    def __init__(self, prefix: str, model: str, fingerprint: str):
        self.id, self.created = new_id(prefix), int(time.time())
        self.model, self.fingerprint = model, fingerprint

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def chat(self, choices: list[dict], use: dict) -> dict:
        return {**self._head("chat.completion"), "choices": choices, "usage": use}

    @staticmethod
    def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict | None = None,
                    tool_calls: list[dict] | None = None, reasoning: str = "") -> dict:
        """tool_calls: OpenAI's [{id, type, function: {name, arguments}}]; content is null
        when the answer is only calls. reasoning: the think block, as reasoning_content."""
        message = {"role": "assistant", "content": text if text or not tool_calls else None, "refusal": None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}

    def chat_chunk(self, index: int, delta: dict, finish_reason=None, logprobs=None, with_usage=False) -> dict:
        chunk = {**self._head("chat.completion.chunk"),
                 "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if with_usage:
            chunk["usage"] = None
        return chunk

    def chat_usage_chunk(self, use: dict) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": use}

    def completion(self, choices: list[dict], use: dict) -> dict:
        return {**self._head("text_completion"), "choices": choices, "usage": use}

    @staticmethod
    def completion_choice(index: int, text: str, finish_reason, logprobs: dict | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def completion_chunk(self, index: int, text: str, finish_reason=None, logprobs=None, with_usage=False) -> dict:
        chunk = {**self._head("text_completion"),
                 "choices": [self.completion_choice(index, text, finish_reason, logprobs)]}
        if with_usage:
            chunk["usage"] = None
        return chunk

    def completion_usage_chunk(self, use: dict) -> dict:
        return {**self._head("text_completion"), "choices": [], "usage": use}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "hybrid"}


# ---------------------------------------------------------------- Ollama

def created_at() -> str:
    """RFC 3339 with microseconds, as Ollama writes it."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ollama_stats(timing: dict, prompt_tokens: int, completion_tokens: int, received: float) -> dict:
    """The final object's counters; durations in nanoseconds (the engine's, where it measured them)."""
    def ns(a, b):
        return max(0, int((b - a) * 1e9)) if a is not None and b is not None else 0

    end = timing.get("finished") or time.perf_counter()
    first = timing.get("first_token") or end
    return {"total_duration": ns(received, end), "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": timing.get("prompt_eval_ns") or ns(timing.get("submitted"), first),
            "eval_count": completion_tokens, "eval_duration": timing.get("eval_ns") or ns(first, end)}


def ollama_logprobs(samples, tok) -> list[dict]:
    return [{"token": tok.token_text(s.token), "logprob": _lp(s.logprob),
             "top_logprobs": [{"token": tok.token_text(t), "logprob": _lp(lp)} for t, lp in s.top]}
            for s in samples]


def ollama_details(info: dict) -> dict:
    return {"parent_model": "", "format": info["format"], "family": info["family"],
            "families": [info["family"]], "parameter_size": info["parameter_size"],
            "quantization_level": info["quantization_level"]}


def ollama_tag(name: str, info: dict) -> dict:
    return {"name": name, "model": name, "modified_at": info["modified_at"], "size": info["size"],
            "digest": info["digest"], "details": ollama_details(info)}
