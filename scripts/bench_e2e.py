"""End-to-end decode/prefill figures of the performance issue, taken in one run.

    python scripts/bench_e2e.py [--quick] [--json FILE] [--skip-transformers]

1. the built-in model (SmolLM2-135M Q4_1): hybrid decode tokens/s against transformers
   loading the same GGUF (dequantized to float32, its own KV cache, greedy `generate`);
2. decode speed at 2,000 tokens of context against 100, with the float32 KV cache of the
   built-in rules and with `kv_dtype: float16`;
3. synthetic Mixtral-shaped MoE GGUFs (16 layers, hidden 1024, 32 experts of width 512,
   top-4) in Q8_0 and Q4_0, made on demand in a temporary directory: `hybrid bench`
   figures (prefill of 512 tokens, decode, roofline fraction against the memory read
   bandwidth measured in the same run), and for Q8_0 decode at 2,000 tokens of context
   against 100 as in 2.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import hybrid
from hybrid.cli import measure as bench
from hybrid.cli.defaults import default_model_path
from hybrid.writers.synthetic import write_moe_gguf


def decode_rate(model, context: int, steps: int, rounds: int = 3) -> float:
    """Greedy decode tokens/s after a prompt of `context` tokens: the best of `rounds` runs
    of `steps` tokens over the same positions (this VM's speed varies between runs)."""
    cache = model.new_cache(1, context + steps + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    for s in range(0, context, 512):
        logits = model.forward(ids[:, s : s + 512], [s], [0], cache)
    first = logits[:, -1].argmax(-1, keepdim=True)
    model.forward(first, [context], [0], cache)  # warm
    best = float("inf")
    for _ in range(rounds):
        token = first
        t = time.perf_counter()
        for i in range(steps):
            token = model.forward(token, [context + 1 + i], [0], cache)[:, -1].argmax(-1, keepdim=True)
        best = min(best, time.perf_counter() - t)
    return steps / best


def transformers_rate(path: str, steps: int, threads: int) -> float:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    directory, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646]])

    def run(n):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t

    run(2)
    return steps / max(1e-9, min(run(steps + 1) - run(1) for _ in range(2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps, smaller synthetic model")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    steps = 32 if args.quick else 128
    out = {"bandwidth_gbps": bench.measure_bandwidth() / 1e9}
    bandwidth = out["bandwidth_gbps"] * 1e9
    print(f"memory read bandwidth: {out['bandwidth_gbps']:.1f} GB/s")

    path = default_model_path()
    model = hybrid.load(path)
    r100, r2000 = decode_rate(model, 100, steps), decode_rate(model, 2000, steps)
    out["smollm2"] = {
        "decode_tokens_per_s": r100,
        "decode_tokens_per_s_at_2000": r2000,
        "slowdown_at_2000": 1 - r2000 / r100,
        "roofline_fraction": bench.decode_bytes_per_token(model) * r100 / bandwidth,
    }
    print(f"SmolLM2 Q4_1 decode: {r100:.1f} tok/s at 100 tokens of context, {r2000:.1f} at 2000 "
          f"({out['smollm2']['slowdown_at_2000']:.0%} slower), roofline {out['smollm2']['roofline_fraction']:.0%}")
    if not args.skip_transformers:
        threads = os.cpu_count() or 1
        tf = transformers_rate(path, steps // 2, threads)
        out["smollm2"].update(transformers_tokens_per_s=tf, speedup_vs_transformers=r100 / tf)
        print(f"transformers on the same GGUF ({threads} threads): {tf:.1f} tok/s -> hybrid is {r100 / tf:.2f}x")
        torch.set_num_threads(1)
    del model
    # The same with the KV cache in float16 (a rule kwarg): half the bytes per key.
    rules = (hybrid.inject.placement.builtin_rules_dir() / "llama-cpu.yaml").read_text().replace(
        "replace: {class: CPUDecoderLayer}", "replace: {class: CPUDecoderLayer, kwargs: {kv_dtype: float16}}")
    model = hybrid.load(path, rules=rules)
    h100, h2000 = decode_rate(model, 100, steps), decode_rate(model, 2000, steps)
    out["smollm2_kv_float16"] = {"decode_tokens_per_s": h100, "decode_tokens_per_s_at_2000": h2000, "slowdown_at_2000": 1 - h2000 / h100}
    print(f"same, float16 KV cache: {h100:.1f} tok/s at 100 tokens of context, {h2000:.1f} at 2000 ({1 - h2000 / h100:.0%} slower)")
    del model

    shape = dict(layers=8 if args.quick else 16, hidden=1024, experts=32, expert_width=512, top_k=4)
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in ("Q8_0", "Q4_0"):
            file = write_moe_gguf(os.path.join(tmp, f"moe-{qtype}.gguf"), qtype=qtype, tokenizer_from=path, **shape)
            moe = hybrid.load(file)
            r = bench.run(moe, prompt_tokens=512, gen_tokens=steps, batches=(1,), bandwidth=bandwidth)
            r["file_bytes"] = os.path.getsize(file)
            out[f"moe_{qtype}"] = r
            print(f"\nsynthetic MoE {qtype} ({r['file_bytes'] / 1e6:.0f} MB):")
            print(bench.format_result(r))
            if qtype == "Q8_0":  # the long-context figure on the MoE model too (float32 cache)
                m100, m2000 = decode_rate(moe, 100, steps), decode_rate(moe, 2000, steps)
                r.update(decode_tokens_per_s_at_100=m100, decode_tokens_per_s_at_2000=m2000, slowdown_at_2000=1 - m2000 / m100)
                print(f"decode: {m100:.1f} tok/s at 100 tokens of context, {m2000:.1f} at 2000 ({1 - m2000 / m100:.0%} slower)")
            del moe
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
