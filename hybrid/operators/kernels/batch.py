"""Small batches (2..4096 tokens): each weight row is decoded once into an L1 tile of float32
and multiplied there with every token.

A GEMV spends its time decoding blocks, not multiplying; decoding a row once per token
(N GEMVs) makes a batch-N step cost N steps. Here a group of 4 rows is decoded once, then
a register-blocked float32 product runs over it: 4 rows x 2 tokens per pass over the
columns (8 accumulator vectors, 6 loads per 8 FMAs).

`decode_row` is the project's one row dequantizer (`kernels.dequantize` uses it too), over
the row decoders of blocks.py (`_row_<fmt>`). Their loops run to a trip count LLVM cannot
see (`_opaque`): numba runs LLVM without the SLP vectorizer, and LLVM fully unrolls a block
loop of constant trip count (32) before the loop vectorizer sees it, so per-block decoders
decoded one weight at a time (Q8_0 7.6 GB/s, 2 threads); these are vectorized: 25 GB/s for
Q8_0 and Q4_0.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .blocks import _row_mxfp4, _row_q4, _row_q5, _row_q6_k, _row_q8_0, _row_qk
from .formats import BF16, F16, F32, MXFP4, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from .intrinsics import FASTMATH, _bf2f, _h2f
from .policy import TILE_X_BYTES

# Rows decoded per tile (the row count of the register block).
ROWS = 4


@intrinsic
def _opaque(typingctx, n):
    """n, unchanged, through an empty inline asm: LLVM cannot see its value, so a loop of n
    iterations is vectorized rather than fully unrolled into scalar code."""
    if not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ty = context.get_value_type(sig.return_type)
        asm = ir.InlineAsm(ir.FunctionType(ty, [ty]), "", "=r,0", side_effect=False)
        return builder.call(asm, [args[0]])
    return types.int64(n), codegen


@numba.njit(nogil=True, fastmath=FASTMATH)
def decode_row(t, row, out):
    """Decode one weight row of type code t (uint8 bytes) into out (float32[cols])."""
    n16 = _opaque(16)
    if t == Q8_0:
        _row_q8_0(row, out, n16)
    elif t == Q4_0:
        _row_q4(row, out, n16, 18, False)
    elif t == Q4_1:
        _row_q4(row, out, n16, 20, True)
    elif t == MXFP4:
        _row_mxfp4(row, out, n16)
    elif t == Q5_0:
        _row_q5(row, out, n16, 22, False)
    elif t == Q5_1:
        _row_q5(row, out, n16, 24, True)
    elif t == Q4_K:
        _row_qk(row, out, n16, 144)
    elif t == Q5_K:
        _row_qk(row, out, n16, 176)
    elif t == Q6_K:
        _row_q6_k(row, out, n16)
    elif t == F16:
        v = row.view(np.uint16)
        for j in range(v.size):
            out[j] = _h2f(v[j])
    elif t == BF16:
        v = row.view(np.uint16)
        for j in range(v.size):
            out[j] = _bf2f(v[j])
    elif t == F32:
        out[:] = row.view(np.float32)


# --- the product over a decoded tile -----------------------------------------------------

@numba.njit(inline="always", fastmath=FASTMATH)
def decode_tile(t, w, r, hi, tile):
    """Decode rows r..r+3 of w into tile [4, cols]; a group cut short by hi repeats row hi-1."""
    for i in range(ROWS):
        decode_row(t, w[min(r + i, hi - 1)], tile[i])


@numba.njit(inline="always", fastmath=FASTMATH)
def tile_dot(tile, x0, x1):
    """(s00, s10, s20, s30, s01, s11, s21, s31): sij = tile[i] . xj, in one pass over the columns."""
    w0, w1, w2, w3 = tile[0], tile[1], tile[2], tile[3]
    s00 = s10 = s20 = s30 = s01 = s11 = s21 = s31 = np.float32(0)
    for c in range(x0.size):
        a = x0[c]
        b = x1[c]
        s00 += w0[c] * a
        s10 += w1[c] * a
        s20 += w2[c] * a
        s30 += w3[c] * a
        s01 += w0[c] * b
        s11 += w1[c] * b
        s21 += w2[c] * b
        s31 += w3[c] * b
    return s00, s10, s20, s30, s01, s11, s21, s31


@numba.njit(inline="always", fastmath=FASTMATH)
def tile_rows(t, w, x, y, lo, hi, t0, t1, tile):
    """y[n, r] = w[r] . x[n] for rows lo..hi-1 and tokens t0..t1-1: rows decoded 4 at a time
    into `tile` (float32 [4, cols]), each tile multiplied with the tokens two at a time."""
    for r in range(lo, hi, ROWS):
        decode_tile(t, w, r, hi, tile)
        for n0 in range(t0, t1, 2):
            n1 = min(n0 + 1, t1 - 1)  # an odd last token is done twice
            s = tile_dot(tile, x[n0], x[n1])
            for i in range(min(ROWS, hi - r)):
                y[n0, r + i] = s[i]
                y[n1, r + i] = s[ROWS + i]


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def matmul_small(t, w, x, y, chunks):
    """w: uint8 [rows, row_bytes]; x: float32 [N, cols]; y: float32 [N, rows], written; rows
    split in `chunks` (one per thread), each read front to back 4 rows at a time, once per
    block of tokens whose x fits in L2 (one block up to 128 tokens of 1024 columns)."""
    rows = w.shape[0]
    n_tok, cols = x.shape
    per_block = max(2, TILE_X_BYTES // (4 * cols))
    for c in prange(chunks):
        lo = c * rows // chunks
        hi = (c + 1) * rows // chunks
        tile = np.empty((ROWS, cols), np.float32)
        for t0 in range(0, n_tok, per_block):
            tile_rows(t, w, x, y, lo, hi, t0, min(n_tok, t0 + per_block), tile)
