"""hybrid: run large (MoE) language models across CPU and GPU, placed by YAML rules."""

from . import threads as _threads

_threads.configure()  # before numba and torch load: thread count and OpenMP's wait policy

from hybrid.files.checkpoint import CheckpointError  # noqa: E402
from hybrid.inject.loader import load  # noqa: E402
from hybrid.inject.placement import RuleError, inject  # noqa: E402

__all__ = ["load", "inject", "CheckpointError", "RuleError"]
__version__ = "0.1.0"
