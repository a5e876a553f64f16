"""Write a synthetic Mixtral-layout GGUF (random weights, the built-in model's tokenizer).

    python scripts/make_moe_gguf.py OUT.gguf [--layers 16 --hidden 1024 --experts 32
        --expert-width 512 --top-k 4 --qtype Q8_0]

Files are made on demand for benchmarks; never commit them."""

from __future__ import annotations

import argparse

from hybrid.defaults import default_model_path
from hybrid.synthetic import write_moe_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--expert-width", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--qtype", default="Q8_0", help="Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    path = write_moe_gguf(
        a.out, layers=a.layers, hidden=a.hidden, experts=a.experts, expert_width=a.expert_width, top_k=a.top_k,
        heads=a.heads, kv_heads=a.kv_heads, qtype=a.qtype, context=a.context, seed=a.seed,
        tokenizer_from=default_model_path(),
    )
    print(path)


if __name__ == "__main__":
    main()
