"""Where a decode step's time goes on this CPU: how fast each format's GEMV runs when the
weights are already in the last-level cache (what a core can compute) against from DRAM
(what it gets), per activation form; the fused MoE of one token over 8 experts in cache;
and, given a real-scale MoE GGUF, the reads of one decode step done piece by piece from
the file (attention projections, routers, experts, lm_head).

    python scripts/bench_decode_parts.py [--formats Q4_K,Q6_K,Q4_0,Q8_0] [--threads 1,2]
    python scripts/bench_decode_parts.py --formats "" --model qwen3moe-a3b-q4km.gguf

A format whose in-cache GB/s a core is below the machine's bandwidth divided by the cores
is compute-bound in decode: its GEMV cannot read memory faster than it computes. The
--model pieces read the file's pages first (a cold page cache would time the disk); each
piece is the best of 5, experts drawn at random each call, a numba call per piece and
layer: the sum is not the fused decode step's time (one call for the whole step), only
where its reads go.
"""

import argparse

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFReader

from bench_kernels import best_time, l3_bytes, random_weight
from hybrid.cli.measure import measure_bandwidth
from hybrid.operators import kernels
from hybrid.operators.kernels.activations import ACT_INT8, ACT_INT16
from hybrid.operators.kernels.formats import as_blocks

ACTS = {"int16": ACT_INT16, "int8": ACT_INT8}


def gemv_gbs(qtype, rows, cols, threads, acts, rng, reps):
    w = random_weight(qtype, (rows, cols), rng)
    x = rng.standard_normal(cols, dtype=np.float32)
    y = np.empty(rows, np.float32)
    return w.nbytes / best_time(lambda: kernels.gemv(qtype, w, x, out=y, threads=threads, acts=acts), reps) / 1e9


def formats_table(names, threads, rng):
    """GEMV GB/s of each format with its weights in cache (an 8 MB matrix, re-read) and from
    DRAM (four times the L3), and the fused MoE in cache, per activation form and threads."""
    dram_rows = max(4 * l3_bytes(), 256 << 20) // 2048  # ~1 byte a weight or less: rows of 2048 columns
    print("| format | activations | threads | in cache GB/s | from DRAM GB/s | fused MoE, 8 experts in cache, GB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name in names:
        q = Q[name]
        experts = [random_weight(q, shape, rng) for shape in ((8, 768, 2048), (8, 768, 2048), (8, 2048, 768))]
        x = rng.standard_normal((1, 2048), dtype=np.float32)
        ids = np.arange(8).reshape(1, 8)
        weights = np.full((1, 8), 1 / 8, np.float32)
        moe_bytes = sum(e.nbytes for e in experts)
        for an, acts in ACTS.items():
            for t in threads:
                cached = gemv_gbs(q, 4096 if q != Q.Q8_0 else 2048, 2048, t, acts, rng, 30)
                dram = gemv_gbs(q, dram_rows, 2048, t, acts, rng, 4)
                moe = moe_bytes / best_time(lambda: kernels.moe_forward(q, experts[0], q, experts[1], q, experts[2], x, ids,
                                                                        weights, threads=t, acts=acts), 30) / 1e9
                print(f"| {name} | {an} | {t} | {cached:.1f} | {dram:.1f} | {moe:.1f} |", flush=True)


def step_pieces(path, threads, rng):
    """One decode step's weight reads from a qwen3moe/llama-layout MoE GGUF, piece by piece."""
    with open(path, "rb") as f:  # fault the file into the page cache
        while f.read(1 << 26):
            pass
    reader = GGUFReader(path)
    tensors = {t.name: (int(t.tensor_type), np.asarray(t.data)) for t in reader.tensors}
    layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))
    attn = [[tensors[f"blk.{i}.attn_{p}.weight"] for p in ("q", "k", "v", "output")] for i in range(layers)]
    routers = [tensors[f"blk.{i}.ffn_gate_inp.weight"] for i in range(layers)]
    experts = [tuple(tensors[f"blk.{i}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")) for i in range(layers)]
    n_exp = experts[0][0][1].shape[0]
    top_k = next(int(f.contents()) for name, f in reader.fields.items() if name.endswith(".expert_used_count"))
    inputs = {}

    def gemv(qtype, w, t):
        cols = as_blocks(qtype, w)[2]
        x = inputs.setdefault(cols, rng.standard_normal(cols, dtype=np.float32))
        return kernels.gemv(qtype, w, x, threads=t)

    head = tensors["output.weight"]
    xm = rng.standard_normal((1, as_blocks(*experts[0][0])[2]), dtype=np.float32)
    weights = np.full((1, top_k), 1 / top_k, np.float32)
    pieces = {
        "attention projections": (lambda t: [gemv(q, w, t) for lay in attn for q, w in lay],
                                  sum(w.nbytes for lay in attn for _, w in lay)),
        "routers": (lambda t: [gemv(q, w, t) for q, w in routers], sum(w.nbytes for _, w in routers)),
        f"routed experts (top-{top_k} of {n_exp}, random)": (
            lambda t: [kernels.moe_forward(g[0], g[1], u[0], u[1], d[0], d[1], xm,
                                           rng.choice(n_exp, top_k, replace=False)[None], weights, threads=t)
                       for g, u, d in experts],
            sum((g[1].nbytes + u[1].nbytes + d[1].nbytes) // n_exp * top_k for g, u, d in experts)),
        "lm_head": (lambda t: gemv(head[0], head[1], t), head[1].nbytes),
    }
    print(f"\n{path}: {layers} layers\n\n| piece | threads | ms | MB | GB/s |\n|---|---:|---:|---:|---:|")
    for t in threads:
        total_s = total_b = 0
        for name, (fn, nbytes) in pieces.items():
            s = best_time(lambda: fn(t), 5)
            total_s, total_b = total_s + s, total_b + nbytes
            print(f"| {name} | {t} | {s * 1e3:.2f} | {nbytes / 1e6:.0f} | {nbytes / s / 1e9:.1f} |", flush=True)
        print(f"| sum | {t} | {total_s * 1e3:.2f} | {total_b / 1e6:.0f} | {total_b / total_s / 1e9:.1f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="Q4_K,Q6_K,Q4_0,Q8_0", help="comma-separated GGML types ('' for none)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--model", help="a real-scale MoE GGUF (qwen3moe or llama layout) to time piece by piece")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    threads = [int(t) for t in a.threads.split(",")]
    print(f"read bandwidth (measure_bandwidth): {measure_bandwidth() / 1e9:.1f} GB/s\n")
    if a.formats:
        formats_table(a.formats.split(","), threads, rng)
    if a.model:
        step_pieces(a.model, threads, rng)


if __name__ == "__main__":
    main()
