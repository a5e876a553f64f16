"""How fast the decode kernels read weights from DRAM: the GEMV of one token on matrices of
256 MB (several row widths) and the fused MoE's decode step of one token on 128 experts of
768 x 2048 (top-8, two layers, experts drawn at random each step, so little is in cache),
1 and 2 threads, in GB/s of weights read. What `policy.PREFETCH_BYTES` was measured with.

    python scripts/bench_decode_reads.py [--formats Q4_0,Q4_K,Q8_0] [--widths 512,2048,8192,16384]
"""

import argparse
import time

import numpy as np
from gguf import GGMLQuantizationType as Q

from bench_kernels import best_time, random_weight
from hybrid.operators import kernels


def gemv_gbs(qtype, cols, threads, rng, total=256_000_000):
    rows = total // random_weight(qtype, (1, cols), rng).nbytes
    w = random_weight(qtype, (rows, cols), rng)
    x = rng.standard_normal(cols, dtype=np.float32)
    y = np.empty(rows, np.float32)
    return [w.nbytes / best_time(lambda t=t: kernels.gemv(qtype, w, x, out=y, threads=t), 4) / 1e9 for t in threads]


def moe_gbs(qtype, threads, rng, experts=128, inter=768, hidden=2048, top_k=8, seconds=1.0):
    layers = [tuple(random_weight(qtype, shape, rng) for shape in ((experts, inter, hidden),) * 2 + ((experts, hidden, inter),))
              for _ in range(2)]
    per_expert = sum(w[0].nbytes for w in layers[0])
    x = rng.standard_normal((1, hidden), dtype=np.float32)
    weights = np.full((1, top_k), 1 / top_k, np.float32)
    out = []
    for t in threads:
        best = 0.0
        for _ in range(4):
            start, steps = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                for gate, up, down in layers:
                    ids = rng.choice(experts, top_k, replace=False).reshape(1, top_k)
                    kernels.moe_forward(qtype, gate, qtype, up, qtype, down, x, ids, weights, threads=t)
                    steps += 1
            best = max(best, steps * top_k * per_expert / (time.perf_counter() - start) / 1e9)
        out.append(best)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="Q4_0,Q4_K,Q6_K,Q8_0,MXFP4")
    ap.add_argument("--widths", default="512,2048,8192,16384")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    threads = (1, 2)
    print("| format | kernel | 1 thread GB/s | 2 threads GB/s |\n|---|---|---:|---:|")
    for name in a.formats.split(","):
        q = Q[name]
        for cols in (int(c) for c in a.widths.split(",")):
            one, two = gemv_gbs(q, cols, threads, rng)
            print(f"| {name} | GEMV, {cols} columns | {one:.1f} | {two:.1f} |", flush=True)
        one, two = moe_gbs(q, threads, rng)
        print(f"| {name} | MoE decode, 128 x 768 x 2048, top-8 | {one:.1f} | {two:.1f} |", flush=True)


if __name__ == "__main__":
    main()
