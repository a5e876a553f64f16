"""Generation on the real default model: greedy golden answer, sampling, streaming, stop
conditions, continuous batching, cancellation, logprobs, JSON mode."""

import json
import threading
import time

import pytest
import torch

import hybrid
from hybrid.engine.scheduler import Engine, QueueFull
from hybrid.engine.generate import ContextLengthExceeded, chat_prompt_ids, collect
from hybrid.engine.sampling import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NO_STOP = {0: -100.0, 2: -100.0}  # SmolLM2's <|endoftext|> and <|im_end|>: keep generating


@pytest.fixture(scope="module")
def model(smollm_path):
    # One intra-op thread: on a busy 2-core machine, 2 torch threads that wait for each
    # other make decoding several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield hybrid.load(smollm_path, rules="torch-cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, slots=4, ctx=512)


def ids_for(model, text):
    return chat_prompt_ids(model.tokenizer, [{"role": "user", "content": text}])


def test_chat_answers_paris(model):
    out = model.chat(QUESTION, temperature=0, max_tokens=24)
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    assert out.usage["prompt_tokens"] == len(chat_prompt_ids(model.tokenizer, QUESTION))
    assert out.usage["completion_tokens"] == len(out.tokens)
    assert out.timings["prompt_eval_ns"] > 0 and out.timings["eval_ns"] > 0


def test_streamed_deltas_concatenate_to_text(model):
    events = list(model.chat(QUESTION, stream=True, temperature=0, max_tokens=24))
    assert all(e.finish_reason is None for e in events[:-1]) and events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == model.chat(QUESTION, temperature=0, max_tokens=24).text


def test_seeded_sampling_reproduces(model):
    def run(seed):
        return collect(model.generate("Once upon a time", temperature=1.0, seed=seed, max_tokens=16)).tokens

    first = run(1234)
    assert len(first) > 0 and run(1234) == first


def test_stop_string_across_tokens_is_not_emitted(model):
    full = collect(model.generate(ids_for(model, "What is the capital of France?"), temperature=0, max_tokens=12))
    # a stop string that starts inside one token and ends inside a later one
    ends, pos = [], 0
    for t in full.tokens:
        pos += len(model.tokenizer.token_text(t))
        ends.append(pos)
    start, stop = ends[0] + 1, ends[2] + 1
    assert stop <= len(full.text)
    needle = full.text[start:stop]
    events = list(model.generate(ids_for(model, "What is the capital of France?"), temperature=0, max_tokens=12,
                                 stop=[needle]))
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert text == full.text[: full.text.index(needle)]
    assert needle not in text


def test_max_tokens_gives_length(model):
    out = collect(model.generate("The list of numbers: 1, 2, 3,", temperature=0, max_tokens=5, logit_bias=NO_STOP))
    assert out.finish_reason == "length"
    assert out.usage["completion_tokens"] == 5 == len(out.tokens)


def test_context_overflow_raises_and_full_context_ends_with_length(model):
    small = Engine(model, slots=1, ctx=32)
    prompt = model.tokenizer.encode("Count with me: 1, 2, 3, 4, 5, 6,")
    with pytest.raises(ContextLengthExceeded, match="context length of 32"):
        small.submit(prompt, SamplingParams(max_tokens=32 - len(prompt) + 1))
    with pytest.raises(ContextLengthExceeded):
        small.submit(list(range(40)), SamplingParams())
    out = collect(small.submit(prompt, SamplingParams(temperature=0, logit_bias=NO_STOP)))
    assert out.finish_reason == "length"
    assert out.usage["prompt_tokens"] + out.usage["completion_tokens"] == 32


def test_concurrent_greedy_requests_match_alone(model, engine):
    prompts = [ids_for(model, q) for q in ("What is the capital of France?", "Write a haiku about the sea.",
                                            "List three colors.", "Explain gravity in one sentence.")]
    params = dict(temperature=0, max_tokens=16)
    alone = [collect(engine.submit(p, SamplingParams(**params))).tokens for p in prompts]
    streams = [engine.submit(p, SamplingParams(**params)) for p in prompts]
    engine.step()
    assert len(engine.running) == 4  # all four decode in one batch
    together = [collect(s).tokens for s in streams]
    assert together == alone
    assert len(engine.free) == 4
    # the same from four client threads against the engine thread
    results = [None] * 4

    def client(i):
        results[i] = collect(engine.submit(prompts[i], SamplingParams(**params))).tokens

    engine.start()
    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        engine.stop()
    assert results == alone


def test_cancel_frees_the_slot(model):
    eng = Engine(model, slots=2, ctx=256).start()
    try:
        stream = eng.submit(ids_for(model, "Tell me a long story."),
                            SamplingParams(temperature=0, logit_bias=NO_STOP))
        for _, ev in zip(range(3), stream):
            assert ev.finish_reason is None
        stream.cancel()
        deadline = time.monotonic() + 10
        while len(eng.free) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(eng.free) == 2 and not eng.running
        assert stream.seq.finish_reason == "cancelled"
        out = collect(eng.submit(ids_for(model, "Hi"), SamplingParams(temperature=0, max_tokens=4)))
        assert out.usage["completion_tokens"] >= 1  # the engine goes on serving
    finally:
        eng.stop()


def test_usage_and_logprobs(model, engine):
    prompt = ids_for(model, "Name a fruit.")
    events = list(engine.submit(prompt, SamplingParams(temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)))
    last = events[-1]
    assert last.usage == {"prompt_tokens": len(prompt), "completion_tokens": len(events),
                          "total_tokens": len(prompt) + len(events), "cached_tokens": 0}
    for ev in events:
        lp = ev.logprobs
        assert lp is not None and lp.token == ev.token and lp.logprob <= 0
        assert len(lp.top) == 3 and all(v <= 0 for _, v in lp.top)
        assert lp.top[0][0] == ev.token  # greedy picks the best alternative
    plain = list(engine.submit(prompt, SamplingParams(temperature=0, max_tokens=2)))
    assert all(ev.logprobs is None for ev in plain)


def test_json_mode_parses(model, engine):
    ask = ids_for(model, "Describe a cat as a JSON object with its name and age.")
    tight = [SamplingParams(temperature=0, max_tokens=n) for n in (2, 3, 5, 9)]  # must close in time
    for params in [SamplingParams(temperature=0, max_tokens=48), SamplingParams(temperature=1.0, seed=7, max_tokens=48),
                   *tight]:
        out = collect(engine.submit(ask, params, json_mode=True))
        assert isinstance(json.loads(out.text), (dict, list)), out.text
        assert out.usage["completion_tokens"] <= params.max_tokens
    with pytest.raises(ValueError, match="at least 2 tokens"):
        engine.submit(ask, SamplingParams(max_tokens=1), json_mode=True)


def test_engine_errors_end_one_stream_only(model, engine):
    bad = engine.submit(ids_for(model, "Hi"), SamplingParams(max_tokens=4, logit_bias={10**7: 1.0}))
    good = engine.submit(ids_for(model, "Hi"), SamplingParams(temperature=0, max_tokens=4))
    events = list(bad)
    assert events[-1].finish_reason == "error" and events[-1].error
    assert collect(good).usage["completion_tokens"] >= 1
    assert len(engine.free) == 4


def test_queue_full_and_bad_params(model):
    eng = Engine(model, slots=1, ctx=64, max_queue=1)
    first = eng.submit([1, 2, 3], SamplingParams(max_tokens=1))
    with pytest.raises(QueueFull):
        eng.submit([1, 2, 3], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="temperature"):
        eng.submit([1, 2, 3], SamplingParams(temperature=-1))
    assert collect(first).finish_reason in ("stop", "length")


def test_abandoned_generator_frees_its_slot(model):
    gen = model.generate("Once upon a time", temperature=0, max_tokens=50, logit_bias=NO_STOP)
    next(gen)
    gen.close()
    out = collect(model.generate("Hello", temperature=0, max_tokens=3, logit_bias=NO_STOP))
    assert out.finish_reason == "length"


def test_forward_keep_gives_the_kept_positions_logits(smollm_path):
    """`keep` (what prefill uses) returns exactly the logits of the kept position of each row."""
    m = hybrid.load(smollm_path)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253], [1, 9690, 198, 4093, 12, 3]])
    full = m.forward(ids, [0, 0], [0, 1], m.new_cache(2, 8))
    kept = m.forward(ids, [0, 0], [0, 1], m.new_cache(2, 8), keep=[5, 2])
    assert kept.shape == (2, 1, full.shape[-1])
    # 2 kept rows may take the lm_head's integer path (VNNI: x rounded to int16), 12 rows
    # the float tiles: ~1e-4 of the logits' scale apart
    torch.testing.assert_close(kept[:, 0], torch.stack([full[0, 5], full[1, 2]]), rtol=1e-4, atol=5e-3)
    assert not torch.allclose(kept[0, 0], full[0, 4], atol=5e-2)  # and not some other position's
