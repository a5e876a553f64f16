"""Generation as small functions over one `Sequence`: prefill, decode one step, pick a
token, advance. `hybrid.engine.Engine` schedules them over many sequences; `generate`
and `chat` are the thin entry points attached to `Model`.

Token flow of a sequence with n prompt tokens: the prompt fills cache positions
0..n-1 and its last logits give generated token 1; generated token k is fed at
position n+k-1 to get token k+1. A sequence ends when prompt + generated tokens fill
the context, so `len(prompt) + max_tokens <= ctx` is what a request must satisfy.
"""

from __future__ import annotations

import math
import queue
import time
from dataclasses import dataclass, field

import torch

from .sampling import Sample, Sampler, SamplingParams
from .stops import StopMatcher


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
    json: "JsonConstraint | None" = None
    out: queue.Queue = field(default_factory=queue.Queue)  # events for this request only
    slot: int = -1
    prefilled: int = 0                   # prompt tokens already in the cache
    cached: int = 0                      # of which copied from the prefix cache
    block_keys: list = field(default_factory=list)   # hybrid.prefix_cache chain keys of its tokens
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


def new_sequence(tokenizer, prompt_ids: list[int], params: SamplingParams, json_mode: bool = False) -> Sequence:
    prompt = [int(i) for i in prompt_ids]
    return Sequence(prompt, params, Sampler(params, prompt), tokenizer.decoder(), StopMatcher(list(params.stop)),
                    set(tokenizer.stop_ids), JsonConstraint(tokenizer) if json_mode else None)


def check_fits(n_prompt: int, max_tokens: int | None, ctx: int, json_mode: bool = False) -> None:
    if n_prompt == 0:
        raise ValueError("the prompt is empty")
    need = n_prompt + (max_tokens or 1)
    if need > ctx:
        what = f"{n_prompt} prompt tokens" + (f" + max_tokens {max_tokens}" if max_tokens else "")
        raise ContextLengthExceeded(f"{what} = {need} tokens exceed the context length of {ctx}; "
                                    "shorten the prompt, lower max_tokens or raise the context size")
    if json_mode and min(max_tokens or ctx, ctx - n_prompt) < 2:
        raise ValueError("json_mode needs room for at least 2 tokens (the shortest document is {})")


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
    if seq.json is None:
        return seq.sampler(logits)
    remaining = min(seq.params.max_tokens or ctx, ctx - len(seq.prompt)) - len(seq.generated)  # this one included
    return seq.json.pick(seq.sampler, logits, remaining)


def advance(seq: Sequence, sample: Sample, ctx: int) -> Event:
    """Take the sampled token: the event to send, with finish_reason set when seq is done."""
    tok = sample.token
    seq.generated.append(tok)
    ev = Event(token=tok, logprobs=sample if seq.params.logprobs else None)
    if tok in seq.stop_ids:  # EOS / end of turn: never shown
        return finish(seq, "stop", ev)
    piece = seq.decoder.push(tok)
    if seq.json is not None:
        seq.json.feed(piece)
    ev.text, stopped = seq.stops.push(piece)
    if stopped:
        return finish(seq, "stop", ev)
    if seq.json is not None and seq.json.done:   # closed early to fit max_tokens: "length"
        return finish(seq, "length" if seq.json.cut else "stop", ev)
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


# ---------------------------------------------------------------- JSON mode

# A character-level pushdown automaton for JSON whose top level is an object or array.
# State: (mode, stack of open "{"/"[", aux). json_step returns the next state or None
# when the character cannot continue a valid document.
_WS = " \t\n\r"
_HEX = "0123456789abcdefABCDEF"
_NUM = {("-", "0"): "0", ("-", "1"): "int", ("0", "."): ".", ("0", "e"): "e", ("int", "1"): "int",
        ("int", "0"): "int", ("int", "."): ".", ("int", "e"): "e", (".", "0"): "frac", (".", "1"): "frac",
        ("frac", "0"): "frac", ("frac", "1"): "frac", ("frac", "e"): "e", ("e", "+"): "esign",
        ("e", "-"): "esign", ("e", "0"): "exp", ("e", "1"): "exp", ("esign", "0"): "exp",
        ("esign", "1"): "exp", ("exp", "0"): "exp", ("exp", "1"): "exp"}
_NUM_END = {"0", "int", "frac", "exp"}
JSON_START = ("start", "", None)


def _num_class(ch: str) -> str:
    return "1" if ch in "123456789" else "e" if ch in "eE" else ch


def _after_value(stack: str):
    return ("after", stack, None) if stack else ("done", "", None)


def _value_start(stack: str, ch: str):
    if ch == "{":
        return ("key_or_close", stack + "{", None)
    if ch == "[":
        return ("value_or_close", stack + "[", None)
    if ch == '"':
        return ("str", stack, False)
    if ch == "-" or ch.isascii() and ch.isdigit():
        return ("num", stack, "-" if ch == "-" else "0" if ch == "0" else "int")
    for word in ("true", "false", "null"):
        if ch == word[0]:
            return ("lit", stack, word[1:])
    return None


def json_step(state, ch: str):
    mode, stack, aux = state
    if mode == "str":
        if ch == '"':
            return ("colon", stack, None) if aux else _after_value(stack)
        if ch == "\\":
            return ("esc", stack, aux)
        return None if ch < " " else state
    if mode == "esc":
        return ("str", stack, aux) if ch in '"\\/bfnrt' else ("uni", stack, (aux, 0)) if ch == "u" else None
    if mode == "uni":
        key, n = aux
        return None if ch not in _HEX else ("str", stack, key) if n == 3 else ("uni", stack, (key, n + 1))
    if mode == "num":
        nxt = _NUM.get((aux, _num_class(ch)))
        if nxt:
            return ("num", stack, nxt)
        return json_step(_after_value(stack), ch) if aux in _NUM_END else None
    if mode == "lit":
        return None if ch != aux[0] else ("lit", stack, aux[1:]) if len(aux) > 1 else _after_value(stack)
    if ch in _WS:
        return state
    if mode == "start":
        return _value_start(stack, ch) if ch in "{[" else None
    if mode in ("value", "value_or_close"):
        if ch == "]" and mode == "value_or_close":
            return _after_value(stack[:-1])
        return _value_start(stack, ch)
    if mode in ("key_or_close", "key"):
        if ch == '"':
            return ("str", stack, True)
        return _after_value(stack[:-1]) if ch == "}" and mode == "key_or_close" else None
    if mode == "colon":
        return ("value", stack, None) if ch == ":" else None
    if mode == "after":
        if ch == ",":
            return ("key", stack, None) if stack[-1] == "{" else ("value", stack, None)
        return _after_value(stack[:-1]) if ch == ("}" if stack[-1] == "{" else "]") else None
    return None  # done: nothing but whitespace


def json_run(state, text: str):
    for ch in text:
        state = json_step(state, ch)
        if state is None:
            return None
    return state


def _forced_char(state) -> str:
    """A character that moves state towards the end of the document by the shortest path."""
    mode, stack, aux = state
    closing = ("}" if stack[-1:] == "{" else "]") if stack else ""
    table = {"str": '"', "esc": "n", "uni": "0", "start": "{", "value": "0", "value_or_close": "]",
             "key_or_close": "}", "key": '"', "colon": ":", "after": closing}
    if mode == "num":
        return closing if aux in _NUM_END else "0"
    if mode == "lit":
        return aux[0]
    return table[mode]


def json_closer(state) -> str:
    """The shortest text that completes the document from state."""
    out = []
    while state[0] != "done":
        ch = _forced_char(state)
        out.append(ch)
        state = json_step(state, ch)
    return "".join(out)


class JsonConstraint:
    """Keeps a sequence's output a valid JSON object or array. Only the best `TOP`
    candidates are checked, in order; a token is allowed when the document can still be
    completed within the remaining token budget (its shortest completion, one token per
    character at worst, must fit), so output closes in time. When none of the
    candidates is allowed, the first token of the shortest completion is forced."""

    TOP = 32

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.state = JSON_START
        self.banned = set(tokenizer.special_ids) | set(tokenizer.stop_ids)
        self._char_ids = None
        self.cut = False    # the budget refused a token the document allowed: closed early

    @property
    def done(self) -> bool:
        return self.state[0] == "done"

    def feed(self, text: str) -> None:
        state = json_run(self.state, text)
        if state is None:  # decoded text can differ from token_text for split characters
            raise RuntimeError(f"json_mode: text {text!r} broke the JSON document")
        self.state = state

    def pick(self, sampler: Sampler, logits: torch.Tensor, remaining: int) -> Sample:
        """remaining: tokens left to generate, this one included."""
        x = sampler.transform(logits)
        values, ids = torch.topk(x, min(self.TOP, x.shape[-1]))
        allowed = []
        for v, i in zip(values.tolist(), ids.tolist()):
            fits = v > -math.inf and self._fits(i, remaining)
            if fits is None and not allowed:
                self.cut = True          # the best valid continuation did not fit the budget
            elif fits:
                allowed.append(i)
        allowed = allowed or [self._forced_token(json_closer(self.state))]
        masked = torch.full_like(logits, -math.inf)
        index = torch.tensor(allowed)
        masked[index] = logits[index]
        token = sampler(masked).token
        return sampler.sample_of(logits, token)  # logprobs under the model, not the mask

    def _fits(self, token: int, remaining: int) -> bool | None:
        """True: allowed; False: breaks the document; None: valid JSON, but the document
        could no longer be closed within the budget."""
        text = self.tok.token_text(token)
        if not text or token in self.banned:
            return False
        state = json_run(self.state, text)
        if state is None:
            return False
        return True if len(json_closer(state)) <= remaining - 1 else None

    def _forced_token(self, closer: str) -> int:
        ids = self.tok.encode(closer)
        if ids and closer.startswith(self.tok.token_text(ids[0])) and ids[0] not in self.banned:
            return ids[0]
        if self._char_ids is None:  # single-character tokens, built once when needed
            self._char_ids = {}
            for i in range(self.tok.vocab_size):
                t = self.tok.token_text(i)
                if len(t) == 1 and i not in self.banned:
                    self._char_ids.setdefault(t, i)
        if closer[0] not in self._char_ids:
            raise RuntimeError(f"json_mode: the vocabulary has no token for {closer[0]!r}")
        return self._char_ids[closer[0]]


# ---------------------------------------------------------------- Model.generate / Model.chat

def engine_for(model):
    """The engine `Model.generate` uses: one started elsewhere (a server's), or a
    one-slot engine that each stream drives from the caller's thread."""
    engine = getattr(model, "_engine", None)
    if engine is None:
        from .engine import Engine

        engine = model._engine = Engine(model, slots=1)
    return engine


def _params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    if params is not None and sampling:
        raise TypeError("pass either params or sampling keywords, not both")
    params = params or SamplingParams(**sampling)
    if isinstance(params.stop, str):
        params.stop = [params.stop]
    return params


def chat_prompt_ids(tokenizer, messages, tools=None) -> list[int]:
    """The chat template rendered and encoded, with BOS in front when the model wants one."""
    if tokenizer.chat_template is None:
        raise ValueError("this model has no chat template; use generate() with a plain prompt")
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools))
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id, *ids]
    return ids


def generate(model, prompt, params: SamplingParams | None = None, *, json_mode: bool = False, **sampling):
    """Yield `Event`s for a completion of `prompt` (text, encoded with BOS per the
    tokenizer, or token ids). Sampling keywords are `SamplingParams` fields."""
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids")
        prompt = model.tokenizer.encode(prompt, add_special_tokens=True)
    stream = engine_for(model).submit(list(prompt), _params(params, sampling), json_mode=json_mode)
    return _events(stream)


def _events(stream):
    try:
        yield from stream
    finally:  # an abandoned generator frees its slot
        stream.cancel()


def chat(model, messages, stream: bool = False, params: SamplingParams | None = None, *,
         tools=None, json_mode: bool = False, **sampling):
    """Answer a conversation ([{"role", "content"}...]) through the chat template.
    stream=False: a `Completion` (text, finish_reason, usage...); stream=True: `Event`s."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer")
    events = generate(model, chat_prompt_ids(model.tokenizer, messages, tools), params,
                      json_mode=json_mode, **sampling)
    return events if stream else collect(events)
