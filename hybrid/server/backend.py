"""The server's side of the engine: model names, prompts, submission, and the events that come back.

Routes turn a request dataclass into prompt ids here, submit them, and iterate a
`Generation` (the merged events of its n streams). The engine thread owns the model;
this module uses only the engine's API (submit, cancel, stats, describe) and the
tokenizer that describe() hands out.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from hybrid.files.chat_template import ChatTemplateError
from .errors import (APIError, context_length_exceeded, internal, invalid, model_not_found, queue_full,
                     shutting_down)


@dataclass
class Choice:
    """One finished stream, gathered for a non-streaming response."""
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    samples: list = field(default_factory=list)          # hybrid.engine.sampling.Sample per token (if logprobs)
    finish_reason: str | None = None
    usage: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)


@dataclass
class Timing:
    """Wall-clock marks of one generation, in seconds (time.perf_counter)."""
    submitted: float
    first_token: float | None = None
    finished: float | None = None
    engine: dict = field(default_factory=dict)     # the last event's timings: prompt_eval_ns, eval_ns, total_ns


class ClientGone(APIError):
    """The client closed its connection while its request was generating."""

    def __init__(self):
        super().__init__(499, "the client closed the connection", code="client_closed_request")


POLL = 0.2     # seconds between checks that the client is still connected


class Generation:
    """The streams of one request (n choices, or several prompts), merged into one iterator of
    (choice index, event). Closing it (or the generator over it) cancels what is still running;
    so does the client going away (`client_gone()` true), checked every POLL seconds while
    waiting for an event."""

    def __init__(self, engine, streams, indices, metrics, prompt_lens, client_gone=None, on_close=None):
        self.engine, self.streams, self.indices, self.metrics = engine, streams, indices, metrics
        self.client_gone, self._on_close = client_gone, on_close
        self.timing = [Timing(time.perf_counter()) for _ in streams]
        self._done = [False] * len(streams)
        self._closed = False
        self._checked = time.monotonic()
        for n in prompt_lens:
            metrics.prompt_tokens.inc(n)
        metrics.active.inc(len(streams))

    def __iter__(self):
        events = self._one() if len(self.streams) == 1 else self._merged()
        try:
            for k, ev in events:
                self._observe(k, ev)
                yield self.indices[k], ev
        finally:
            events.close()
            self.cancel()

    def cancel(self) -> None:
        """Cancel every stream still running (counted in hybrid_cancelled_generations) and
        give back the request's place; safe to call more than once."""
        for k, s in enumerate(self.streams):
            if not self._done[k]:
                self._done[k] = True
                self.metrics.active.dec()
                self.metrics.cancelled.inc()
                self.engine.cancel(s)
        if not self._closed:
            self._closed = True
            if self._on_close is not None:
                self._on_close()

    def collect(self) -> list[Choice]:
        choices = {i: Choice(i) for i in self.indices}
        for i, ev in self:
            c = choices[i]
            err = failure(ev)
            if err is not None:
                raise err
            c.text += ev.text or ""
            if ev.token is not None:
                c.token_ids.append(ev.token)
            if ev.logprobs is not None:
                c.samples.append(ev.logprobs)
            if ev.finish_reason:
                c.finish_reason, c.usage = ev.finish_reason, dict(ev.usage or {})
                c.timing = self.timing_of(i)
        return [choices[i] for i in self.indices]

    def timing_of(self, index: int) -> dict:
        """Wall-clock marks (perf_counter seconds) and the engine's own timings (ns) of one choice."""
        t = self.timing[self.indices.index(index)]
        return {"submitted": t.submitted, "first_token": t.first_token or t.finished, "finished": t.finished,
                **t.engine}

    def _check_client(self, now: float | None = None) -> None:
        """Raise ClientGone if the client has gone; with `now`, only once per POLL seconds
        (events may come faster than timeouts do)."""
        if now is not None:
            if now - self._checked < POLL:
                return
            self._checked = now
        if self.client_gone is not None and self.client_gone():
            raise ClientGone()

    def _one(self):
        s = self.streams[0]
        while True:
            ev = s.next(POLL)
            self._check_client(None if ev is None else time.monotonic())
            if ev is None:
                continue
            yield 0, ev
            if ev.finish_reason is not None:
                return

    def _merged(self):
        """Events of several streams as they come: one feeder thread per stream, one queue."""
        q: queue.Queue = queue.Queue()
        stop = threading.Event()

        def feed(k, s):
            try:
                while not stop.is_set():
                    ev = s.next(POLL)
                    if ev is None:
                        continue
                    q.put((k, ev, None))
                    if ev.finish_reason is not None:
                        break
            except Exception as e:  # handed to the consumer, which reports it
                q.put((k, None, e))
            q.put((k, None, StopIteration()))

        for k, s in enumerate(self.streams):
            threading.Thread(target=feed, args=(k, s), daemon=True, name=f"merge-{k}").start()
        live = len(self.streams)
        try:
            while live:
                try:
                    k, ev, exc = q.get(timeout=POLL)
                except queue.Empty:
                    self._check_client()
                    continue
                self._check_client(time.monotonic())
                if isinstance(exc, StopIteration):
                    live -= 1
                elif exc is not None:
                    raise exc
                else:
                    yield k, ev
        finally:
            stop.set()

    def _observe(self, k: int, ev) -> None:
        t = self.timing[k]
        now = time.perf_counter()
        if ev.token is not None:
            if t.first_token is None:
                t.first_token = now
                self.metrics.ttft.observe(now - t.submitted)
            self.metrics.generated_tokens.inc()
        if ev.finish_reason and not self._done[k]:
            t.finished, t.engine = now, dict(ev.timings or {})
            self._done[k] = True
            self.metrics.active.dec()
            n = (ev.usage or {}).get("completion_tokens", 0)
            if n > 1 and t.first_token is not None and now > t.first_token:
                self.metrics.tokens_per_second.observe((n - 1) / (now - t.first_token))


def failure(ev) -> APIError | None:
    """The error an event ends its stream with, if any (an engine error, or a cancellation
    that did not come from this request, i.e. the engine shutting down)."""
    if ev.error:
        return internal(f"generation failed: {ev.error}")
    if ev.finish_reason == "cancelled":
        return APIError(503, "generation was cancelled: the server is shutting down", type="server_error",
                        code="cancelled")
    return None


class Backend:
    """Model names, tokenizer, limits, and submission to one engine (through its API:
    submit, cancel, stats, describe).

    `max_inflight` bounds the generations this server holds at once (each streams on an
    HTTP thread); beyond it, and while draining for shutdown, new ones are refused at once
    with Retry-After rather than queued behind busy threads."""

    def __init__(self, engine, metrics, *, served_name: str | None = None, aliases=(),
                 strict_names: bool = False, ctx: int | None = None, default_max_tokens: int | None = None,
                 max_inflight: int | None = None):
        self.engine, self.metrics = engine, metrics
        desc = engine.describe()
        self.tokenizer, self.source = desc["tokenizer"], desc.get("source")
        path = getattr(self.source, "path", None)
        stem = Path(str(path)).name.removesuffix(".gguf") if path else None
        self.name = served_name or stem or desc["name"]
        self.aliases = {a for a in (self.name, desc["name"], stem, "default", *aliases) if a}
        self.strict_names = strict_names
        self.ctx = desc.get("ctx") or ctx
        self.created = int(time.time())
        self.fingerprint = "fp_" + hashlib.sha1(f"{self.name}:{path}".encode()).hexdigest()[:10]
        self.default_max_tokens = default_max_tokens   # for requests that set no limit (None: fill the context)
        self.max_inflight = max_inflight
        self.inflight = 0                # generations submitted and not yet closed
        self.draining = False
        self._lock = threading.Lock()
        metrics.watch(engine, self)

    # -- names

    def check_model(self, name: str | None) -> None:
        """A request's `model`: any name is served unless names are strict (see docs/api.md)."""
        if self.strict_names and name and name not in self.aliases:
            raise model_not_found(name)

    def knows(self, name: str) -> bool:
        return name in self.aliases

    # -- what Ollama's /api/tags, /api/show and /api/ps report

    def model_info(self) -> dict:
        return self.engine.describe()["info"]

    def ollama_parameters(self) -> str:
        stops = sorted(self.tokenizer.token_text(i) for i in self.tokenizer.stop_ids)
        return "\n".join(f"stop {json.dumps(s)}" for s in stops)

    def modelfile(self) -> str:
        path = getattr(self.source, "path", "")
        template = (self.tokenizer.chat_template or "").replace('"""', '\\"\\"\\"')
        params = "".join(f"PARAMETER {line}\n" for line in self.ollama_parameters().splitlines())
        return f'# Modelfile served by hybrid\nFROM {path}\nTEMPLATE """{template}"""\n{params}'

    # -- prompts

    def chat_prompt(self, messages: list[dict], tools=None, **extra) -> list[int]:
        from hybrid.engine.generate import chat_prompt_ids

        try:
            return chat_prompt_ids(self.tokenizer, messages, tools, **extra)
        except ChatTemplateError as e:
            raise invalid(f"the chat template rejected the messages: {e}", "messages") from None
        except ValueError as e:   # no chat template
            raise invalid(str(e), "messages") from None
        except (TypeError, KeyError, AttributeError, IndexError) as e:   # e.g. tool fields of unexpected shape
            raise invalid(f"the chat template could not render the messages or tools: "
                          f"{type(e).__name__}: {e}", "messages") from None

    @property
    def tool_format(self):
        """How this model writes tool calls (from its chat template, else its family)."""
        from .tools import tool_format

        return tool_format(self.tokenizer.chat_template, self.model_info().get("family"))

    @property
    def harmony(self) -> bool:
        """The model writes harmony (gpt-oss): reasoning, answer and calls in headed messages."""
        from .tools import HARMONY

        return self.tool_format is HARMONY

    def call_grammar(self, tools: list[dict], forced: str, parallel: bool) -> str:
        """The grammar forcing a call (tool_choice required or a function); 400 naming the
        tool whose parameters cannot compile."""
        from hybrid.engine.grammar import GrammarError
        from .tools import call_grammar

        for i, t in enumerate(tools):
            params = t["function"].get("parameters")
            if params is not None:
                from .requests import compiled_schema

                compiled_schema(params, f"tools[{i}].function.parameters")
        try:
            return call_grammar(self.tool_format, tools, forced, parallel, self.tokenizer)
        except GrammarError as e:
            raise invalid(f"the tools cannot be compiled into a call grammar: {e}", "tools") from None

    def opens_thinking(self, prompt_ids: list[int]) -> bool:
        from .reasoning import prompt_opens_thinking

        return prompt_opens_thinking(self.tokenizer, prompt_ids)

    def text_prompt(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_bos)

    def check_ids(self, ids, param: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise invalid(f"'{param}' has token ids outside the vocabulary [0, {self.tokenizer.vocab_size}): "
                          f"{bad[:5]}", param)
        return list(ids)

    # -- generation

    def submit(self, prompts: list[list[int]], params, *, n: int = 1, grammar: str | None = None,
               ctx: int | None = None, param: str = "messages", client_gone=None) -> Generation:
        """n streams per prompt; choice index = prompt * n + i. With a seed, choice i samples
        with seed + i, so choices differ and each one is reproducible. `ctx` (Ollama's
        num_ctx) narrows the context of this request; the engine checks its own.
        `client_gone()` true cancels the generation (see Generation). `grammar` (compiled,
        hybrid.engine.grammar) constrains every choice, each with its own matcher."""
        self._enter()
        try:
            gen = self._submit(prompts, params, n, grammar, ctx, param)
        except BaseException:
            self._leave()
            raise
        gen.client_gone, gen._on_close = client_gone, self._leave
        return gen

    def _enter(self) -> None:
        if self.draining:
            raise shutting_down()
        with self._lock:
            if self.max_inflight is not None and self.inflight >= self.max_inflight:
                raise queue_full()
            self.inflight += 1

    def _leave(self) -> None:
        with self._lock:
            self.inflight -= 1

    def _submit(self, prompts, params, n, grammar, ctx, param) -> Generation:
        if params.logit_bias:
            self.check_ids(params.logit_bias, "logit_bias")
        jobs = []
        for p, ids in enumerate(prompts):
            self.check_ids(ids, param)
            sp, limit = params, min(ctx or self.ctx, self.ctx)
            if limit < self.ctx and len(ids) + (params.max_tokens or 1) > limit:
                raise self._too_long(len(ids), params.max_tokens, limit, param)
            if params.max_tokens is None and len(ids) < limit:
                default = limit - len(ids)
                if self.default_max_tokens:
                    default = min(default, self.default_max_tokens)
                sp = replace(params, max_tokens=default)
            for i in range(n):
                seeded = sp if sp.seed is None else replace(sp, seed=(sp.seed + i) % 2**63)
                jobs.append((p * n + i, ids, seeded))
        streams = []
        try:
            for _, ids, sp in jobs:
                streams.append(self._submit_one(ids, sp, grammar, param))
        except BaseException:
            for s in streams:
                self.engine.cancel(s)
            raise
        return Generation(self.engine, streams, [j[0] for j in jobs], self.metrics, [len(ids) for _, ids, _ in jobs])

    def _submit_one(self, ids, params, grammar, param):
        from hybrid.engine.scheduler import ContextLengthExceeded, QueueFull

        try:
            return self.engine.submit(ids, params, grammar=grammar)
        except QueueFull:
            raise queue_full() from None
        except ContextLengthExceeded as e:
            raise context_length_exceeded(str(e), param) from None
        except ValueError as e:
            raise invalid(str(e), param) from None

    @staticmethod
    def _too_long(prompt: int, max_tokens: int | None, ctx: int, param: str) -> APIError:
        if max_tokens is None:
            return context_length_exceeded(
                f"This request's context is {ctx} tokens, but the prompt has {prompt} tokens and leaves "
                f"no room for a completion. Please shorten the prompt.", param)
        return context_length_exceeded(
            f"This request's context is {ctx} tokens. However, you requested {prompt + max_tokens} tokens "
            f"({prompt} in the prompt, {max_tokens} in the completion). Please reduce the length of the "
            f"prompt or completion.", param)
