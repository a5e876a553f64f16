"""Many tokens against one weight, one core: the decoded float32 L1 tiles (batch.py) against
the 16-row panels (panels.py) on the split int16 x (VNNI) and on the int8 x, in G
multiply-adds/s, all in one run (compare within a row). The shapes are the real-scale MoE's
(Qwen3-30B-A3B geometry): an expert's gate/up (768 x 2048) and down (2048 x 768), the
attention's q projection (4096 x 2048); the token counts those of a 512-token prefill's
experts (~32 tokens each, top-8 of 128) and projections.

    python scripts/bench_panels.py [--qtype Q4_K] [--tokens 16,32,64,512]
    NUMBA_CPU_NAME=haswell python scripts/bench_panels.py     # AVX2: int8 panels only
"""

from __future__ import annotations

import argparse

import numba
import numpy as np
from gguf import GGMLQuantizationType as Q

from hybrid.operators.kernels import batch, panels
from hybrid.operators.kernels.activations import ACT_INT8, ACT_INT16
from hybrid.operators.kernels.intrinsics import HAS_VNNI, HAS_VNNI512
from hybrid.writers.synthetic import random_blocks

from bench_kernels import best_time  # scripts/, beside this file

SHAPES = ((768, 2048), (2048, 768), (4096, 2048))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qtype", default="Q4_K", help="a format with panels: Q4_K, Q4_0, Q4_1, Q8_0")
    ap.add_argument("--tokens", default="16,32,64,512")
    args = ap.parse_args()
    qtype = Q[args.qtype]
    t = int(qtype)
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"VNNI: {HAS_VNNI} (512-bit: {HAS_VNNI512}), numba CPU: {numba.config.CPU_NAME or 'host'}, one thread, "
          f"G multiply-adds/s")
    print(f"| {qtype.name} rows x cols | tokens | float tiles | panels, int16 split | panels, int8 |")
    print("|---|---:|---:|---:|---:|")
    for rows, cols in SHAPES:
        w = random_blocks(qtype, (rows, cols), rng, 0.02)
        for n in (int(v) for v in args.tokens.split(",")):
            x = rng.standard_normal((n, cols), dtype=np.float32)
            y = np.empty((n, rows), np.float32)
            cells = [best_time(lambda: batch.matmul_small(t, w, x, y, 1), 7)]
            for mode in (ACT_INT16, ACT_INT8):
                if panels.panel_form(t, mode):
                    cells.append(best_time(lambda: panels.matmul_panels(t, w, x, y, 1, mode), 7))
                else:
                    cells.append(None)
            macs = rows * cols * n / 1e9
            shown = " | ".join("-" if c is None else f"{macs / c:.1f}" for c in cells)
            print(f"| {rows} x {cols} | {n} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
