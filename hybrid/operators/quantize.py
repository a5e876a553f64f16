"""Load-time quantization of float checkpoints (safetensors bf16/fp16) into GGUF blocks.

gguf's own quantizer is used: it is bit-exact with llama.cpp for these types and fast
enough (4096x4096 float32 in 0.1-0.3 s on 2 cores). Relative RMS error of a standard
normal matrix, ||dequant(quant(W)) - W|| / ||W|| (checked in tests/test_kernels.py):

    Q8_0  0.0054    Q5_1  0.038    Q5_0  0.043    Q4_1  0.078    Q4_0  0.086
    BF16  0.0017    F16   0.0003
"""

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import quantize as gguf_quantize

# Types a rule's `quant:` may ask for.
QUANTIZABLE = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"})
RELATIVE_RMS_ERROR = {"Q8_0": 0.0054, "Q5_1": 0.038, "Q5_0": 0.043, "Q4_1": 0.078, "Q4_0": 0.086,
                      "BF16": 0.0017, "F16": 0.0003}


def quantize(qtype, w: np.ndarray) -> np.ndarray:
    """Weight float32 [rows, cols] -> the kernels' form of `qtype`: uint8 blocks
    [rows, row_bytes], float16 [rows, cols] for F16, uint16 bf16 bits for BF16."""
    qtype = Q(qtype)
    if qtype.name not in QUANTIZABLE:
        raise NotImplementedError(f"quantizing to {qtype.name} is not supported; choose one of {sorted(QUANTIZABLE)}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    block = GGML_QUANT_SIZES[qtype][0]
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"{qtype.name} needs a 2-D weight with columns in multiples of {block}, got {w.shape}")
    if qtype == Q.F16:
        return w.astype(np.float16)
    out = gguf_quantize(w, qtype)
    return out.view(np.uint16) if qtype == Q.BF16 else out
