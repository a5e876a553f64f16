"""numba CPU kernels on GGUF quantized blocks: GEMV/matmul, dequantize and the fused MoE.

Weights stay in the GGUF form: a quantized [rows, cols] matrix is uint8 [rows, row_bytes]
(one row of blocks per output row), stacked experts [E, rows, row_bytes]; F32/F16/BF16
weights are float32/float16/uint16 (bf16 bits) arrays [rows, cols].
"""

from .formats import SUPPORTED_TYPES
from .linear import Prepared, dequantize, gemv, matmul
from .moe import moe_forward

__all__ = ["SUPPORTED_TYPES", "Prepared", "dequantize", "gemv", "matmul", "moe_forward"]
