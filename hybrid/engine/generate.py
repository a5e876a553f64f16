"""Generation as small functions over one `Sequence`: prefill, decode one step, pick a
token, advance. `hybrid.engine.scheduler.Engine` schedules them over many sequences; `generate`
and `chat` are the thin entry points attached to `Model`.

Token flow of a sequence with n prompt tokens: the prompt fills cache positions
0..n-1 and its last logits give generated token 1; generated token k is fed at
position n+k-1 to get token k+1. A sequence ends when prompt + generated tokens fill
the context, so `len(prompt) + max_tokens <= ctx` is what a request must satisfy.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import torch

from hybrid.engine.grammar import Constraint
from hybrid.engine.sampling import Sample, Sampler, SamplingParams
from hybrid.engine.stops import StopMatcher


class ContextLengthExceeded(ValueError):
    """The prompt plus max_tokens does not fit the engine's context."""


@dataclass
class Event:
    """One step of a stream. Concatenating `text` over a stream gives the output."""

    text: str = ""                      # may be empty: held back (stop string prefix, partial character)
    token: int | None = None            # the sampled token id
    logprobs: Sample | None = None      # when params.logprobs: logprob + top alternatives
    finish_reason: str | None = None    # last event only: stop, length, cancelled, error
    usage: dict | None = None           # last event: prompt_tokens, completion_tokens, total_tokens,
                                        # cached_tokens (of the prompt, from the prefix cache)
    timings: dict | None = None         # last event: prompt_eval_ns, eval_ns, total_ns
    error: str | None = None            # with finish_reason "error"
    stop_sequence: str | None = None    # last event: the stop string that ended it, if one did


@dataclass
class Completion:
    """A whole stream gathered (`collect`)."""

    text: str
    finish_reason: str
    usage: dict
    timings: dict
    tokens: list[int]
    logprobs: list[Sample]


@dataclass
class Sequence:
    """One request inside the engine."""

    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    decoder: object                      # tokenizer StreamDecoder
    stops: StopMatcher
    stop_ids: set[int]
    constraint: Constraint | None = None    # a grammar the output must follow
    out: queue.Queue = field(default_factory=queue.Queue)  # events for this request only
    slot: int = -1
    prefilled: int = 0                   # prompt tokens already in the cache
    cached: int = 0                      # of which copied from the prefix cache
    block_keys: list = field(default_factory=list)   # hybrid.engine.prefix_cache chain keys of its tokens
    blocks_saved: int = 0                # leading blocks the prefix cache holds (or held)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    prompt_eval_ns: int = 0
    eval_ns: int = 0

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)


def new_sequence(tokenizer, prompt_ids: list[int], params: SamplingParams, grammar: str | None = None) -> Sequence:
    """grammar: a compiled grammar (hybrid.engine.grammar) the output must follow, or None."""
    prompt = [int(i) for i in prompt_ids]
    return Sequence(prompt, params, Sampler(params, prompt), tokenizer.decoder(), StopMatcher(list(params.stop)),
                    set(tokenizer.stop_ids), Constraint(tokenizer, grammar) if grammar is not None else None)


def check_fits(n_prompt: int, max_tokens: int | None, ctx: int, constrained: bool = False) -> None:
    if n_prompt == 0:
        raise ValueError("the prompt is empty")
    need = n_prompt + (max_tokens or 1)
    if need > ctx:
        what = f"{n_prompt} prompt tokens" + (f" + max_tokens {max_tokens}" if max_tokens else "")
        raise ContextLengthExceeded(f"{what} = {need} tokens exceed the context length of {ctx}; "
                                    "shorten the prompt, lower max_tokens or raise the context size")
    if constrained and min(max_tokens or ctx, ctx - n_prompt) < 2:
        raise ValueError("a constrained output (JSON, tool calls) needs room for at least 2 tokens")


# ---------------------------------------------------------------- model steps

def prefill(model, cache, seqs: list[Sequence], chunk: int) -> list[torch.Tensor | None]:
    """Feed the next `chunk` prompt tokens of each sequence in one batched forward; for each,
    its last logits [V] once its whole prompt is in, else None.

    Shorter chunks are padded at the end to the longest. The padding lands in cache positions
    past the sequence's own tokens, which none of them attends to (keys <= position) and
    which its next chunk or decoded token overwrites before it can be seen.
    """
    parts = [s.prompt[s.prefilled : s.prefilled + chunk] for s in seqs]
    T = max(map(len, parts))
    ids = torch.tensor([p + p[-1:] * (T - len(p)) for p in parts], dtype=torch.long)  # [B, T]
    logits = model.forward(ids, [s.prefilled for s in seqs], [s.slot for s in seqs], cache, keep=[len(p) - 1 for p in parts])
    out = []
    for b, (s, p) in enumerate(zip(seqs, parts)):
        s.prefilled += len(p)
        out.append(logits[b, 0] if s.prefilled == len(s.prompt) else None)
    return out


def decode(model, cache, seqs: list[Sequence]) -> torch.Tensor:
    """One token for each sequence in one batched forward: logits [B, V]."""
    tokens = torch.tensor([[s.generated[-1]] for s in seqs], dtype=torch.long)  # [B, 1]
    starts = [s.length - 1 for s in seqs]  # where each sequence's newest token goes
    return model.forward(tokens, starts, [s.slot for s in seqs], cache)[:, -1]


def pick(seq: Sequence, logits: torch.Tensor, ctx: int) -> Sample:
    """Sample the next token of seq from its logits [V]."""
    if seq.constraint is None:
        return seq.sampler(logits)
    remaining = min(seq.params.max_tokens or ctx, ctx - len(seq.prompt)) - len(seq.generated)  # this one included
    return seq.constraint.pick(seq.sampler, logits, remaining)


def advance(seq: Sequence, sample: Sample, ctx: int) -> Event:
    """Take the sampled token: the event to send, with finish_reason set when seq is done."""
    tok = sample.token
    seq.generated.append(tok)
    ev = Event(token=tok, logprobs=sample if seq.params.logprobs else None)
    if seq.constraint is not None:
        seq.constraint.accept(tok)
    if tok in seq.stop_ids:  # EOS / end of turn: never shown
        return finish(seq, "length" if seq.constraint is not None and seq.constraint.cut else "stop", ev)
    piece = seq.decoder.push(tok)
    ev.text, stopped = seq.stops.push(piece)
    if stopped:
        return finish(seq, "stop", ev)
    if seq.constraint is not None and seq.constraint.done:   # closed early to fit max_tokens: "length"
        return finish(seq, "length" if seq.constraint.cut else "stop", ev)
    if len(seq.generated) >= (seq.params.max_tokens or ctx) or seq.length >= ctx:
        return finish(seq, "length", ev)
    return ev


def finish(seq: Sequence, reason: str, ev: Event | None = None) -> Event:
    """Mark seq done: flush held-back text into the last event and attach usage and timings."""
    ev = ev or Event()
    if reason in ("stop", "length") and not seq.stops.stopped:
        text, stopped = seq.stops.push(seq.decoder.flush())
        ev.text += text if stopped else text + seq.stops.flush()
        reason = "stop" if stopped else reason
    seq.finish_reason = ev.finish_reason = reason
    ev.stop_sequence = seq.stops.matched
    n = len(seq.generated)
    ev.usage = {"prompt_tokens": len(seq.prompt), "completion_tokens": n, "total_tokens": len(seq.prompt) + n,
                "cached_tokens": seq.cached}
    ev.timings = {"prompt_eval_ns": seq.prompt_eval_ns, "eval_ns": seq.eval_ns,
                  "total_ns": time.perf_counter_ns() - seq.submitted_ns}
    return ev


def collect(events) -> Completion:
    """Gather a stream of events; raises RuntimeError when the stream ended with an error."""
    parts, tokens, logprobs, last = [], [], [], Event()
    for last in events:
        parts.append(last.text)
        if last.token is not None:
            tokens.append(last.token)
        if last.logprobs is not None:
            logprobs.append(last.logprobs)
    if last.error:
        raise RuntimeError(f"generation failed: {last.error}")
    return Completion("".join(parts), last.finish_reason, last.usage or {}, last.timings or {}, tokens, logprobs)


def chat_prompt_ids(tokenizer, messages, tools=None, **extra) -> list[int]:
    """The chat template rendered and encoded, with BOS in front when the model wants one.
    `extra`: more template variables (e.g. enable_thinking)."""
    if tokenizer.chat_template is None:
        raise ValueError("this model has no chat template; use generate() with a plain prompt")
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools, **extra))
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids
