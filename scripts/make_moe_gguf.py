"""Write a synthetic MoE GGUF (random weights, the built-in model's tokenizer).

    python scripts/make_moe_gguf.py OUT.gguf [--arch llama --layers 16 --hidden 1024
        --experts 32 --expert-width 512 --top-k 4 --qtype Q8_0]
    python scripts/make_moe_gguf.py /work/models/qwen3moe-a3b-q4km.gguf --preset qwen3-30b-a3b --qtype Q4_K_M
    python scripts/make_moe_gguf.py /work/models/gpt-oss-20b-synthetic.gguf --preset gpt-oss-20b

--preset qwen3-30b-a3b: Qwen3-30B-A3B's architecture (`qwen3moe`) and geometry (hidden 2048,
128 experts of width 768, top-8, 32 heads / 4 kv heads of 128) with 16 of its 48 layers,
and llama-quantize's tensor types for the file type (--qtype Q4_K_M, Q8_0 or Q4_0; about
6.2, 10.8 and 5.8 GB).

--preset gpt-oss-20b: gpt-oss-20b's architecture (`gpt-oss`) and geometry (hidden 2880, 32
experts of width 2880, top-4, 64 heads / 8 kv heads of 64, a 128-token window on the even
layers, attention sinks, biases, YaRN x32 over 4,096, context 131,072) with 14 of its 24
layers, and the tensor types of ggml-org's gpt-oss-20b GGUF (MXFP4_MOE: experts MXFP4, the
other matrices Q8_0); about 6.6 GB (the built-in tokenizer's 49,152 tokens, not gpt-oss's
201,088).

Options given after a preset override it. Files are made on demand for benchmarks; never
commit them."""

from __future__ import annotations

import argparse
import os
import time

from hybrid.cli.defaults import default_model_path
from hybrid.writers.synthetic import ARCHITECTURES, write_moe_gguf

PRESETS = {
    "qwen3-30b-a3b": dict(arch="qwen3moe", layers=16, hidden=2048, experts=128, expert_width=768, top_k=8, heads=32,
                          kv_heads=4, head_dim=128, dense_width=6144, context=40960, mix=True),
    "gpt-oss-20b": dict(arch="gpt-oss", layers=14, hidden=2880, experts=32, expert_width=2880, top_k=4, heads=64,
                        kv_heads=8, head_dim=64, context=131072, qtype="MXFP4_MOE", sliding_window=128,
                        yarn=(32.0, 4096)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a real model's architecture and geometry")
    ap.add_argument("--arch", choices=ARCHITECTURES, default="llama", help="GGUF architecture (default llama: Mixtral layout)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--expert-width", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, help="default hidden / heads")
    ap.add_argument("--qtype", default="Q8_0",
                    help="a block type (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K: every matrix), Q4_K_M (llama-quantize's "
                         "mix) or MXFP4_MOE (experts MXFP4, the rest Q8_0)")
    ap.add_argument("--mix", action="store_true",
                    help="tensor types as llama-quantize gives them for --qtype (output.weight Q6_K, ...)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    defaults = vars(ap.parse_args([ap.prog]))
    a = ap.parse_args()
    kw = {k: v for k, v in vars(a).items() if k not in ("out", "preset", "seed")}
    if a.preset:  # the preset where an option was left at its default
        kw = {**kw, **{k: v for k, v in PRESETS[a.preset].items() if kw.get(k) == defaults.get(k)}}
    t = time.perf_counter()
    path = write_moe_gguf(a.out, seed=a.seed, tokenizer_from=default_model_path(), **kw)
    print(f"{path}: {os.path.getsize(path) / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
