"""hybrid: run large (MoE) language models across CPU and GPU, placed by YAML rules."""

from .checkpoint import CheckpointError
from .loader import load
from .placement import RuleError, inject

__all__ = ["load", "inject", "CheckpointError", "RuleError"]
__version__ = "0.1.0"
