"""Benchmark the numba kernels against this machine's memory bandwidth and torch.

    python scripts/bench_kernels.py [--quick] [--json out.json] [--threads N]

Prints markdown tables: read bandwidth, GEMV GB/s per format (weights read / time, on
matrices far larger than the caches), fused-MoE decode against its separate GEMVs and
against torch on dequantized bf16/fp32 weights, and batch/prefill throughput.
"""

import argparse
import json
import time
from pathlib import Path

import numba
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from hybrid.cli.measure import measure_bandwidth
from hybrid.operators import kernels
from hybrid.operators.kernels.linear import num_threads

# fp16 scale offsets inside each block: random bytes elsewhere are valid weights.
SCALES = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
          Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
GEMV_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.MXFP4, Q.F16, Q.BF16, Q.F32]


def random_weight(qtype, shape, rng):
    """Random weight (..., rows, cols) in the kernels' form; values are irrelevant to speed
    but kept finite and normal (denormals would slow the FPU)."""
    if qtype in (Q.F32, Q.F16):
        return rng.standard_normal(shape, dtype=np.float32).astype(np.float16 if qtype == Q.F16 else np.float32)
    if qtype == Q.BF16:
        return (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // elems, nbytes), dtype=np.uint8)
    if qtype == Q.MXFP4:  # an E8M0 scale byte: 2^(e - 127), here 2^-8
        blocks[..., 0] = 119
        return blocks.reshape(*shape[:-1], -1)
    scale = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    for at in SCALES[qtype]:
        blocks[..., at:at + 2] = scale
    return blocks.reshape(*shape[:-1], -1)


def l3_bytes() -> int:
    """The last-level cache the OS reports for CPU 0 (0 if it reports none)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
    return max(sizes, default=0)


def rotating_ids(experts, top_k):
    """ids() -> int [1, top_k]: each call the next top_k of the experts, so consecutive
    calls read different weights (all the experts are more than most last-level caches)."""
    turns = [np.arange(i, i + top_k)[None] % experts for i in range(0, experts, top_k)]
    calls = iter(range(1 << 62))
    return lambda: turns[next(calls) % len(turns)]


def best_time(fn, reps):
    """Best of `reps` runs after a warm-up: other processes only ever make a run slower."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bandwidth(nbytes, reps, rng):
    """Best streaming read seen: numpy's sum (one thread) or `measure_bandwidth` (the F16 and
    Q8_0 GEMVs on `nbytes` with all threads, ~1 instruction per byte; a plain numba parallel
    sum is compute-bound here and reads slower than either)."""
    a = np.ones(nbytes // 4, np.float32)
    numpy_gbs = a.nbytes / best_time(a.sum, reps) / 1e9
    del a
    gemv_gbs = measure_bandwidth(nbytes, reps) / 1e9  # the figure `hybrid bench` uses too
    return {"numpy_sum_GBs": numpy_gbs, "gemv_GBs": gemv_gbs, "bandwidth_GBs": max(numpy_gbs, gemv_gbs)}


def bench_gemv(qtype, total_bytes, cols, reps, rng):
    rows = max(2, total_bytes // random_weight(qtype, (1, cols), rng).nbytes)
    w = random_weight(qtype, (rows, cols), rng)
    x = rng.standard_normal(cols, dtype=np.float32)
    y = np.empty(rows, np.float32)
    dt = best_time(lambda: kernels.gemv(qtype, w, x, out=y), reps)
    # one thread: what one core decodes (below the bandwidth: the kernel is compute-bound)
    dt1 = best_time(lambda: kernels.gemv(qtype, w, x, out=y, threads=1), max(2, reps // 4))
    return {"type": qtype.name, "shape": [rows, cols], "MB": w.nbytes / 1e6, "ms": dt * 1e3, "GBs": w.nbytes / dt / 1e9,
            "GBs_1_thread": w.nbytes / dt1 / 1e9}


def bench_moe(shape, reps, prefill_tokens, rng):
    experts, top_k, hidden, inter = shape["experts"], shape["top_k"], shape["hidden"], shape["inter"]
    tg, td = Q.Q4_K, Q.Q6_K  # Q4_K_M: Q4_K gate/up, Q6_K down
    gate = random_weight(tg, (experts, inter, hidden), rng)
    up = random_weight(tg, (experts, inter, hidden), rng)
    down = random_weight(td, (experts, hidden, inter), rng)
    x = rng.standard_normal((1, hidden), dtype=np.float32)
    next_ids = rotating_ids(experts, top_k)  # Mixtral's 8 experts: 4x the active bytes
    w = np.full((1, top_k), 1 / top_k, np.float32)
    active = top_k * (gate[0].nbytes + up[0].nbytes + down[0].nbytes)
    res = {"shape": shape, "active_MB": active / 1e6}

    fused = best_time(lambda: kernels.moe_forward(tg, gate, tg, up, td, down, x, next_ids(), w), reps)
    h = rng.standard_normal(inter, dtype=np.float32)

    def separate():
        for e in next_ids()[0]:
            kernels.gemv(tg, gate[e], x[0])
            kernels.gemv(tg, up[e], x[0])
            kernels.gemv(td, down[e], h)
    split = best_time(separate, reps)
    res.update(fused_ms=fused * 1e3, gemvs_ms=split * 1e3, fused_GBs=active / fused / 1e9)

    xt = torch.from_numpy(x)
    for dtype in (torch.bfloat16, torch.float32):
        ws = [[torch.from_numpy(kernels.dequantize(t, a[e])).to(dtype) for t, a in ((tg, gate), (tg, up), (td, down))]
              for e in range(top_k)]  # two experts only: the dequantized copies are 2-4x the blocks
        xd = xt.to(dtype)

        def torch_moe():
            out = torch.zeros_like(xd)
            for g, u, d in ws:
                out += torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(xd, g))
                                                  * torch.nn.functional.linear(xd, u), d) / top_k
            return out
        with torch.inference_mode():
            res[f"torch_{str(dtype)[6:]}_ms"] = best_time(torch_moe, reps) * 1e3
        ws = None  # free before the next dtype

    for n in prefill_tokens:
        xs = rng.standard_normal((n, hidden), dtype=np.float32)
        ids_n = np.stack([rng.permutation(experts)[:top_k] for _ in range(n)])
        wn = np.full((n, top_k), 1 / top_k, np.float32)
        dt = best_time(lambda: kernels.moe_forward(tg, gate, tg, up, td, down, xs, ids_n, wn), 2)
        res[f"prefill_{n}_tok_s"] = n / dt
    return res


def bench_moe_mxfp4(shape, reps, rng):
    """Decode of one token through a gpt-oss expert layer as its rule files run it: MXFP4
    gate, up and down, expert biases, the clamped SwiGLU; each call the next top_k experts
    (gpt-oss-120b's 128 experts are 32x the active bytes); GB/s of the expert blocks read."""
    experts, top_k, hidden, inter = shape["experts"], shape["top_k"], shape["hidden"], shape["inter"]
    gate = random_weight(Q.MXFP4, (experts, inter, hidden), rng)
    up = random_weight(Q.MXFP4, (experts, inter, hidden), rng)
    down = random_weight(Q.MXFP4, (experts, hidden, inter), rng)
    bias = (rng.standard_normal((experts, inter), dtype=np.float32), rng.standard_normal((experts, inter), dtype=np.float32),
            rng.standard_normal((experts, hidden), dtype=np.float32))
    x = rng.standard_normal((1, hidden), dtype=np.float32)
    w = np.full((1, top_k), 1 / top_k, np.float32)
    next_ids = rotating_ids(experts, top_k)
    active = top_k * (gate[0].nbytes + up[0].nbytes + down[0].nbytes)
    dt = best_time(lambda: kernels.moe_forward(Q.MXFP4, gate, Q.MXFP4, up, Q.MXFP4, down, x, next_ids(), w,
                                               bias=bias, glu=(7.0, 1.702)), reps)
    return {"shape": shape, "active_MB": active / 1e6, "ms": dt * 1e3, "GBs": active / dt / 1e9}


def bench_batches(qtype, rows, cols, batches, reps, rng):
    w = random_weight(qtype, (rows, cols), rng)
    out = {}
    for n in batches:
        x = rng.standard_normal((n, cols), dtype=np.float32)
        out[n] = n / best_time(lambda: kernels.matmul(qtype, w, x), reps)
    return {"type": qtype.name, "shape": [rows, cols], "tokens_per_s": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--threads", type=int, default=None, help="numba threads (default: all cores)")
    ap.add_argument("--matrix-mb", type=int, default=None,
                    help="size of each GEMV matrix (default: twice the last-level cache, at least 96 MiB)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    # Many short runs, best taken: on a shared machine, some runs get both cores.
    reps = 5 if args.quick else 20
    # Larger than the last-level cache, or the GEMVs read from it (a VM may report a host's
    # several-hundred-MB L3).
    total = (64 << 20) if args.quick else max(96 << 20, 2 * l3_bytes())
    if args.matrix_mb:
        total = args.matrix_mb << 20
    moe_shape = ({"experts": 8, "top_k": 2, "hidden": 2048, "inter": 5632} if args.quick
                 else {"experts": 8, "top_k": 2, "hidden": 4096, "inter": 14336})  # Mixtral-8x7B layer
    prefill = (32, 128) if args.quick else (128, 512)
    with num_threads(args.threads):
        torch.set_num_threads(numba.get_num_threads())
        res = {"threads": numba.get_num_threads(), "quick": args.quick}
        res["bandwidth"] = bandwidth(1 << 30, max(3, reps // 4), rng)
        bw = res["bandwidth"]["bandwidth_GBs"]
        res["gemv"] = [bench_gemv(t, total, 4096, reps, rng) for t in GEMV_TYPES]
        res["moe"] = bench_moe(moe_shape, reps, prefill, rng)
        mx_shape = ({"experts": 16, "top_k": 4, "hidden": 1024, "inter": 1024} if args.quick
                    else {"experts": 128, "top_k": 4, "hidden": 2880, "inter": 2880})  # gpt-oss-120b's experts
        res["moe_mxfp4"] = bench_moe_mxfp4(mx_shape, reps, rng)
        res["batches"] = bench_batches(Q.Q4_K, 4096 if args.quick else 14336, 4096, (1, 2, 4, 8, 16, 32, 128, 512), 3, rng)

    print(f"\nthreads: {res['threads']}; read bandwidth: numpy sum {res['bandwidth']['numpy_sum_GBs']:.1f} GB/s, "
          f"F16 and Q8_0 GEMVs on 1 GB {res['bandwidth']['gemv_GBs']:.1f} GB/s -> {bw:.1f} GB/s\n")
    print("| format | matrix | MB | GEMV ms | GB/s | % of bandwidth | GB/s, 1 thread |\n|---|---|---|---|---|---|---|")
    for g in res["gemv"]:
        print(f"| {g['type']} | {g['shape'][0]}x{g['shape'][1]} | {g['MB']:.0f} | {g['ms']:.2f} | {g['GBs']:.1f} "
              f"| {100 * g['GBs'] / bw:.0f}% | {g['GBs_1_thread']:.1f} |")
    m = res["moe"]
    s = m["shape"]
    print(f"\nMoE layer E={s['experts']} top-{s['top_k']} H={s['hidden']} I={s['inter']}, Q4_K gate/up + Q6_K down, "
          f"{m['active_MB']:.0f} MB of active experts per token\n")
    print("| decode, 1 token | ms | vs fused |\n|---|---|---|")
    for name, key in (("fused moe_forward", "fused_ms"), ("separate GEMVs", "gemvs_ms"),
                      ("torch bf16 linear", "torch_bfloat16_ms"), ("torch fp32 linear", "torch_float32_ms")):
        print(f"| {name} | {m[key]:.2f} | {m[key] / m['fused_ms']:.2f}x |")
    print(f"\nfused decode: {m['fused_GBs']:.1f} GB/s ({100 * m['fused_GBs'] / bw:.0f}% of bandwidth)")
    mx = res["moe_mxfp4"]
    s = mx["shape"]
    print(f"MXFP4 MoE layer E={s['experts']} top-{s['top_k']} H={s['hidden']} I={s['inter']} (biases, clamped SwiGLU), "
          f"{mx['active_MB']:.0f} MB of active experts per token: decode {mx['ms']:.2f} ms, {mx['GBs']:.1f} GB/s "
          f"({100 * mx['GBs'] / bw:.0f}% of bandwidth)")
    print("\n| MoE prefill tokens | tokens/s |\n|---|---|")
    for n in prefill:
        print(f"| {n} | {m[f'prefill_{n}_tok_s']:.1f} |")
    b = res["batches"]
    print(f"\n{b['type']} {b['shape'][0]}x{b['shape'][1]} matmul\n\n| tokens | tokens/s |\n|---|---|")
    for n, tps in b["tokens_per_s"].items():
        print(f"| {n} | {tps:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
