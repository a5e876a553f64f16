"""Every GGUF block layout the kernels read, and the routines that decode it, per path.

A weight row is the GGUF bytes of one output row (`row_bytes = cols // block_elems *
block_bytes`); float weights are the same row viewed as bytes. A format's layout is
written once, in the comment above its float-path routine; each path has its block
routine next to the others, all reading the bytes as that comment says:
- float path, `_acc_<fmt>(row, v, o, x, xo, a)`: a block's weights times float32 x into 32
  float32 lanes (every format);
- int16 path, `_int_<fmt>`: x rounded to int16 per 32-block, weights multiplied in int32
  (`_madd`);
- VNNI path, `_vnni_<fmt>`: the int16 x split in bytes, two vpdpbusd a block;
- int8 path, `_i8_<fmt>`: x rounded to int8, one 8-bit dot product a block;
- `W8` records: a 32-weight block as 32 unsigned (or signed) bytes, the form `gemm_rows`
  unpacks once and dots with several tokens;
- row decoders, `_row_<fmt>`: a whole row into float32 (batch.py's tiles, dequantize).
The loops around them are rows.py's and batch.py's; formats.py's table says which format
has which path.

What makes LLVM vectorize the float path (measured on Q8_0, one core, weights in L2):
accumulators and decoded blocks live in stack buffers (`_lanes`), which cannot alias the
weights and are promoted to vector registers (heap scratch arrays: 3 GB/s; stack: 13 GB/s);
two rows are dotted at once for two independent FMA chains (19 GB/s); integers are narrowed
to int32 before conversion (numba computes in int64, which halves the lanes: Q4_0 3 -> 11
GB/s). Bit fields that combine two bytes (Q5_*, Q6_K) are extracted by `_bits`, all in
int32: numba's int64 steps were not narrowed back by LLVM there (Q5_K 7 -> 11, Q6_K 9 -> 14
GB/s).

On the int16 path (one core, weights in DRAM: Q8_0 17 -> 39 GB/s, Q4_K 13 -> 19, Q6_K 16 ->
20, Q4_0 17 -> 18; Q4_1 gained nothing, so it has none) what mattered: the f16 scale load
kept off vpinsrw (`_f16`), blocks taken in pairs into separate lanes, K-quant scales
unpacked as one vector and fed to the FMAs from memory (`_k_scales`, `_opaque`). Q4_0 is
bound by instruction count, about 13 per block; fewer needs int8 activations or a
repacked layout.
"""

from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .intrinsics import (
    FASTMATH, _I8x32, _I32x8, _NO_LANES, _bf2f, _bits, _bytes, _dot4_signed, _dot8_high4, _dot8_low4, _dot8_sw,
    _dot8_w, _dot_high4, _dot_low4, _dot_w, _e2m1_fma, _e2m1_lanes, _f16, _get, _h2f, _i, _into_lanes, _load32, _madd,
    _minus, _nibbles, _opaque, _opaque_f32, _splat, _stack_f32, _u2f, _u32, _vec_at, _w_bytes, _w_e2m1, _w_nibbles,
    _w_raw, _with_high,
)


# --- float path: `_acc_<fmt>` (a[j % 32] += w[j] * x[xo + j] over one block). Integers are
# cast to int32 before float so LLVM keeps 16 lanes per vector instead of numba's int64.

@numba.njit(inline="always")
def _k_scale_min(row, o, s):
    """6-bit scale and min of group s from the 12 packed bytes at o (Q4_K, Q5_K)."""
    if s < 4:
        return np.float32(row[o + s] & 63), np.float32(row[o + s + 4] & 63)
    sc = (row[o + s + 4] & 15) | ((row[o + s - 4] >> 6) << 4)
    m = (row[o + s + 4] >> 4) | ((row[o + s] >> 6) << 4)
    return np.float32(sc), np.float32(m)


@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_f16(row, v, o, x, xo, a):
    for j in range(32):
        a[j] += _h2f(v[xo + j]) * x[xo + j]


@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_bf16(row, v, o, x, xo, a):
    for j in range(32):
        a[j] += _bf2f(v[xo + j]) * x[xo + j]


# Q8_0, 34 bytes: d:f16 | q:int8[32]; w = d*q
@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q8_0(row, v, o, x, xo, a):
    d = _f16(row, o)
    for j in range(32):
        a[j] += d * np.float32(v[o + 2 + j]) * x[xo + j]


# Q4_0, 18 bytes: d:f16 | qs:u8[16]; weight j < 16 is the low nibble of qs[j], weight
# j + 16 the high one; w = d*(q - 8)
@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q4_0(row, v, o, x, xo, a):
    d = _f16(row, o)
    for j in range(16):
        q = row[o + 2 + j]
        a[j] += d * _bits(q, 0, 15, q, 0, 0, 0, 8) * x[xo + j]
        a[j + 16] += d * _bits(q, 4, 15, q, 0, 0, 0, 8) * x[xo + j + 16]


# Q4_1, 20 bytes: d:f16 | m:f16 | qs:u8[16] (as Q4_0); w = d*q + m
@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q4_1(row, v, o, x, xo, a):
    d = _f16(row, o)
    m = _f16(row, o + 2)
    for j in range(16):
        q = row[o + 4 + j]
        a[j] += (d * _i(q & 15) + m) * x[xo + j]
        a[j + 16] += (d * _i(q >> 4) + m) * x[xo + j + 16]


# Q5_0, 22 bytes: d:f16 | qh:u32 (bit j = 5th bit of weight j) | qs:u8[16] (as Q4_0);
# w = d*(q - 16).  Q5_1, 24 bytes: d:f16 | m:f16 | qh | qs; w = d*q + m
@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q5(row, o, q0, d, m, x, xo, a):
    qh = _u32(row, q0 - 4)
    for j in range(16):
        q = row[q0 + j]
        a[j] += (d * _bits(q, 0, 15, qh, j, 1, 4, 0) + m) * x[xo + j]
        a[j + 16] += (d * _bits(q, 4, 15, qh, j + 16, 1, 4, 0) + m) * x[xo + j + 16]


@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q5_0(row, v, o, x, xo, a):
    d = _f16(row, o)
    _acc_q5(row, o, o + 6, d, np.float32(-16) * d, x, xo, a)


@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q5_1(row, v, o, x, xo, a):
    _acc_q5(row, o, o + 8, _f16(row, o), _f16(row, o + 2), x, xo, a)


# MXFP4, 17 bytes: e:u8 (an E8M0 scale, 2^(e - 127)) | qs:u8[16], 4-bit E2M1 codes in
# Q4_0's order (weight j < 16 the low nibble of qs[j], j + 16 the high one); w = scale *
# value(code). The code tables (intrinsics.E2M1) hold the values doubled, so every path
# takes d = 2^(e - 128) (`_e8m0_half`, gguf's and llama.cpp's e8m0_to_fp32_half).
@numba.njit(inline="always")
def _e8m0_half(row, o):
    e = np.uint32(row[o])
    return _u2f(np.uint32(0x00200000) << e if e < np.uint32(2) else (e - np.uint32(1)) << np.uint32(23))


@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_mxfp4(row, v, o, x, xo, a):
    _e2m1_fma(a, row, o + 1, _e8m0_half(row, o), x, xo)


# Q4_K, 144 bytes, 256 weights in 8 groups of 32: d:f16 | dmin:f16 | scales:u8[12]
# (6-bit scale and min per group) | qs:u8[128]; group 2c is the low nibbles of
# qs[32c:32c+32], group 2c+1 the high ones; w = d*sc*q - dmin*m
@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q4_k(row, v, o, x, xo, a):
    d = _f16(row, o)
    dmin = _f16(row, o + 2)
    for c in range(4):
        sc0, m0 = _k_scale_min(row, o + 4, 2 * c)
        sc1, m1 = _k_scale_min(row, o + 4, 2 * c + 1)
        d0, n0, d1, n1 = d * sc0, -dmin * m0, d * sc1, -dmin * m1
        q0 = o + 16 + 32 * c
        x0 = xo + 64 * c
        for j in range(32):
            q = row[q0 + j]
            a[j] += (d0 * _i(q & 15) + n0) * x[x0 + j] + (d1 * _i(q >> 4) + n1) * x[x0 + 32 + j]


# Q5_K, 176 bytes: d:f16 | dmin:f16 | scales:u8[12] | qh:u8[32] (bit g of qh[j] = 5th bit
# of weight j of group g) | qs:u8[128] (as Q4_K); w = d*sc*q - dmin*m
@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q5_k(row, v, o, x, xo, a):
    d = _f16(row, o)
    dmin = _f16(row, o + 2)
    for c in range(4):
        sc0, m0 = _k_scale_min(row, o + 4, 2 * c)
        sc1, m1 = _k_scale_min(row, o + 4, 2 * c + 1)
        d0, n0, d1, n1 = d * sc0, -dmin * m0, d * sc1, -dmin * m1
        q0 = o + 48 + 32 * c
        x0 = xo + 64 * c
        for j in range(32):
            q, h = row[q0 + j], row[o + 16 + j]
            a[j] += ((d0 * _bits(q, 0, 15, h, 2 * c, 1, 4, 0) + n0) * x[x0 + j]
                     + (d1 * _bits(q, 4, 15, h, 2 * c + 1, 1, 4, 0) + n1) * x[x0 + 32 + j])


# Q6_K, 210 bytes: ql:u8[128] | qh:u8[64] | scales:i8[16] (one per 16 weights) | d:f16.
# Half h (128 weights), quarter k, j < 32: weight 128h + 32k + j has low bits
# ql[64h + 32(k & 1) + j] >> 4(k >> 1) and high bits qh[32h + j] >> 2k; w = d*sc*(q - 32)
@numba.njit(inline="always")
def _q6(lo, k, hi):
    """q - 32 of quarter k from its low-bits byte lo and high-bits byte hi."""
    return _bits(lo, 4 * (k >> 1), 15, hi, 2 * k, 3, 4, 32)


@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q6_k(row, v, o, x, xo, a):
    d = _f16(row, o + 208)
    for h in range(2):
        s = o + 192 + 8 * h
        # scale of weights 128h + 32k + j: v[s + 2k] for j < 16, v[s + 2k + 1] above
        d0, d1, d2, d3 = d * np.float32(v[s]), d * np.float32(v[s + 2]), d * np.float32(v[s + 4]), d * np.float32(v[s + 6])
        e0, e1, e2, e3 = d * np.float32(v[s + 1]), d * np.float32(v[s + 3]), d * np.float32(v[s + 5]), d * np.float32(v[s + 7])
        ql = o + 64 * h
        qh = o + 128 + 32 * h
        x0 = xo + 128 * h
        for j in range(16):
            l0, l1, m = row[ql + j], row[ql + 32 + j], row[qh + j]
            a[j] += (d0 * _q6(l0, 0, m) * x[x0 + j] + d1 * _q6(l1, 1, m) * x[x0 + 32 + j]
                     + d2 * _q6(l0, 2, m) * x[x0 + 64 + j] + d3 * _q6(l1, 3, m) * x[x0 + 96 + j])
            l0, l1, m = row[ql + 16 + j], row[ql + 48 + j], row[qh + 16 + j]
            a[j + 16] += (e0 * _q6(l0, 0, m) * x[x0 + 16 + j] + e1 * _q6(l1, 1, m) * x[x0 + 48 + j]
                          + e2 * _q6(l0, 2, m) * x[x0 + 80 + j] + e3 * _q6(l1, 3, m) * x[x0 + 112 + j])


# --- int16 path: `_int_<fmt>` ------------------------------------------------------------

@intrinsic
def _k_scales(typingctx, row, o, d, xs, xsum, g, out):
    """K-quant block at byte o (Q4_K/Q5_K layout): out[i] = d * scale_i * xs[g + i] for its 8
    groups; returns sum_i min_i * xsum[g + i]. The 6-bit fields are unpacked as vectors (as
    scalars they cost more than the block's dot products)."""
    def codegen(context, builder, sig, args):
        row, o, d, xs, xsum, g, out = args
        i8, i32, f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
        off = builder.add(o, ir.Constant(o.type, 4))
        q = builder.load(_vec_at(context, builder, sig.args[0], row, off, 16), align=1)

        def pick(idx):
            return builder.shuffle_vector(q, q, ir.Constant(ir.VectorType(i32, 8), idx))

        def c8(vals):
            return ir.Constant(ir.VectorType(i8, 8), vals)
        # group i < 4: scale q[i] & 63, min q[i+4] & 63; i >= 4: low 4 bits in q[i+4] (scale
        # low nibble, min high nibble), high 2 bits the top bits of q[i-4] (scale), q[i] (min)
        top = c8([0] * 4 + [0x30] * 4)
        sc = builder.or_(builder.and_(pick([0, 1, 2, 3, 8, 9, 10, 11]), c8([63] * 4 + [15] * 4)),
                         builder.and_(builder.lshr(pick([0, 1, 2, 3, 0, 1, 2, 3]), c8([2] * 8)), top))
        mn = builder.and_(builder.lshr(pick([4, 5, 6, 7, 8, 9, 10, 11]), c8([0] * 4 + [4] * 4)),
                          c8([63] * 4 + [15] * 4))
        mn = builder.or_(mn, builder.and_(builder.lshr(pick([4, 5, 6, 7, 4, 5, 6, 7]), c8([2] * 8)), top))
        f8 = ir.VectorType(f32, 8)

        def per_group(arr, i):  # xs[g:g + 8] or xsum[g:g + 8]
            return builder.load(_vec_at(context, builder, sig.args[i], arr, g, 8), align=4)
        scale = builder.fmul(builder.uitofp(sc, f8), _splat(builder, d, 8), flags=["fast"])
        scale = builder.fmul(scale, per_group(xs, 3), flags=["fast"])
        builder.store(scale, builder.bitcast(_opaque(builder, out), f8.as_pointer()), align=4)
        mins = builder.fmul(builder.uitofp(mn, f8), per_group(xsum, 4), flags=["fast"])
        total = builder.extract_element(mins, ir.Constant(i32, 0))
        for i in range(1, 8):
            total = builder.fadd(total, builder.extract_element(mins, ir.Constant(i32, i)), flags=["fast"])
        return total
    return types.float32(row, o, d, xs, xsum, g, out), codegen


# _int_<fmt>(row, v, o, xq, xs, xsum, b, a, ao): block b of the row (bytes from o) times x
# as `quantize_rows` gives it (xq: int16 [cols], xs: scale and xsum: sum per 32) into
# a[ao:ao + 16] (K-quants: into both halves of a); returns what does not depend on the lanes.

@numba.njit(inline="always", fastmath=FASTMATH)
def _int_q8_0(row, v, o, xq, xs, xsum, b, a, ao):
    s = _f16(row, o) * _get(xs, b)
    _madd(a, ao, s, s, _bytes(v, o + 2, 0, 0), xq, 32 * b)
    return np.float32(0)


@numba.njit(inline="always", fastmath=FASTMATH)
def _int_q4_0(row, v, o, xq, xs, xsum, b, a, ao):
    s = _f16(row, o) * _get(xs, b)
    _madd(a, ao, s, s, _minus(_nibbles(row, o + 2), 8), xq, 32 * b)
    return np.float32(0)


@numba.njit(inline="always", fastmath=FASTMATH)
def _int_mxfp4(row, v, o, xq, xs, xsum, b, a, ao):
    s = _e8m0_half(row, o) * _get(xs, b)
    _madd(a, ao, s, s, _e2m1_lanes(row, o + 1), xq, 32 * b)
    return np.float32(0)


@numba.njit(inline="always", fastmath=FASTMATH)
def _int_q4_k(row, v, o, xq, xs, xsum, b, a, ao):
    buf = _stack_f32(8)
    mins = _k_scales(row, o, _f16(row, o), xs, xsum, 8 * b, buf)
    sc = numba.carray(_opaque_f32(buf), (8,))
    for c in range(4):
        g = 8 * b + 2 * c
        _madd(a, 0, sc[2 * c], sc[2 * c], _bytes(row, o + 16 + 32 * c, 0, 15), xq, 32 * g)
        _madd(a, 16, sc[2 * c + 1], sc[2 * c + 1], _bytes(row, o + 16 + 32 * c, 4, 15), xq, 32 * g + 32)
    return -_f16(row, o + 2) * mins


@numba.njit(inline="always", fastmath=FASTMATH)
def _int_q6_k(row, v, o, xq, xs, xsum, b, a, ao):
    d = _f16(row, o + 208)
    for h in range(2):
        for k in range(4):  # weights 128h + 32k + j, bits as in _acc_q6_k
            low = _bytes(row, o + 64 * h + 32 * (k & 1), 4 * (k >> 1), 15)
            q = _with_high(low, row, o + 128 + 32 * h, 2 * k, 32)
            g = 8 * b + 4 * h + k
            s = d * _get(xs, g)
            sc = o + 192 + 8 * h + 2 * k
            _madd(a, 16 * (k & 1), s * np.float32(v[sc]), s * np.float32(v[sc + 1]), q, xq, 32 * g)
    return np.float32(0)


# --- VNNI and int8 paths: `W8` blocks, `_vnni_<fmt>`, `_i8_<fmt>` -----------------------
# On both, a 32-weight block's dot is w . x = d * xs * (w8 . xq) + OFF * m * xsum: the
# block's scale d, its weights as bytes w8 and the coefficient m of its offset or minimum
# (`W8.unpack`); OFF (-8 Q4_0, -128 Q8_0, 1 Q4_1 with m its minimum, 1 for the K-quants,
# whose blocks return their minimum term themselves) is applied once to a row's sum of
# m * xsum (a power of two: the same as per block, one multiply a block fewer).


class W8(NamedTuple):
    """A 32-weight format's block as 32 bytes for the 8-bit dot products."""

    unpack: object  # (row, o) -> (d, the block as a `_W8`, m); inlined numba function
    off: np.float32  # OFF
    signed: bool = False  # signed weights (the int8 path's `_dot8_sw`), else unsigned


class BlockDot(NamedTuple):
    """A path's block routine and the factor OFF of the offset sum it returns."""

    block: object
    off: np.float32 = np.float32(1)


@numba.njit(inline="always", fastmath=FASTMATH)
def _blk_q4_0(row, o):
    d = _f16(row, o)
    return d, _w_nibbles(row, o + 2), d


@numba.njit(inline="always", fastmath=FASTMATH)
def _blk_q4_1(row, o):
    return _f16(row, o), _w_nibbles(row, o + 4), _f16(row, o + 2)


@numba.njit(inline="always", fastmath=FASTMATH)
def _blk_q8_0(row, o):
    d = _f16(row, o)
    return d, _w_bytes(row, o + 2), d


@numba.njit(inline="always", fastmath=FASTMATH)
def _blk8_q8_0(row, o):
    """A Q8_0 block for the int8 path: (d, its signed weights, no offset)."""
    return _f16(row, o), _w_raw(row, o + 2), np.float32(0)


@numba.njit(inline="always", fastmath=FASTMATH)
def _blk_mxfp4(row, o):
    d = _e8m0_half(row, o)
    return d, _w_e2m1(row, o + 1), d


W8_Q4_0 = W8(_blk_q4_0, np.float32(-8))
W8_MXFP4 = W8(_blk_mxfp4, np.float32(-12))
W8_Q4_1 = W8(_blk_q4_1, np.float32(1))
W8_Q8_0 = W8(_blk_q8_0, np.float32(-128))
W8_Q8_0_SIGNED = W8(_blk8_q8_0, np.float32(1), signed=True)


def vnni_of(w8: W8) -> BlockDot:
    """_vnni_<fmt>(row, o, xb, xs, xsum, b, a, ao) of a 32-weight format: block b (bytes from
    o) into a[ao:ao + 8]; returns the offset or minimum term. The same arithmetic, in the
    same order, as a token's share of `gemm_rows`."""
    blk = w8.unpack

    @numba.njit(inline="always", fastmath=FASTMATH)
    def block(row, o, xb, xs, xsum, b, a, ao):
        d, w, m = blk(row, o)
        _dot_w(a, ao, w, xb, 64 * b, d * _get(xs, b))
        return m * _get(xsum, b)

    return BlockDot(block, w8.off)


def int8_of(w8: W8) -> BlockDot:
    """_i8_<fmt>(row, o, x8, xs, xsum, b, a, ao) of a 32-weight format: block b (bytes from
    o) of a row against x as `quantize_rows(..., int8=True)` gives it, into a[ao:ao + 8];
    returns the offset or minimum term, as `vnni_of`'s blocks do. The same arithmetic, in
    the same order, as a token's share of `gemm_rows`."""
    blk, dot = w8.unpack, _dot8_sw if w8.signed else _dot8_w

    @numba.njit(inline="always", fastmath=FASTMATH)
    def block(row, o, x8, xs, xsum, b, a, ao):
        d, w, m = blk(row, o)
        dot(a, ao, w, x8, 32 * b, d * _get(xs, b))
        return m * _get(xsum, b)

    return BlockDot(block, w8.off)


# The K-quants' blocks (Q4_K on the VNNI and int8 paths, Q6_K on int8), 256 weights each:
# their groups alternate lanes 0-7 and 8-15 themselves; they return their minimum term.

@numba.njit(inline="always", fastmath=FASTMATH)
def _vnni_q4_k(row, o, xb, xs, xsum, b, a, ao):
    buf = _stack_f32(8)
    mins = _k_scales(row, o, _f16(row, o), xs, xsum, 8 * b, buf)
    sc = numba.carray(_opaque_f32(buf), (8,))
    for c in range(4):
        g = 8 * b + 2 * c
        _dot_low4(a, 0, row, o + 16 + 32 * c, xb, 64 * g, sc[2 * c])
        _dot_high4(a, 8, row, o + 16 + 32 * c, xb, 64 * g + 64, sc[2 * c + 1])
    return -_f16(row, o + 2) * mins


@intrinsic
def _dot8_q6(typingctx, a, ao, row, lo, lo_shift, hi, hi_shift, x8, xo, s0, s1):
    """a[ao:ao + 8] += s * (w . x8[xo:xo + 32]) for 32 Q6_K weights w = q - 32, q's low 4 bits
    (row[lo + j] >> lo_shift) & 15 and high 2 bits (row[hi + j] >> hi_shift) & 3; s = s0 for
    weights 0-15 (lanes 0-3), s1 for 16-31."""
    def codegen(context, builder, sig, args):
        a, ao, row, lo, lo_shift, hi, hi_shift, x8, xo, s0, s1 = args
        rty = sig.args[2]

        def field(off, shift, mask):
            v = builder.lshr(_load32(context, builder, rty, row, off), _splat(builder, builder.trunc(shift, ir.IntType(8)), 32))
            return builder.and_(v, ir.Constant(_I8x32, [mask] * 32))
        q = builder.or_(field(lo, lo_shift, 15), builder.shl(field(hi, hi_shift, 3), ir.Constant(_I8x32, [4] * 32)))
        w = builder.sub(q, ir.Constant(_I8x32, [32] * 32))
        t = _dot4_signed(builder, _NO_LANES, w, _load32(context, builder, sig.args[7], x8, xo))
        s = builder.shuffle_vector(_splat(builder, s0, 8), _splat(builder, s1, 8), ir.Constant(_I32x8, [0] * 4 + [8] * 4))
        return _into_lanes(context, builder, sig.args[0], a, ao, t, s)
    return types.none(a, ao, row, lo, lo_shift, hi, hi_shift, x8, xo, s0, s1), codegen


@numba.njit(inline="always", fastmath=FASTMATH)
def _i8_q4_k(row, o, x8, xs, xsum, b, a, ao):
    buf = _stack_f32(8)
    mins = _k_scales(row, o, _f16(row, o), xs, xsum, 8 * b, buf)
    sc = numba.carray(_opaque_f32(buf), (8,))
    for c in range(4):
        g = 8 * b + 2 * c
        _dot8_low4(a, 0, row, o + 16 + 32 * c, x8, 32 * g, sc[2 * c])
        _dot8_high4(a, 8, row, o + 16 + 32 * c, x8, 32 * g + 32, sc[2 * c + 1])
    return -_f16(row, o + 2) * mins


@numba.njit(inline="always")
def _s8(row, o):
    """The signed byte at row[o] as float32."""
    return np.float32(np.int8(row[o]))


@numba.njit(inline="always", fastmath=FASTMATH)
def _i8_q6_k(row, o, x8, xs, xsum, b, a, ao):
    d = _f16(row, o + 208)
    for h in range(2):
        for k in range(4):  # weights 128h + 32k + j, bits and scales as in _acc_q6_k
            g = 8 * b + 4 * h + k
            s = d * _get(xs, g)
            sc = o + 192 + 8 * h + 2 * k
            _dot8_q6(a, 8 * (k & 1), row, o + 64 * h + 32 * (k & 1), 4 * (k >> 1), o + 128 + 32 * h, 2 * k,
                     x8, 32 * g, s * _s8(row, sc), s * _s8(row, sc + 1))
    return np.float32(0)


# --- row decoders, `_row_<fmt>`: one row (uint8 bytes) into out (float32[cols]); n16 == 16,
# opaque to LLVM (batch.py's `decode_row` says why). Layouts as documented on the float path.

@numba.njit(inline="always", fastmath=FASTMATH)
def _row_q8_0(row, out, n16):
    v = row.view(np.int8)
    for b in range(row.size // 34):
        o, w = 34 * b, 32 * b
        d = _f16(row, o)
        for j in range(2 * n16):
            out[w + j] = d * np.float32(v[o + 2 + j])


@numba.njit(inline="always", fastmath=FASTMATH)
def _row_mxfp4(row, out, n16):
    for b in range(row.size // 17):
        _e2m1_fma(out, row, 17 * b + 1, _e8m0_half(row, 17 * b), None, 32 * b)


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
    """Q6_K: weight 128h + 32k + 16s + j takes scale v[192 + 8h + 2k + s] (as in `_acc_q6_k`)."""
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

