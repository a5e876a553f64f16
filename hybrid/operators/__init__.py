"""Replaceable modules that the YAML rules put in place of model modules.

`OPERATORS` maps the short names rule files use to the classes; a rule may also name
any operator by import path (e.g. `hybrid.operators.linear.CPULinear`)."""

from .attention import CPUAttention
from .embedding import CPUEmbedding
from .experts import CPUExperts
from .layer import CPUDecoderLayer, CPUDecoderStack
from .linear import CPULinear
from .mlp import CPUMLP
from .norm import CPURMSNorm
from .split import SplitExperts

OPERATORS = {
    "CPULinear": CPULinear,
    "CPUEmbedding": CPUEmbedding,
    "CPUExperts": CPUExperts,
    "CPUAttention": CPUAttention,
    "CPUMLP": CPUMLP,
    "CPURMSNorm": CPURMSNorm,
    "CPUDecoderLayer": CPUDecoderLayer,
    "CPUDecoderStack": CPUDecoderStack,
    "SplitExperts": SplitExperts,
}

__all__ = ["OPERATORS", "CPULinear", "CPUEmbedding", "CPUExperts", "CPUAttention", "CPUMLP", "CPURMSNorm", "CPUDecoderLayer",
           "CPUDecoderStack", "SplitExperts"]
