"""Generation called from Python (`Model.generate`, `Model.chat`): each call submits to the
model's engine (a server's, or a one-slot engine driven from the caller's thread) and yields
its events."""

from __future__ import annotations

from hybrid.engine.generate import chat_prompt_ids, collect
from hybrid.engine.sampling import SamplingParams
from hybrid.engine.scheduler import Engine


def engine_for(model):
    """The engine `Model.generate` uses: one started elsewhere (a server's), or a
    one-slot engine that each stream drives from the caller's thread."""
    engine = getattr(model, "_engine", None)
    if engine is None:
        engine = model._engine = Engine(model, slots=1)
    return engine


def _params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    if params is not None and sampling:
        raise TypeError("pass either params or sampling keywords, not both")
    params = params or SamplingParams(**sampling)
    if isinstance(params.stop, str):
        params.stop = [params.stop]
    return params


def generate(model, prompt, params: SamplingParams | None = None, *, json_mode: bool = False,
             grammar: str | None = None, **sampling):
    """Yield `Event`s for a completion of `prompt` (text, encoded with BOS per the
    tokenizer, or token ids). Sampling keywords are `SamplingParams` fields. json_mode:
    the output is a JSON object or array; grammar: a compiled grammar (hybrid.engine.grammar)."""
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids")
        prompt = model.tokenizer.encode(prompt, add_special_tokens=True)
    stream = engine_for(model).submit(list(prompt), _params(params, sampling), json_mode=json_mode, grammar=grammar)
    return _events(stream)


def _events(stream):
    try:
        yield from stream
    finally:  # an abandoned generator frees its slot
        stream.cancel()


def chat(model, messages, stream: bool = False, params: SamplingParams | None = None, *,
         tools=None, json_mode: bool = False, grammar: str | None = None, **sampling):
    """Answer a conversation ([{"role", "content"}...]) through the chat template.
    stream=False: a `Completion` (text, finish_reason, usage...); stream=True: `Event`s."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer")
    events = generate(model, chat_prompt_ids(model.tokenizer, messages, tools), params,
                      json_mode=json_mode, grammar=grammar, **sampling)
    return events if stream else collect(events)
