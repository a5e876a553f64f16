"""One weight matrix against a batch of tokens: the integer panels (panels.py) against the
decoded float tiles (batch.py), in G multiply-adds per second, taken alternately in one run.

    python scripts/bench_panels.py --types Q4_K,Q6_K --rows 768 --cols 2048 --tokens 16,32,64,128 --threads 1
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q  # noqa: E402

from hybrid.operators.kernels import panels  # noqa: E402
from hybrid.operators.kernels.batch import matmul_small  # noqa: E402
from hybrid.operators.kernels.linear import num_threads  # noqa: E402
from hybrid.operators.kernels.policy import TILE_X_BYTES  # noqa: E402


def random_blocks(qtype, rows, cols, rng):
    """Random blocks with small sane fp16 scales (every format's scale bytes rewritten)."""
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // elems, nbytes), dtype=np.uint8)
    at = {Q.Q6_K: (208,), Q.Q4_K: (0, 2), Q.Q4_1: (0, 2)}.get(qtype, (0,))
    for a in at:
        blocks[..., a:a + 2] = rng.uniform(1e-3, 1e-2, blocks.shape[:-1]).astype(np.float16).view(np.uint8).reshape(*blocks.shape[:-1], 2)
    return blocks.reshape(rows, -1)


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q4_K,Q6_K,Q8_0,Q4_0,Q4_1")
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--tokens", default="16,32,64,128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--int8", action="store_true", help="the int8 form of x (default: int16 split, VNNI)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    form = panels.INT8 if a.int8 else panels.SPLIT
    print(f"{'type':6} {'tokens':>6} {'panels':>8} {'tiles':>8} {'ratio':>6}   (G multiply-adds/s, {a.threads} thread(s))")
    with num_threads(a.threads):
        for name in a.types.split(","):
            qtype = Q[name]
            w = random_blocks(qtype, a.rows, a.cols, rng)
            for n in map(int, a.tokens.split(",")):
                x = rng.standard_normal((n, a.cols), dtype=np.float32)
                y = np.empty((n, a.rows), np.float32)
                run_p = lambda: panels.matmul_panels(int(qtype), w, x, y, a.threads, form, TILE_X_BYTES)  # noqa: E731
                run_t = lambda: matmul_small(int(qtype), w, x, y, a.threads)  # noqa: E731
                run_p(), run_t()
                tp, tt = [], []
                for _ in range(a.repeat):  # alternated
                    tp.append(best(run_p, 1))
                    tt.append(best(run_t, 1))
                ops = n * a.rows * a.cols / 1e9
                print(f"{name:6} {n:6d} {ops / min(tp):8.1f} {ops / min(tt):8.1f} {min(tt) / min(tp):6.2f}x", flush=True)


if __name__ == "__main__":
    main()
