"""The engine: one thread owns the model and its KV cache and runs continuous batching.

Requests come in through a bounded queue (`submit`, any thread); each `step` admits
waiting requests into free cache slots, feeds one prefill chunk of each new sequence
(batched: sequences whose chunks are of similar length share one forward), then runs ONE
batched decode forward over every running sequence (B = running, T = 1, each at its own
slot and position), samples, sends events and retires finished sequences. A batch-8
decode step reads the same dense weights as a batch-1 step, so throughput grows with the
batch. Events go to a per-request queue read by that request's `Stream`.

The API other code uses: `submit` (a `Stream`), `cancel(stream)`, `stats()`, `describe()`,
`start()`, `stop()` and `replace_model()`; nothing outside reads the queues or the model's modules.

`replace_model` hands the engine a faster tier of the same weights (the numba kernels once
they are compiled, after a start on torch): the engine thread prepares it and swaps it in
between two steps, so the kernels only ever run on the thread that owns the model.

Either `start()` a background thread (a server), or leave it stopped and let each
`Stream` drive `step()` from the thread that iterates it (scripts, the CLI in a pinch).
Model code (and so the numba kernels) only ever runs inside `step`, under one lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from hybrid.engine.generate import (ContextLengthExceeded, Event, Sequence, advance, check_fits, decode, finish, new_sequence,
                       pick, prefill)
from hybrid.engine.grammar import json_object_grammar
from hybrid.engine.prefix_cache import PrefixCache
from hybrid.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

__all__ = ["Engine", "Stream", "QueueFull", "ContextLengthExceeded", "Event"]


def prefill_groups(seqs: list[Sequence], chunk: int, ctx: int) -> list[list[Sequence]]:
    """The prefilling sequences in batches of one forward each. Chunks are padded to the
    longest of their batch, so a batch takes only chunks at least half as long as its
    longest, whose padded end fits the context, and at most `chunk` padded tokens in all
    (the forward's activations and logits stay those of one full chunk)."""
    def need(s):
        return min(len(s.prompt) - s.prefilled, chunk)

    todo = sorted(seqs, key=need, reverse=True)
    groups = []
    while todo:
        T = need(todo[0])
        group, rest = [], []
        for s in todo:
            fits = 2 * need(s) >= T and s.prefilled + T <= ctx and (len(group) + 1) * T <= max(chunk, T)
            (group if fits else rest).append(s)
        groups.append(group)
        todo = rest
    return groups


def _cache_layout(model) -> list | None:
    """What must match for a KV cache made by one model to serve another: per layer, the
    cache's kind, heads, head sizes, dtype and device (None: unknown, never matches)."""
    layout = getattr(model, "cache_layout", None)
    return layout() if layout is not None else None


def _prefix_budget(caches, budget: int) -> int:
    """The prefix cache's budget for these caches: 0 (off) when a layer's cache cannot have
    positions copied out and back in (a recurrent layer's state folds them all together)."""
    if budget and not all(getattr(c, "copies_rows", True) for c in caches):
        log.warning("prefix cache off: this model's recurrent layers keep one state per slot, which cached "
                    "blocks of positions cannot rebuild")
        return 0
    return budget


class QueueFull(RuntimeError):
    """The engine's waiting queue is full; retry later."""


class Stream:
    """Iterator over the `Event`s of one request; the last one has finish_reason set."""

    def __init__(self, engine: "Engine", seq: Sequence):
        self.engine, self.seq = engine, seq
        self._finished = False

    def __iter__(self):
        return self

    def __next__(self) -> Event:
        if self._finished:
            raise StopIteration
        ev = self._next_event()
        self._finished = ev.finish_reason is not None
        return ev

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the slot is freed at the next step."""
        if self.seq.finish_reason is None:
            self.seq.cancelled = True
            self.engine.wake()

    def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or None when none came within `timeout` seconds (with an engine
        thread; without one this thread steps the engine until there is an event)."""
        if self._finished:
            raise StopIteration
        if self.engine.alive:
            try:
                ev = self.seq.out.get(timeout=timeout)
            except queue.Empty:
                return None
        else:
            ev = self._next_event()
        self._finished = ev.finish_reason is not None
        return ev

    @property
    def prompt_tokens(self) -> int:
        return len(self.seq.prompt)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens copied from the prefix cache (known once the request holds a slot)."""
        return self.seq.cached

    def _next_event(self) -> Event:
        out = self.seq.out
        while True:
            try:
                return out.get_nowait()
            except queue.Empty:
                pass
            if self.engine.alive:
                return out.get()
            try:  # no engine thread: this thread runs the engine
                busy = self.engine.step()
            except BaseException:
                self.cancel()
                raise
            if not busy and out.empty():
                return Event(finish_reason="error", error="the engine dropped this request")


class Engine:
    """Continuous batching over `slots` KV-cache slots of `ctx` tokens each."""

    def __init__(self, model, slots: int = 4, ctx: int | None = None, max_queue: int = 64, prefill_chunk: int = 512,
                 prefix_cache: int = 0, prefix_block: int = 64):
        """prefix_cache: bytes of KV the prefix cache may keep (0: none), in blocks of
        `prefix_block` tokens; see hybrid.engine.prefix_cache."""
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer; generation needs one")
        if slots < 1 or max_queue < 1 or prefill_chunk < 1:
            raise ValueError("slots, max_queue and prefill_chunk must be >= 1")
        self.model, self.tokenizer = model, model.tokenizer
        self.ctx = int(ctx or min(model.context_length, 4096))
        if self.ctx < 2:
            raise ValueError(f"context size must be at least 2, got {self.ctx}")
        if self.ctx > model.context_length:
            log.warning("context %d is longer than the model's %d; quality may drop", self.ctx, model.context_length)
        self.slots, self.prefill_chunk = slots, prefill_chunk
        self.cache = model.new_cache(slots, self.ctx)
        self.prefix = PrefixCache(_prefix_budget(self.cache, prefix_cache), prefix_block)
        self.prefilled_tokens = 0   # prompt tokens run through the model (not copied from the prefix cache)
        self.free = list(range(slots))
        self.waiting: queue.Queue[Sequence] = queue.Queue(max_queue)
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stop_reason = "cancelled"
        self._description: dict | None = None
        self._pending: tuple | None = None  # (model, prepare, on_swapped) waiting for replace_model
        self.swaps = 0

    # -- any thread

    def submit(self, prompt_ids, params: SamplingParams | None = None, json_mode: bool = False,
               grammar: str | None = None) -> Stream:
        """Queue a request. json_mode: the output is a JSON object or array; grammar: a
        compiled grammar (hybrid.engine.grammar) it must follow instead. Raises ValueError on bad
        parameters (GrammarError for a grammar that cannot run), ContextLengthExceeded when
        it cannot fit, QueueFull when the waiting queue is full."""
        params = params or SamplingParams()
        params.validate()
        prompt = list(prompt_ids)
        if json_mode and grammar is None:
            grammar = json_object_grammar()
        check_fits(len(prompt), params.max_tokens, self.ctx, grammar is not None)
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= int(t) < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        seq = new_sequence(self.tokenizer, prompt, params, grammar)
        try:
            self.waiting.put_nowait(seq)
        except queue.Full:
            raise QueueFull(f"{self.waiting.maxsize} requests are already waiting; retry later") from None
        self.wake()
        return Stream(self, seq)

    def cancel(self, stream: Stream) -> None:
        """Stop `stream`'s generation; its slot is free at the next step (milliseconds)."""
        stream.cancel()

    def stats(self) -> dict:
        """Occupancy now: waiting (queued for a slot), running (holding a slot), free slots,
        the prefix cache. Read without the engine's lock, which a step holds through its
        prefill and decode: /metrics and /health must not wait for a step (a count may be one
        step old)."""
        running = len(self.running) + len(self.prefilling)
        prefix = self.prefix.stats()
        return {"waiting": self.waiting.qsize(), "running": running, "free_slots": len(self.free),
                "slots": self.slots, "ctx": self.ctx, "prefilled_tokens": self.prefilled_tokens,
                "prefix_cache": prefix}

    def describe(self) -> dict:
        """What a server says about the model: name, tokenizer, context, source files, and
        `info` (sizes, quantization, architecture; read from the files once)."""
        if self._description is None:
            from hybrid.files.model_info import describe

            m = self.model
            self._description = {"name": m.name, "tokenizer": self.tokenizer, "ctx": self.ctx,
                                 "source": getattr(m, "source", None), "info": describe(m, self.ctx)}
        return self._description

    def replace_model(self, model, prepare=None, on_swapped=None) -> None:
        """From the next step on, run `model` (the same weights through other operators).

        The engine thread calls prepare() first (e.g. `model.warm_up`: the kernels' first
        calls, loaded or compiled, on the thread that will run them), then swaps between
        two steps and calls on_swapped(error or None). The KV cache (and prefix cache) are
        kept when the new model's cache has the same layout, so sequences in flight go on
        on the new model; otherwise the swap waits until no sequence holds a slot. If
        prepare() raises, the current model stays and on_swapped gets the exception."""
        self._pending = (model, prepare, on_swapped)
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        """Run `run_forever` on a background thread; generate() on this model then uses it."""
        if not self.alive:
            self._stopping = False
            self._thread = threading.Thread(target=self.run_forever, name="hybrid-engine", daemon=True)
            self._thread.start()
            current = getattr(self.model, "_engine", None)
            if current is None or not current.alive:
                self.model._engine = self
        return self

    def stop(self, timeout: float | None = 10, reason: str = "cancelled") -> None:
        """Stop the thread; requests still in the engine end with finish_reason `reason`
        ("length" ends them as cut short, their held-back text flushed)."""
        self._stop_reason = reason
        self._stopping = True
        self.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None
        if getattr(self.model, "_engine", None) is self:
            del self.model._engine
        with self._lock:
            self._end_all(reason)

    def run_forever(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                busy = self.step()
            except Exception:  # a bug in scheduling itself: end everything, keep serving
                log.exception("engine step failed")
                with self._lock:
                    self._end_all("error", "internal engine error")
                busy = False
            if not busy:
                self._wake.wait(0.1)
        with self._lock:   # before the thread ends: a Stream never sees a dead engine with work left
            self._end_all(self._stop_reason)

    # -- the engine thread

    def step(self) -> bool:
        """Admit, prefill one chunk each, decode one token each. False when there was nothing to do."""
        with self._lock:
            if self._pending is not None:
                self._swap()
            self._drop_cancelled()
            self._admit()
            if not (self.prefilling or self.running):
                return False
            for group in prefill_groups(self.prefilling, self.prefill_chunk, self.ctx):
                self._prefill(group)
            if self.running:
                self._decode()
            return True

    def _swap(self) -> None:
        model, prepare, on_swapped = self._pending
        layout = _cache_layout(model)
        same = layout is not None and layout == _cache_layout(self.model)
        if not same and (self.prefilling or self.running):
            return  # after the sequences holding slots are done
        self._pending = None
        try:
            if prepare is not None:
                prepare()
        except Exception as e:
            log.exception("the new model could not be prepared; the engine keeps the current one")
            if on_swapped is not None:
                on_swapped(e)
            return
        if not same:
            self.cache = model.new_cache(self.slots, self.ctx)
            self.prefix = PrefixCache(_prefix_budget(self.cache, self.prefix.budget), self.prefix.block)
        if getattr(self.model, "_engine", None) is self:
            del self.model._engine
            model._engine = self
        self.model, self.swaps = model, self.swaps + 1
        log.info("engine: now running %s", getattr(model, "ruleset", None) and model.ruleset.source)
        if on_swapped is not None:
            on_swapped(None)

    def _admit(self) -> None:
        while self.free:
            try:
                seq = self.waiting.get_nowait()
            except queue.Empty:
                return
            if seq.cancelled or seq.params.max_tokens == 0:
                seq.out.put(finish(seq, "cancelled" if seq.cancelled else "length"))
                continue
            seq.slot = self.free.pop(0)
            seq.prefilled = seq.cached = self.prefix.restore(self.cache, seq.slot, seq.prompt, seq.block_keys)
            seq.blocks_saved = seq.cached // self.prefix.block
            self.prefilling.append(seq)

    def _prefill(self, group: list[Sequence]) -> None:
        t0 = time.perf_counter_ns()
        before = [seq.prefilled for seq in group]
        try:
            rows = prefill(self.model, self.cache, group, self.prefill_chunk)
        except Exception as e:
            if len(group) == 1:
                return self._fail(group[0], e)
            log.exception("batched prefill failed; retrying one sequence at a time")
            for seq in group:  # the forward raised before any sequence advanced
                self._prefill([seq])
            return
        dt = time.perf_counter_ns() - t0
        for seq, logits, n in zip(group, rows, before):
            seq.prompt_eval_ns += dt
            self.prefilled_tokens += seq.prefilled - n
            # padding of a batched chunk may write up to a chunk past the sequence's own tokens
            self._save_prefix(seq, seq.prompt[: seq.prefilled], seq.prefilled + self.prefill_chunk)
            if logits is None:
                continue
            try:
                ev = advance(seq, pick(seq, logits, self.ctx), self.ctx)
            except Exception as e:
                self._fail(seq, e)
                continue
            self.prefilling.remove(seq)
            self.running.append(seq)
            self._send(seq, ev)

    def _decode(self) -> None:
        batch = list(self.running)
        t0 = time.perf_counter_ns()
        try:
            rows = list(decode(self.model, self.cache, batch))
        except Exception:
            if len(batch) > 1:  # find which sequence breaks the batch; the others go on
                log.exception("batched decode failed; retrying one sequence at a time")
            rows = [self._decode_alone(seq) for seq in batch]
        dt = time.perf_counter_ns() - t0
        for seq, row in zip(batch, rows):
            if row is None:
                continue
            try:
                sample = pick(seq, row, self.ctx)
                seq.eval_ns += dt
                ev = advance(seq, sample, self.ctx)
            except Exception as e:
                self._fail(seq, e)
                continue
            self._send(seq, ev)

    def _decode_alone(self, seq: Sequence):
        try:
            return decode(self.model, self.cache, [seq])[0]
        except Exception as e:
            self._fail(seq, e)
            return None

    def _send(self, seq: Sequence, ev: Event) -> None:
        if ev.finish_reason is not None:
            self._release(seq)
        seq.out.put(ev)

    def _save_prefix(self, seq: Sequence, tokens: list[int], written: int) -> None:
        seq.blocks_saved = self.prefix.save(self.cache, seq.slot, tokens, seq.block_keys, seq.blocks_saved, written)

    def _release(self, seq: Sequence) -> None:
        if seq.slot >= 0 and seq.finish_reason != "error":
            # what the slot holds: the prompt so far, or prompt + generated but the last sampled token
            if seq in self.prefilling:
                valid = seq.prompt[: seq.prefilled]
            else:
                valid = (seq.prompt + seq.generated)[: seq.length - 1]
            self._save_prefix(seq, valid, seq.length + self.prefill_chunk)
        for group in (self.prefilling, self.running):
            if seq in group:
                group.remove(seq)
        if seq.slot >= 0:
            self.free.append(seq.slot)
            self.free.sort()
            seq.slot = -1

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        log.warning("request failed: %s", error, exc_info=error)
        ev = finish(seq, "error")
        ev.error = f"{type(error).__name__}: {error}"
        self._send(seq, ev)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.prefilling + self.running if s.cancelled]:
            self._send(seq, finish(seq, "cancelled"))

    def _end_all(self, reason: str, error: str | None = None) -> None:
        pending = self.prefilling + self.running
        while True:
            try:
                pending.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        for seq in pending:
            ev = finish(seq, reason)
            ev.error = error
            self._send(seq, ev)
