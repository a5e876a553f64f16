"""Small batches (2..4096 tokens): each weight row is decoded once into an L1 tile of float32
and multiplied there with every token.

A GEMV spends its time decoding blocks, not multiplying; decoding a row once per token
(N GEMVs) makes a batch-N step cost N steps. Here a group of 4 rows is decoded once, then
a register-blocked float32 product runs over it: 4 rows x 2 tokens per pass over the
columns (8 accumulator vectors, 6 loads per 8 FMAs).

`decode_row` is the project's one row dequantizer (`kernels.dequantize` uses it too). Its
loops run to a trip count LLVM cannot see (`_opaque`): numba runs LLVM without the SLP
vectorizer, and LLVM fully unrolls a block loop of constant trip count (32) before the loop
vectorizer sees it, so per-block decoders (formats.py's former `_deq_<fmt>`) decoded one
weight at a time (Q8_0 7.6 GB/s, 2 threads); these are vectorized: 25 GB/s for Q8_0 and
Q4_0.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .formats import (BF16, F16, F32, FASTMATH, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, _bf2f, _bits,
                      _f16, _h2f, _i, _k_scale_min, _q6, _u32)

# Rows decoded per tile (the row count of the register block).
ROWS = 4
# Activations read per tile pass stay within this (the 1 MB L2 of this machine's cores, half).
X_BYTES = 512 << 10


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


# --- per format: decode one row (uint8 bytes) into out (float32[cols]); n16 == 16, opaque.
# Bit layouts as documented in formats.py.

@numba.njit(inline="always", fastmath=FASTMATH)
def _row_q8_0(row, out, n16):
    v = row.view(np.int8)
    for b in range(row.size // 34):
        o, w = 34 * b, 32 * b
        d = _f16(row, o)
        for j in range(2 * n16):
            out[w + j] = d * np.float32(v[o + 2 + j])


@numba.njit(inline="always", fastmath=FASTMATH)
def _row_q4(row, out, n16, block_bytes, has_min):
    """Q4_0 (d | qs, w = d*(q-8)) and Q4_1 (d | m | qs, w = d*q + m)."""
    for b in range(row.size // block_bytes):
        o, w = block_bytes * b, 32 * b
        d = _f16(row, o)
        m = _f16(row, o + 2) if has_min else np.float32(-8) * d
        q0 = o + block_bytes - 16
        for j in range(n16):
            q = row[q0 + j]
            out[w + j] = d * _i(q & 15) + m
            out[w + 16 + j] = d * _i(q >> 4) + m


@numba.njit(inline="always", fastmath=FASTMATH)
def _row_q5(row, out, n16, block_bytes, has_min):
    """Q5_0 (d | qh | qs, w = d*(q-16)) and Q5_1 (d | m | qh | qs, w = d*q + m)."""
    for b in range(row.size // block_bytes):
        o, w = block_bytes * b, 32 * b
        d = _f16(row, o)
        m = _f16(row, o + 2) if has_min else np.float32(-16) * d
        q0 = o + block_bytes - 16
        qh = _u32(row, q0 - 4)
        for j in range(n16):
            q = row[q0 + j]
            out[w + j] = d * _bits(q, 0, 15, qh, j, 1, 4, 0) + m
            out[w + 16 + j] = d * _bits(q, 4, 15, qh, j + 16, 1, 4, 0) + m


@numba.njit(inline="always", fastmath=FASTMATH)
def _row_qk(row, out, n16, block_bytes):
    """Q4_K (d | dmin | scales | qs) and Q5_K (d | dmin | scales | qh | qs): group 2c is the
    low nibbles of 32 qs bytes, group 2c+1 the high ones; w = d*sc*q - dmin*m."""
    five = block_bytes == 176
    for b in range(row.size // block_bytes):
        o, w = block_bytes * b, 256 * b
        d = _f16(row, o)
        dmin = _f16(row, o + 2)
        for c in range(4):
            sc0, m0 = _k_scale_min(row, o + 4, 2 * c)
            sc1, m1 = _k_scale_min(row, o + 4, 2 * c + 1)
            d0, n0, d1, n1 = d * sc0, -dmin * m0, d * sc1, -dmin * m1
            q0 = o + (48 if five else 16) + 32 * c
            wc = w + 64 * c
            if five:
                for j in range(2 * n16):
                    q, h = row[q0 + j], row[o + 16 + j]
                    out[wc + j] = d0 * _bits(q, 0, 15, h, 2 * c, 1, 4, 0) + n0
                    out[wc + 32 + j] = d1 * _bits(q, 4, 15, h, 2 * c + 1, 1, 4, 0) + n1
            else:
                for j in range(2 * n16):
                    q = row[q0 + j]
                    out[wc + j] = d0 * _i(q & 15) + n0
                    out[wc + 32 + j] = d1 * _i(q >> 4) + n1


@numba.njit(inline="always", fastmath=FASTMATH)
def _row_q6_k(row, out, n16):
    """Q6_K: weight 128h + 32k + 16s + j takes scale v[192 + 8h + 2k + s] (see formats.py)."""
    v = row.view(np.int8)
    for b in range(row.size // 210):
        o, w = 210 * b, 256 * b
        d = _f16(row, o + 208)
        for h in range(2):
            for s in range(2):
                sc = o + 192 + 8 * h + s
                d0, d1, d2, d3 = (d * np.float32(v[sc]), d * np.float32(v[sc + 2]),
                                  d * np.float32(v[sc + 4]), d * np.float32(v[sc + 6]))
                ql = o + 64 * h + 16 * s
                qh = o + 128 + 32 * h + 16 * s
                wh = w + 128 * h + 16 * s
                for j in range(n16):
                    l0, l1, m = row[ql + j], row[ql + 32 + j], row[qh + j]
                    out[wh + j] = d0 * _q6(l0, 0, m)
                    out[wh + 32 + j] = d1 * _q6(l1, 1, m)
                    out[wh + 64 + j] = d2 * _q6(l0, 2, m)
                    out[wh + 96 + j] = d3 * _q6(l1, 3, m)


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
    per_block = max(2, X_BYTES // (4 * cols))
    for c in prange(chunks):
        lo = c * rows // chunks
        hi = (c + 1) * rows // chunks
        tile = np.empty((ROWS, cols), np.float32)
        for t0 in range(0, n_tok, per_block):
            tile_rows(t, w, x, y, lo, hi, t0, min(n_tok, t0 + per_block), tile)
