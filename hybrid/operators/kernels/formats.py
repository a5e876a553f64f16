"""The table of GGML formats the kernels take: one `Format` record per type, from which every
type list and every per-format dispatch derive (rows.py builds its row kernels from it,
activations.py and `gemm_takes` read its lists).

A record names the format's block routine on each path (blocks.py; None where the format
has no such path) and the element type its float and int16 routines read the row as:
- float: every format (F32 takes a plain dot, `float_block` None);
- int16: x rounded to int16 per 32-block (`quantize_rows`), Q8_0, Q4_0, MXFP4, Q4_K, Q6_K (Q4_1
  gained nothing there: SmolLM2's step 7.20 vs 7.11 ms);
- vnni: the int16 x split in bytes, two vpdpbusd a block, where the CPU has VNNI (`HAS_VNNI`);
- int8: x rounded to int8 (`quantize_rows(..., int8=True)`), on any x86-64 CPU;
- gemm_vnni, gemm_int8: the 32-weight block as bytes (`W8`), unpacked once per row block and
  dotted with several tokens (`gemm_rows`), on the split int16 or the int8 x;
- panel: 16 rows unpacked per 256 columns and dotted with many tokens (panels.py), on the
  split int16 x with VNNI and on the int8 x (whatever row paths the format has); `wide`
  formats (bytes up to 255) take the int8 panels only with VNNI (AVX2's vpmaddubsw would
  saturate).

Type codes are GGML's own numbers, so a kernel can branch on int(qtype).
"""

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from .blocks import (
    W8, W8_MXFP4, W8_Q4_0, W8_Q4_1, W8_Q8_0, W8_Q8_0_SIGNED, BlockDot, _acc_bf16, _acc_f16, _acc_mxfp4, _acc_q4_0,
    _acc_q4_1, _acc_q4_k, _acc_q5_0, _acc_q5_1, _acc_q5_k, _acc_q6_k, _acc_q8_0, _i8_q4_k, _i8_q6_k, _int_mxfp4,
    _int_q4_0, _int_q4_k, _int_q6_k, _int_q8_0, _vnni_q4_k, int8_of, vnni_of,
)
from .intrinsics import HAS_VNNI


@dataclass(frozen=True)
class Format:
    """One GGML type as the kernels know it."""

    qtype: Q
    view: type  # element type the float and int16 block routines read the row as (their `v`)
    float_block: object = None  # `_acc_<fmt>`; None: F32's plain dot
    int16_block: object = None  # `_int_<fmt>`
    vnni: BlockDot | None = None  # `_vnni_<fmt>` and its offset factor
    int8: BlockDot | None = None  # `_i8_<fmt>` and its offset factor
    gemm_vnni: W8 | None = None  # the block for `gemm_rows` on the split int16 x
    gemm_int8: W8 | None = None  # ... on the int8 x
    dtype: type | None = None  # float formats: the numpy dtype of their arrays
    panel: bool = False  # the integer panels (panels.py) take it
    wide: bool = False  # its panel bytes go up to 255

    @property
    def code(self) -> int:
        return int(self.qtype)

    @property
    def elems(self) -> int:
        """Weights per block (float formats: 32, the float path's block)."""
        n = GGML_QUANT_SIZES[self.qtype][0]
        return 32 if n == 1 else n

    @property
    def nbytes(self) -> int:
        """Bytes per block (as `elems`)."""
        n, nbytes = GGML_QUANT_SIZES[self.qtype]
        return 32 * nbytes if n == 1 else nbytes


# In the order of the per-format dispatch chains (the last format takes what the others
# do not: F32 on the float path).
FORMATS = (
    Format(Q.Q8_0, np.int8, _acc_q8_0, _int_q8_0, vnni_of(W8_Q8_0), int8_of(W8_Q8_0_SIGNED), W8_Q8_0, W8_Q8_0_SIGNED,
           panel=True, wide=True),
    Format(Q.Q4_0, np.uint8, _acc_q4_0, _int_q4_0, vnni_of(W8_Q4_0), int8_of(W8_Q4_0), W8_Q4_0, W8_Q4_0, panel=True),
    Format(Q.MXFP4, np.uint8, _acc_mxfp4, _int_mxfp4, vnni_of(W8_MXFP4), int8_of(W8_MXFP4), W8_MXFP4, W8_MXFP4,
           panel=True),
    Format(Q.Q4_1, np.uint8, _acc_q4_1, None, vnni_of(W8_Q4_1), int8_of(W8_Q4_1), W8_Q4_1, W8_Q4_1, panel=True),
    Format(Q.Q5_0, np.uint8, _acc_q5_0, panel=True),
    Format(Q.Q5_1, np.uint8, _acc_q5_1),
    Format(Q.Q4_K, np.uint8, _acc_q4_k, _int_q4_k, BlockDot(_vnni_q4_k), BlockDot(_i8_q4_k), panel=True),
    Format(Q.Q5_K, np.uint8, _acc_q5_k),
    Format(Q.Q6_K, np.int8, _acc_q6_k, _int_q6_k, None, BlockDot(_i8_q6_k), panel=True),
    Format(Q.F16, np.uint16, _acc_f16, dtype=np.float16),
    Format(Q.BF16, np.uint16, _acc_bf16, dtype=np.uint16),  # bf16 bits
    Format(Q.F32, np.float32, dtype=np.float32),
)
BY_CODE = {f.code: f for f in FORMATS}

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16, MXFP4 = (
    int(t) for t in (Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.BF16, Q.MXFP4)
)
SUPPORTED_TYPES = frozenset(f.qtype for f in FORMATS)
FLOAT_DTYPES = {f.qtype: f.dtype for f in FORMATS if f.dtype is not None}
# Type codes per path (tuples: numba's `t in ...`).
INT8_TYPES = tuple(f.code for f in FORMATS if f.int8)
INT16_TYPES = tuple(f.code for f in FORMATS if f.int16_block)
VNNI_TYPES = tuple(f.code for f in FORMATS if f.vnni) if HAS_VNNI else ()
# Formats whose GEMV takes x rounded to int16 (on the int16 or the VNNI path).
INT_TYPES = INT16_TYPES + tuple(t for t in VNNI_TYPES if t not in INT16_TYPES)
# Formats `gemm_rows` takes, on the split int16 x (VNNI) and on the int8 x.
MULTI_TYPES = tuple(f.code for f in FORMATS if f.gemm_vnni) if HAS_VNNI else ()
MULTI8_TYPES = tuple(f.code for f in FORMATS if f.gemm_int8)
# Formats the integer panels take, on the split int16 x (VNNI) and on the int8 x.
PANEL_TYPES = tuple(f.code for f in FORMATS if f.panel)
PANEL8_TYPES = tuple(f.code for f in FORMATS if f.panel and (HAS_VNNI or not f.wide))


def block_shape(qtype: Q) -> tuple[int, int]:
    """(weights, bytes) of one block."""
    return GGML_QUANT_SIZES[Q(qtype)]


def as_blocks(qtype, w: np.ndarray) -> tuple[int, np.ndarray, int]:
    """(type code, uint8 view [..., rows, row_bytes], cols) of a weight in the kernels' form.

    Quantized weights are GGUF blocks already; float weights are viewed (not copied) as bytes.
    """
    qtype = Q(qtype)
    if qtype not in SUPPORTED_TYPES:
        raise NotImplementedError(f"no CPU kernel for {qtype.name}; supported: {sorted(t.name for t in SUPPORTED_TYPES)}")
    if qtype in FLOAT_DTYPES:
        if w.dtype != FLOAT_DTYPES[qtype]:
            raise TypeError(f"{qtype.name} weight must be {np.dtype(FLOAT_DTYPES[qtype]).name}, got {w.dtype}")
        cols = w.shape[-1]
        if cols % 32:
            raise ValueError(f"{qtype.name} kernels need columns in multiples of 32, got {cols}")
        w = np.ascontiguousarray(w).view(np.uint8)
    else:
        if w.dtype != np.uint8:
            raise TypeError(f"{qtype.name} weight must be uint8 GGUF blocks, got {w.dtype}")
        n, nbytes = block_shape(qtype)
        if w.shape[-1] % nbytes:
            raise ValueError(f"{qtype.name} rows of {w.shape[-1]} bytes are not whole {nbytes}-byte blocks")
        w = np.ascontiguousarray(w)
        cols = w.shape[-1] // nbytes * n
    return int(qtype), w, cols
