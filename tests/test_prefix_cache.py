"""Prefix cache (hybrid.engine.prefix_cache): greedy outputs identical with and without it, the
second turn of a chat prefilling only what is new, eviction under a tiny budget, concurrent
requests sharing a prefix, differing prefixes never sharing, sliding-window rings, and what
the server reports (usage cached_tokens, /metrics)."""

import pytest
import torch

import hybrid
from hybrid.engine.scheduler import Engine
from hybrid.engine.generate import chat_prompt_ids
from hybrid.models.common import SlidingKVCache
from hybrid.engine.prefix_cache import PrefixCache, chain_keys
from hybrid.engine.sampling import SamplingParams

from .tiny import add_byte_tokenizer, make_tiny

BLOCK = 16
SYSTEM = ("You are a careful assistant for a small bakery. Answer in one short sentence. The bakery opens at "
          "seven, closes at six, sells rye bread, croissants, apple pie and coffee, and takes orders by phone. ") * 3


@pytest.fixture(scope="module")
def model(smollm_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield hybrid.load(smollm_path, rules="torch-cpu")
    torch.set_num_threads(threads)


def greedy(n=8):
    return SamplingParams(temperature=0, max_tokens=n)


def run(engine, prompt, n=8):
    """(generated tokens, usage) of one greedy request."""
    events = list(engine.submit(prompt, greedy(n)))
    return [e.token for e in events if e.token is not None], events[-1].usage


def cached_engine(model, budget=64 << 20, **kw):
    return Engine(model, slots=kw.pop("slots", 2), ctx=kw.pop("ctx", 1024), prefix_cache=budget,
                  prefix_block=BLOCK, **kw)


def chat(model, *turns):
    messages = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return chat_prompt_ids(model.tokenizer, messages)


def test_chain_keys_cover_everything_before_a_block():
    a = list(range(40))
    b = [99] + a[1:]                           # differs in block 0 only
    ka, kb = chain_keys(a, 8, 5), chain_keys(b, 8, 5)
    assert ka[0] != kb[0] and all(x != y for x, y in zip(ka[1:], kb[1:]))  # block 1.. equal tokens, other keys
    assert chain_keys(a + [7, 7], 8, 5) == ka  # a longer sequence with the same start: the same keys
    with pytest.raises(ValueError, match="budget must be >= 0"):
        PrefixCache(-1)


def test_greedy_outputs_identical_with_and_without_the_cache(model):
    off, on = Engine(model, slots=2, ctx=1024), cached_engine(model)
    first = chat(model, "When do you open?")
    out1, _ = run(off, first)
    assert run(on, first)[0] == out1
    answer = model.tokenizer.decode(out1)
    second = chat(model, "When do you open?", answer, "And do you sell pie?")
    ref, _ = run(off, second)
    got, usage = run(on, second)
    assert got == ref
    assert usage["cached_tokens"] >= len(first) // BLOCK * BLOCK > 0
    assert run(on, second)[0] == ref           # the whole second prompt cached: still the same answer


def test_same_greedy_output_under_the_kernel_rules(smollm_path, cpu_machine):
    """The family's CPU rule file: the numba attention reads the slot through its own views
    of the cache, which the restored blocks must reach."""
    m = hybrid.load(smollm_path)
    off, on = Engine(m, slots=1, ctx=1024), cached_engine(m, slots=1)
    first, second = chat(m, "When do you open?"), chat(m, "When do you close?")
    run(on, first)
    got, usage = run(on, second, n=12)
    assert usage["cached_tokens"] > 0 and got == run(off, second, n=12)[0]


def test_second_turn_prefills_only_the_new_tokens(model):
    engine = cached_engine(model)
    first = chat(model, "What do you sell?")
    out1, usage1 = run(engine, first, n=12)
    assert usage1["cached_tokens"] == 0 and engine.stats()["prefilled_tokens"] == len(first)
    second = chat(model, "What do you sell?", model.tokenizer.decode(out1), "How much is the coffee?")
    held = first + out1[:-1]                   # what the first request's slot held: its last token was never fed
    common = next((i for i, (x, y) in enumerate(zip(second, held)) if x != y), min(len(second), len(held)))
    expected = min(common, len(second) - 1) // BLOCK * BLOCK
    before = engine.stats()["prefilled_tokens"]
    _, usage2 = run(engine, second)
    assert usage2["cached_tokens"] == expected >= len(first) // BLOCK * BLOCK
    assert engine.stats()["prefilled_tokens"] - before == len(second) - expected
    stats = engine.stats()["prefix_cache"]
    assert stats["hits"] == 1 and stats["tokens_reused"] == expected and stats["lookups"] == 2


def test_eviction_under_a_tiny_budget_keeps_the_chain_roots(model):
    probe = cached_engine(model)
    prompt = chat(model, "Tell me about the rye bread.")
    ref, _ = run(probe, prompt)
    block_bytes = probe.prefix.stats()["bytes_used"] // probe.prefix.stats()["blocks"]
    engine = cached_engine(model, budget=3 * block_bytes)
    assert run(engine, prompt)[0] == ref
    stats = engine.stats()["prefix_cache"]
    assert stats["bytes_used"] <= 3 * block_bytes and stats["blocks"] == 3 and stats["evictions"] > 0
    got, usage = run(engine, prompt)            # the three blocks left are the first three
    assert got == ref and usage["cached_tokens"] == 3 * BLOCK
    small = cached_engine(model, budget=block_bytes // 2)   # smaller than one block: nothing is kept
    run(small, prompt)
    assert small.prefix.stats()["blocks"] == 0 and small.prefix.stats()["bytes_used"] == 0


def test_concurrent_requests_sharing_a_prefix(model):
    questions = ["When do you open?", "Do you sell croissants?", "Can I order by phone?", "Is there coffee?",
                 "When do you close?"]
    prompts = [chat(model, q) for q in questions]
    off = Engine(model, slots=2, ctx=1024)
    refs = [run(off, p)[0] for p in prompts]
    block_bytes = BLOCK * sum(c.k[0, :, 0].nbytes + c.v[0, :, 0].nbytes for c in off.cache)
    for budget in (64 << 20, 4 * block_bytes):      # ample, and one that evicts while they run
        engine = cached_engine(model, budget=budget, slots=2).start()
        try:
            streams = [engine.submit(p, greedy()) for p in prompts]   # 2 run, 3 wait and find the prefix
            outs = [list(s) for s in streams]
        finally:
            engine.stop()
        assert [[e.token for e in o if e.token is not None] for o in outs] == refs
        assert sum(o[-1].usage["cached_tokens"] for o in outs) > 0
        stats = engine.prefix.stats()
        assert stats["bytes_used"] <= budget and (stats["evictions"] > 0) == (budget < 64 << 20)


def test_differing_prefixes_never_share(model):
    engine = cached_engine(model)
    a = chat(model, "When do you open?")
    run(engine, a)
    other = list(a)
    other[1] = (other[1] + 1) % model.tokenizer.vocab_size   # one token early on differs, the rest is equal
    off = Engine(model, slots=1, ctx=1024)
    got, usage = run(engine, other)
    assert usage["cached_tokens"] == 0 and got == run(off, other)[0]
    shorter = a[:BLOCK * 2 + 3]
    assert run(engine, shorter)[1]["cached_tokens"] == BLOCK * 2   # a shared start does share


@pytest.mark.parametrize("family", ["gemma3_text", "gpt_oss"])
def test_sliding_window_rings(family, tmp_path, monkeypatch, cpu_machine):
    """Rings of 16 rows (window 8 + 8 of room) and prompts of 60+ tokens: blocks are saved while
    a prompt is prefilled chunk by chunk, and written back in order, the last ones winning."""
    monkeypatch.setattr(SlidingKVCache, "PAD_ROOM", 8)
    make_tiny(family, tmp_path)
    add_byte_tokenizer(tmp_path)
    m = hybrid.load(tmp_path, rules="torch-cpu")
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(0, 256, (60,), generator=gen).tolist()
    prompts = [base + torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 11, 23)]
    off = Engine(m, slots=2, ctx=160, prefill_chunk=8)
    on = Engine(m, slots=2, ctx=160, prefill_chunk=8, prefix_cache=8 << 20, prefix_block=4)
    assert any(isinstance(c, SlidingKVCache) and c.k.shape[2] == 16 for c in on.cache)
    for p in prompts + prompts:
        ref, _ = run(off, p, n=10)
        got, usage = run(on, p, n=10)
        assert got == ref
    assert on.prefix.stats()["hits"] == 5 and on.prefix.stats()["tokens_reused"] > 5 * 60


def test_server_reports_cached_tokens_and_metrics(model):
    from hybrid.server import create_app

    engine = cached_engine(model).start()
    try:
        client = create_app(engine).test_client()
        body = {"model": "m", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"}]}
        first = client.post("/v1/chat/completions", json=body).get_json()
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        second = client.post("/v1/chat/completions", json=body).get_json()
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == (second["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK > 0
        assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        plain = {"model": "m", "prompt": SYSTEM, "max_tokens": 2, "temperature": 0, "n": 2}
        assert client.post("/v1/completions", json=plain).get_json()["usage"]["prompt_tokens_details"] == {
            "cached_tokens": 0}
        again = client.post("/v1/completions", json=plain).get_json()["usage"]
        assert again["prompt_tokens_details"]["cached_tokens"] == (again["prompt_tokens"] - 1) // BLOCK * BLOCK > 0
        lines = client.get("/metrics").get_data(as_text=True).splitlines()
        metrics = {k: float(v) for k, v in (line.split() for line in lines if line.startswith("hybrid_prefix"))}
        assert metrics["hybrid_prefix_cache_hits_total"] == 3   # the second chat, both choices of the second text
        reused = cached + 2 * again["prompt_tokens_details"]["cached_tokens"]
        assert metrics["hybrid_prefix_cache_reused_tokens_total"] == reused
        assert metrics["hybrid_prefix_cache_budget_bytes"] == 64 << 20
        assert 0 < metrics["hybrid_prefix_cache_bytes"] <= 64 << 20
    finally:
        engine.stop()
