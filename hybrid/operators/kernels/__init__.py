"""numba CPU kernels on GGUF quantized blocks: GEMV/matmul, dequantize and the fused MoE.

Weights stay in the GGUF form: a quantized [rows, cols] matrix is uint8 [rows, row_bytes]
(one row of blocks per output row), stacked experts [E, rows, row_bytes]; F32/F16/BF16
weights are float32/float16/uint16 (bf16 bits) arrays [rows, cols].

The modules, from the bottom up: intrinsics.py (the target CPU's features and the LLVM IR
building blocks), blocks.py (every block layout and its decoders, per path), formats.py (one
record per format, from which the type lists and dispatch derive), activations.py (x
rounded to integers), policy.py (the dispatch thresholds), batch.py (decoded L1 tiles),
rows.py (the row loops: GEMV, several tokens per row), panels.py (integer panels: 16 rows
against many tokens), then the kernels operators call: linear.py, moe.py, decode.py,
layer.py, and records.py, the named records (weights of an attention, an MLP, a layer)
operators hand decode.py and layer.py.

Compiled kernels are cached on disk under a directory named by a hash of this package's
sources: numba's own cache checks only the file that defines a kernel, so an edit to a
helper it inlines from another file would otherwise run stale machine code.
"""

import hashlib
import os
import shutil
import time
from pathlib import Path

import numba


def cache_dir(sources: Path) -> Path:
    """`sources`/__pycache__/numba-<hash of every .py file in `sources`>."""
    digest = hashlib.sha256()
    for source in sorted(sources.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return sources / "__pycache__" / f"numba-{digest.hexdigest()[:16]}"


def _use_source_keyed_cache() -> None:
    here = cache_dir(Path(__file__).parent)
    # In the environment too: numba rereads its settings from it when it changes (and child
    # processes inherit it).
    os.environ["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR = str(here)
    week_ago = time.time() - 7 * 24 * 3600
    for old in here.parent.glob("numba-*"):  # caches of sources not used for a week
        if old != here and old.stat().st_mtime < week_ago:
            shutil.rmtree(old, ignore_errors=True)


def _ours(directory: str) -> bool:
    return Path(directory).name.startswith("numba-") and Path(directory).parent.name == "__pycache__"


if not os.environ.get("NUMBA_CACHE_DIR") or _ours(os.environ["NUMBA_CACHE_DIR"]):  # the user's own choice wins
    _use_source_keyed_cache()

from .formats import SUPPORTED_TYPES
from .linear import Prepared, dequantize, gemv, matmul
from .moe import moe_forward, moe_warm_up

__all__ = ["SUPPORTED_TYPES", "Prepared", "dequantize", "gemv", "matmul", "moe_forward", "moe_warm_up"]
