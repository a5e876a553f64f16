"""GEMV speed of each activation form, per format, one core: float, int16, the VNNI split
int16 (where the CPU has VNNI) and int8, on a weight in L2 (512 x 1024) and one in DRAM
(4096 x 4096), in G weights/s, all forms in one run (compare within a row).

    python scripts/bench_activations.py            # the host's kernels
    NUMBA_CPU_NAME=haswell python scripts/bench_activations.py   # the AVX2-only kernels
"""

from __future__ import annotations

import time

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from hybrid.operators.kernels.activations import quantize_rows
from hybrid.operators.kernels.formats import as_blocks
from hybrid.operators.kernels.intrinsics import HAS_AVX2, HAS_VNNI
from hybrid.operators.kernels.rows import gemv_rows


@numba.njit(nogil=True)
def _run(t, w, xa, y, reps):
    for _ in range(reps):
        gemv_rows(t, w, xa, 0, 0, w.shape[0], y)


def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random blocks with small fp16 scales at the format's scale offsets."""
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // elems, nbytes), dtype=np.uint8)
    for at in {Q.Q6_K: (208,), Q.Q4_K: (0, 2), Q.Q4_1: (0, 2)}.get(qtype, (0,)):
        blocks[..., at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"VNNI kernels: {HAS_VNNI}, AVX2 kernels: {HAS_AVX2}, numba CPU: {numba.config.CPU_NAME or 'host'}")
    print(f"{'format':<6} {'rows x cols':>11}  " + "  ".join(f"{n:>6}" for n in ("float", "int16", "split", "int8")))
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K):
        for rows, cols, reps in ((512, 1024, 400), (4096, 4096, 8)):
            t, w, _ = as_blocks(qtype, random_blocks(qtype, rows, cols, rng))
            x = rng.standard_normal((1, cols), dtype=np.float32)
            y = np.zeros(rows, np.float32)
            forms = {
                "float": quantize_rows(x, False),
                "int16": quantize_rows(x, True, False),
                "split": quantize_rows(x, True, True) if HAS_VNNI else None,
                "int8": quantize_rows(x, True, False, True),
            }
            speed = {}
            for _ in range(5):  # rounds, the forms interleaved
                for name, xa in forms.items():
                    if xa is None:
                        continue
                    _run(t, w, xa, y, 1)
                    t0 = time.perf_counter()
                    _run(t, w, xa, y, reps)
                    speed[name] = max(speed.get(name, 0.0), rows * cols * reps / (time.perf_counter() - t0) / 1e9)
            cells = "  ".join(f"{speed[n]:6.1f}" if n in speed else f"{'-':>6}" for n in forms)
            print(f"{qtype.name:<6} {rows:>5}x{cols:<5}  {cells}", flush=True)


if __name__ == "__main__":
    main()
