"""hybrid: run large (MoE) language models across CPU and GPU, placed by YAML rules."""

import os

# numpy's OpenBLAS keeps its own spinning thread pool; next to numba's pool on the same
# cores the two slow each other down several times over (a 40-token prefill: 2.0 s with
# both, 0.25 s with BLAS on one thread). Set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .checkpoint import CheckpointError
from .loader import load
from .rules import RuleError, inject

__all__ = ["load", "inject", "CheckpointError", "RuleError"]
__version__ = "0.1.0"
