"""Grammar engines compared: llguidance and xgrammar, per-token mask cost and JSON Schema features.

For each vocabulary (the built-in model's 49k tokens, and a synthetic 152k vocabulary: the
49k tokens plus concatenations of two of them, Qwen-sized) and each schema, a valid
document is tokenized, then fed token by token: each step computes the full-vocabulary
allowed-token bitmask and commits the token. Reported: compile time, and the mask time
per token (mean and p95), single-threaded, CPU only.

Features: each schema is also sampled with random allowed tokens (several seeds) and
the documents are checked with `jsonschema`.

    PYTHONPATH=$PWD python scripts/bench_grammar.py [--model SmolLM2.gguf] [--samples 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

SCHEMAS = {
    "enum+nullable": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "note": {"type": ["string", "null"], "maxLength": 20}},
        "required": ["color", "note"], "additionalProperties": False},
    "array bounds": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                        "required": ["city"], "additionalProperties": False}},
            "required": ["name", "age", "address"], "additionalProperties": False}},
        "required": ["person"], "additionalProperties": False},
}
DOCS = {
    "enum+nullable": {"color": "green", "note": None},
    "array bounds": {"tags": ["alpha", "beta", "gamma"]},
    "nested": {"person": {"name": "Ada Lovelace", "age": 36, "address": {"city": "London"}}},
}


def smollm_vocab(path: str):
    from hybrid.files.tokenizer import Tokenizer, gguf_metadata

    tok = Tokenizer.from_gguf(gguf_metadata(path))
    return [tok.token_bytes(i) for i in range(tok.vocab_size)], sorted(tok.stop_ids)


def synthetic_vocab(base: list[bytes], size: int, seed: int = 0):
    """`base` plus distinct concatenations of two base tokens, up to `size` entries."""
    rng = random.Random(seed)
    plain = [b for b in base if b and not b.startswith(b"<")]
    seen, out = set(base), list(base)
    while len(out) < size:
        t = rng.choice(plain) + rng.choice(plain)
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


class LLG:
    name = "llguidance"

    def __init__(self, vocab, stops):
        import llguidance
        from llguidance import TokenizerWrapper

        self.llg = llguidance

        vocab = [b"\xff" + t if i in stops else t for i, t in enumerate(vocab)]   # llguidance marks specials so

        class Words:
            eos_token_id, bos_token_id, tokens, special_token_ids = stops[0], None, vocab, stops

            def __init__(self, encode):
                self.encode = encode

            def __call__(self, s: bytes):
                return self.encode(s)

        # llguidance tokenizes forced text with the wrapper; here a greedy longest-match over the
        # vocabulary stands in for the model's tokenizer (built from a first, bare instance)
        greedy = llguidance.LLTokenizer(TokenizerWrapper(Words(lambda s: [])), eos_token=stops)
        self.tok = llguidance.LLTokenizer(
            TokenizerWrapper(Words(lambda s: greedy.greedy_tokenize(s.decode("utf-8", "replace")))), eos_token=stops)
        self.V = len(vocab)

    def compile(self, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
        m = self.llg.LLMatcher(self.tok, grammar)
        assert not m.is_error(), m.get_error()
        return m

    def tokenize(self, text: str):
        return self.tok.greedy_tokenize(text)

    def mask(self, m):
        return np.frombuffer(m.compute_bitmask(), dtype=np.uint8)

    def accept(self, m, t):
        assert m.consume_token(t), m.get_error()


class XGR:
    name = "xgrammar"

    def __init__(self, vocab, stops):
        import torch
        import xgrammar as xgr

        self.xgr, self.torch = xgr, torch
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=stops)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.bitmask = xgr.allocate_token_bitmask(1, len(vocab))
        self.V = len(vocab)

    def compile(self, schema):
        g = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        return self.xgr.GrammarMatcher(g)

    def mask(self, m):
        m.fill_next_token_bitmask(self.bitmask)
        return self.bitmask.numpy().view(np.uint8)[0]

    def accept(self, m, t):
        assert m.accept_token(t)


def allowed(mask_bytes: np.ndarray, V: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask_bytes, bitorder="little")[:V])


def timing(engine, schema, tokens):
    t0 = time.perf_counter()
    m = engine.compile(schema)
    compile_ms = (time.perf_counter() - t0) * 1e3
    steps = []
    for t in tokens:
        t0 = time.perf_counter()
        engine.mask(m)
        steps.append((time.perf_counter() - t0) * 1e6)
        engine.accept(m, t)
    return compile_ms, steps


def sample(engine, schema, seed, stops, limit=200):
    """A document drawn with uniformly random allowed tokens (a harsh test: no model prior),
    preferring to stop when stopping is allowed."""
    rng = random.Random(seed)
    m, out = engine.compile(schema), []
    for _ in range(limit):
        ids = allowed(engine.mask(m), engine.V)
        ends = [i for i in ids if i in stops]
        if ends:
            break
        t = int(rng.choice(ids))
        engine.accept(m, t)
        out.append(t)
    else:
        return None
    return out


def pick_cost(path: str, schema: dict, steps: int = 60):
    """hybrid's own per-token cost on the built-in vocabulary, on random logits at
    temperature 1: a plain draw, and Constraint.pick (mask, draw, and the closing walk when
    near the max_tokens budget) plus accept."""
    import torch

    from hybrid.engine.grammar import Constraint, json_schema_grammar
    from hybrid.engine.sampling import Sampler, SamplingParams
    from hybrid.files.tokenizer import Tokenizer, gguf_metadata

    torch.set_num_threads(1)   # as the engine's sampling runs on a busy machine; one thread is steadier
    tok = Tokenizer.from_gguf(gguf_metadata(path))
    grammar = json_schema_grammar(schema)
    Constraint(tok, grammar)   # builds llguidance's tokenizer once
    g = torch.Generator().manual_seed(0)
    plain, times = Sampler(SamplingParams(temperature=1.0, seed=0), [1]), []
    for _ in range(steps):     # the same draw without a grammar: the baseline
        logits = torch.randn(tok.vocab_size, generator=g) * 3
        t0 = time.perf_counter()
        plain(logits)
        times.append((time.perf_counter() - t0) * 1e6)
    out = {"unconstrained draw (baseline)": (statistics.median(times), steps)}
    for label, remaining in (("far from max_tokens", 10_000), ("within the closing window", 64)):
        c, sampler, times = Constraint(tok, grammar), Sampler(SamplingParams(temperature=1.0, seed=0), [1]), []
        for i in range(steps):
            logits = torch.randn(tok.vocab_size, generator=g) * 3
            t0 = time.perf_counter()
            t = c.pick(sampler, logits, max(2, remaining - i)).token
            c.accept(t)
            times.append((time.perf_counter() - t0) * 1e6)
            if c.done:
                break
        out[label] = (statistics.median(times), len(times))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF whose vocabulary is used (default: the built-in SmolLM2)")
    ap.add_argument("--samples", type=int, default=5, help="random documents per schema and engine")
    args = ap.parse_args()
    import jsonschema

    from hybrid.cli.defaults import default_model_path

    base, stops = smollm_vocab(args.model or default_model_path())
    vocabs = {f"{len(base) // 1000}k": base, "152k": synthetic_vocab(base, 152_064)}
    for vname, vocab in vocabs.items():
        engines = [LLG(vocab, stops), XGR(vocab, stops)]
        decode = lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", "replace")  # noqa: E731
        for sname, schema in SCHEMAS.items():
            tokens = engines[0].tokenize(json.dumps(DOCS[sname], separators=(",", ":")))
            for e in engines:
                compile_ms, steps = timing(e, schema, tokens)
                valid = 0
                for seed in range(args.samples):
                    ids = sample(e, schema, seed, set(stops))
                    try:
                        jsonschema.validate(json.loads(decode(ids)), schema) if ids is not None else None
                        valid += ids is not None
                    except (ValueError, jsonschema.ValidationError):
                        pass
                steps.sort()
                print(f"{vname:>5} {sname:<14} {e.name:<10} compile {compile_ms:7.1f} ms  "
                      f"mask/token mean {statistics.mean(steps):7.1f} us  p95 {steps[int(0.95 * len(steps))]:7.1f} us"
                      f"  ({len(tokens)} tokens)  random samples valid {valid}/{args.samples}")
    _report_pick(args.model or default_model_path())


def _report_pick(path):
    for label, (mean, n) in pick_cost(path, SCHEMAS["nested"]).items():
        print(f"  49k nested         hybrid sampling, {label}: median {mean:7.1f} us/token ({n} tokens)")


if __name__ == "__main__":
    main()
