"""GGML block formats for numba: per-format block routines and the loops around them.

A weight row is the GGUF bytes of one output row (`row_bytes = cols // block_elems *
block_bytes`); float weights are the same row viewed as bytes. Per format, `_acc_<fmt>`
accumulates one block's weights times x into 32 float32 lanes and `_deq_<fmt>` writes one
block's weights out; `_specialize` wraps them in the row loops (`dot2`, `dequantize_row`).

What makes LLVM vectorize (measured on Q8_0, one core, weights in L2): accumulators and
decoded blocks live in stack buffers (`_lanes`), which cannot alias the weights and are
promoted to vector registers (heap scratch arrays: 3 GB/s; stack: 13 GB/s); two rows are
dotted at once for two independent FMA chains (19 GB/s); integers are narrowed to int32
before conversion (numba computes in int64, which halves the lanes: Q4_0 3 -> 11 GB/s).
Bit fields that combine two bytes (Q5_*, Q6_K) are extracted by `_bits`, all in int32:
numba's int64 steps were not narrowed back by LLVM there (Q5_K 7 -> 11, Q6_K 9 -> 14 GB/s).
F32 rows take a plain dot: through the block loop LLVM vectorized across blocks with
gathers. Which two rows are paired matters for DRAM reads: see `far_pair`.
"""

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# LLVM may reassociate and contract (needed to vectorize sums), but must keep NaN/Inf.
FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}

# Type codes are GGML's own numbers, so a kernel can branch on int(qtype).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = (
    int(t) for t in (Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.BF16)
)
SUPPORTED_TYPES = frozenset(Q(t) for t in (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K))
FLOAT_DTYPES = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}


def block_shape(qtype: Q) -> tuple[int, int]:
    """(weights, bytes) of one block."""
    return GGML_QUANT_SIZES[Q(qtype)]


# --- numba building blocks ------------------------------------------------------------

@intrinsic
def _h2f(typingctx, bits):
    """IEEE half bits (uint16) -> float32; one vcvtph2ps with F16C."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _bf2f(typingctx, bits):
    """bfloat16 bits (uint16) -> float32."""
    def codegen(context, builder, sig, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _bits(typingctx, a, sa, ma, b, sb, mb, sc, off):
    """float32((a >> sa & ma | (b >> sb & mb) << sc) - off) for unsigned integers a, b, computed
    in int32: numba would widen each step to int64, which halves the vector lanes (and, in
    Q5/Q6 decodes, kept LLVM from narrowing them back)."""
    if not all(isinstance(t, types.Integer) for t in (a, sa, ma, b, sb, mb, sc, off)):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)

        def i(v):
            w = v.type.width
            return v if w == 32 else builder.trunc(v, i32) if w > 32 else builder.zext(v, i32)
        a, sa, ma, b, sb, mb, sc, off = (i(v) for v in args)
        lo = builder.and_(builder.lshr(a, sa), ma)
        hi = builder.shl(builder.and_(builder.lshr(b, sb), mb), sc)
        return builder.sitofp(builder.sub(builder.or_(lo, hi), off), ir.FloatType())
    return types.float32(a, sa, ma, b, sb, mb, sc, off), codegen


@intrinsic
def _stack_f32(typingctx, n):
    """Pointer to a float32[n] on the stack (n a literal)."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = ir.Constant(ir.IntType(64), n.literal_value)

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, ir.FloatType(), size=size)
    return types.CPointer(types.float32)(n), codegen


@numba.njit(inline="always")
def _lanes():
    return numba.carray(_stack_f32(32), (32,))


@numba.njit(inline="always")
def _f16(row, o):
    return _h2f(np.uint16(row[o]) | (np.uint16(row[o + 1]) << np.uint16(8)))


@numba.njit(inline="always")
def _k_scale_min(row, o, s):
    """6-bit scale and min of group s from the 12 packed bytes at o (Q4_K, Q5_K)."""
    if s < 4:
        return np.float32(row[o + s] & 63), np.float32(row[o + s + 4] & 63)
    sc = (row[o + s + 4] & 15) | ((row[o + s - 4] >> 6) << 4)
    m = (row[o + s + 4] >> 4) | ((row[o + s] >> 6) << 4)
    return np.float32(sc), np.float32(m)


# --- per format: _acc_<fmt> (a[j % 32] += w[j] * x[xo + j] over one block) and
# _deq_<fmt> (w[j] = weight j of one block). Integers are cast to int32 before float so
# LLVM keeps 16 lanes per vector instead of numba's default int64.

@numba.njit(inline="always")
def _i(q):
    return np.float32(np.int32(q))


@numba.njit(inline="always", fastmath=FASTMATH)
def _deq_f32(row, v, o, w):
    for j in range(32):
        w[j] = v[o // 4 + j]


@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_f16(row, v, o, x, xo, a):
    for j in range(32):
        a[j] += _h2f(v[xo + j]) * x[xo + j]


@numba.njit(inline="always", fastmath=FASTMATH)
def _deq_f16(row, v, o, w):
    for j in range(32):
        w[j] = _h2f(v[o // 2 + j])


@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_bf16(row, v, o, x, xo, a):
    for j in range(32):
        a[j] += _bf2f(v[xo + j]) * x[xo + j]


@numba.njit(inline="always", fastmath=FASTMATH)
def _deq_bf16(row, v, o, w):
    for j in range(32):
        w[j] = _bf2f(v[o // 2 + j])


# Q8_0, 34 bytes: d:f16 | q:int8[32]; w = d*q
@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q8_0(row, v, o, x, xo, a):
    d = _f16(row, o)
    for j in range(32):
        a[j] += d * np.float32(v[o + 2 + j]) * x[xo + j]


@numba.njit(inline="always", fastmath=FASTMATH)
def _deq_q8_0(row, v, o, w):
    d = _f16(row, o)
    for j in range(32):
        w[j] = d * np.float32(v[o + 2 + j])


# Q4_0, 18 bytes: d:f16 | qs:u8[16]; weight j < 16 is the low nibble of qs[j], weight
# j + 16 the high one; w = d*(q - 8)
@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q4_0(row, v, o, x, xo, a):
    d = _f16(row, o)
    for j in range(16):
        q = row[o + 2 + j]
        a[j] += d * _bits(q, 0, 15, q, 0, 0, 0, 8) * x[xo + j]
        a[j + 16] += d * _bits(q, 4, 15, q, 0, 0, 0, 8) * x[xo + j + 16]


@numba.njit(inline="always", fastmath=FASTMATH)
def _deq_q4_0(row, v, o, w):
    d = _f16(row, o)
    m = np.float32(-8) * d
    for j in range(16):
        q = row[o + 2 + j]
        w[j] = d * _i(q & 15) + m
        w[j + 16] = d * _i(q >> 4) + m


# Q4_1, 20 bytes: d:f16 | m:f16 | qs:u8[16] (as Q4_0); w = d*q + m
@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q4_1(row, v, o, x, xo, a):
    d = _f16(row, o)
    m = _f16(row, o + 2)
    for j in range(16):
        q = row[o + 4 + j]
        a[j] += (d * _i(q & 15) + m) * x[xo + j]
        a[j + 16] += (d * _i(q >> 4) + m) * x[xo + j + 16]


@numba.njit(inline="always", fastmath=FASTMATH)
def _deq_q4_1(row, v, o, w):
    d = _f16(row, o)
    m = _f16(row, o + 2)
    for j in range(16):
        q = row[o + 4 + j]
        w[j] = d * _i(q & 15) + m
        w[j + 16] = d * _i(q >> 4) + m


@numba.njit(inline="always")
def _u32(row, o):
    return (np.uint32(row[o]) | (np.uint32(row[o + 1]) << np.uint32(8))
            | (np.uint32(row[o + 2]) << np.uint32(16)) | (np.uint32(row[o + 3]) << np.uint32(24)))


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
def _deq_q5(row, o, q0, d, m, w):
    qh = _u32(row, q0 - 4)
    for j in range(16):
        q = row[q0 + j]
        w[j] = d * _bits(q, 0, 15, qh, j, 1, 4, 0) + m
        w[j + 16] = d * _bits(q, 4, 15, qh, j + 16, 1, 4, 0) + m


@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q5_0(row, v, o, x, xo, a):
    d = _f16(row, o)
    _acc_q5(row, o, o + 6, d, np.float32(-16) * d, x, xo, a)


@numba.njit(inline="always", fastmath=FASTMATH)
def _deq_q5_0(row, v, o, w):
    d = _f16(row, o)
    _deq_q5(row, o, o + 6, d, np.float32(-16) * d, w)


@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q5_1(row, v, o, x, xo, a):
    _acc_q5(row, o, o + 8, _f16(row, o), _f16(row, o + 2), x, xo, a)


@numba.njit(inline="always", fastmath=FASTMATH)
def _deq_q5_1(row, v, o, w):
    _deq_q5(row, o, o + 8, _f16(row, o), _f16(row, o + 2), w)


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


@numba.njit(inline="always", fastmath=FASTMATH)
def _deq_q4_k(row, v, o, w):
    d = _f16(row, o)
    dmin = _f16(row, o + 2)
    for c in range(4):
        sc0, m0 = _k_scale_min(row, o + 4, 2 * c)
        sc1, m1 = _k_scale_min(row, o + 4, 2 * c + 1)
        d0, n0, d1, n1 = d * sc0, -dmin * m0, d * sc1, -dmin * m1
        q0 = o + 16 + 32 * c
        for j in range(32):
            q = row[q0 + j]
            w[64 * c + j] = d0 * _i(q & 15) + n0
            w[64 * c + 32 + j] = d1 * _i(q >> 4) + n1


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


@numba.njit(inline="always", fastmath=FASTMATH)
def _deq_q5_k(row, v, o, w):
    d = _f16(row, o)
    dmin = _f16(row, o + 2)
    for c in range(4):
        sc0, m0 = _k_scale_min(row, o + 4, 2 * c)
        sc1, m1 = _k_scale_min(row, o + 4, 2 * c + 1)
        d0, n0, d1, n1 = d * sc0, -dmin * m0, d * sc1, -dmin * m1
        q0 = o + 48 + 32 * c
        for j in range(32):
            q, h = row[q0 + j], row[o + 16 + j]
            w[64 * c + j] = d0 * _bits(q, 0, 15, h, 2 * c, 1, 4, 0) + n0
            w[64 * c + 32 + j] = d1 * _bits(q, 4, 15, h, 2 * c + 1, 1, 4, 0) + n1


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


@numba.njit(inline="always", fastmath=FASTMATH)
def _deq_q6_k(row, v, o, w):
    d = _f16(row, o + 208)
    for h in range(2):
        ql = o + 64 * h
        qh = o + 128 + 32 * h
        for j in range(32):  # bits as in _acc_q6_k
            l0, l1, m = row[ql + j], row[ql + 32 + j], row[qh + j]
            sc = d * np.float32(v[o + 192 + 8 * h + j // 16])
            w[128 * h + j] = sc * _q6(l0, 0, m)
            sc = d * np.float32(v[o + 194 + 8 * h + j // 16])
            w[128 * h + 32 + j] = sc * _q6(l1, 1, m)
            sc = d * np.float32(v[o + 196 + 8 * h + j // 16])
            w[128 * h + 64 + j] = sc * _q6(l0, 2, m)
            sc = d * np.float32(v[o + 198 + 8 * h + j // 16])
            w[128 * h + 96 + j] = sc * _q6(l1, 3, m)


# --- generic loops, specialized per format ---------------------------------------------

def _specialize(acc, deq, block_elems, block_bytes, view):
    """(dot2, dequantize_row) for one format. The block routines, sizes and the element
    type they read (`view`, taken once per row: a view inside the loop costs a refcount
    call) are compile-time constants of the closures."""

    @numba.njit(nogil=True, fastmath=FASTMATH)
    def dot2_fmt(r0, r1, x):
        # Two rows at once: two independent accumulator chains, x stays in L1.
        a0 = _lanes()
        a1 = _lanes()
        for j in range(32):
            a0[j] = 0
            a1[j] = 0
        v0 = r0.view(view)
        v1 = r1.view(view)
        for b in range(r0.size // block_bytes):
            acc(r0, v0, b * block_bytes, x, b * block_elems, a0)
            acc(r1, v1, b * block_bytes, x, b * block_elems, a1)
        s0 = np.float32(0)
        s1 = np.float32(0)
        for j in range(32):
            s0 += a0[j]
            s1 += a1[j]
        return s0, s1

    @numba.njit(nogil=True, fastmath=FASTMATH)
    def dequantize_fmt(row, out):
        # Decode into a stack block (which cannot alias `row`), then copy out.
        w = numba.carray(_stack_f32(256), (256,))
        v = row.view(view)
        for b in range(row.size // block_bytes):
            deq(row, v, b * block_bytes, w)
            for j in range(block_elems):
                out[b * block_elems + j] = w[j]

    return dot2_fmt, dequantize_fmt


_dot2_q8_0, _deqrow_q8_0 = _specialize(_acc_q8_0, _deq_q8_0, 32, 34, np.int8)
_dot2_q4_0, _deqrow_q4_0 = _specialize(_acc_q4_0, _deq_q4_0, 32, 18, np.uint8)
_dot2_q4_1, _deqrow_q4_1 = _specialize(_acc_q4_1, _deq_q4_1, 32, 20, np.uint8)
_dot2_q5_0, _deqrow_q5_0 = _specialize(_acc_q5_0, _deq_q5_0, 32, 22, np.uint8)
_dot2_q5_1, _deqrow_q5_1 = _specialize(_acc_q5_1, _deq_q5_1, 32, 24, np.uint8)
_dot2_q4_k, _deqrow_q4_k = _specialize(_acc_q4_k, _deq_q4_k, 256, 144, np.uint8)
_dot2_q5_k, _deqrow_q5_k = _specialize(_acc_q5_k, _deq_q5_k, 256, 176, np.uint8)
_dot2_q6_k, _deqrow_q6_k = _specialize(_acc_q6_k, _deq_q6_k, 256, 210, np.int8)
_dot2_f16, _deqrow_f16 = _specialize(_acc_f16, _deq_f16, 32, 64, np.uint16)
_dot2_bf16, _deqrow_bf16 = _specialize(_acc_bf16, _deq_bf16, 32, 64, np.uint16)
_deqrow_f32 = _specialize(None, _deq_f32, 32, 128, np.float32)[1]


@numba.njit(nogil=True, fastmath=FASTMATH)
def _dot2_f32(r0, r1, x):
    # A plain contiguous dot: through the 32-lane block loop, LLVM vectorized across blocks
    # and gathered (6 GB/s).
    v0 = r0.view(np.float32)
    v1 = r1.view(np.float32)
    s0 = np.float32(0)
    s1 = np.float32(0)
    for i in range(x.size):
        s0 += v0[i] * x[i]
        s1 += v1[i] * x[i]
    return s0, s1


@numba.njit(nogil=True, fastmath=FASTMATH)
def dot2(t, r0, r1, x):
    """Dot products of two weight rows of type code t (uint8 bytes) with x (float32[cols])."""
    if t == Q8_0:
        return _dot2_q8_0(r0, r1, x)
    if t == Q4_0:
        return _dot2_q4_0(r0, r1, x)
    if t == Q4_1:
        return _dot2_q4_1(r0, r1, x)
    if t == Q5_0:
        return _dot2_q5_0(r0, r1, x)
    if t == Q5_1:
        return _dot2_q5_1(r0, r1, x)
    if t == Q4_K:
        return _dot2_q4_k(r0, r1, x)
    if t == Q5_K:
        return _dot2_q5_k(r0, r1, x)
    if t == Q6_K:
        return _dot2_q6_k(r0, r1, x)
    if t == F16:
        return _dot2_f16(r0, r1, x)
    if t == BF16:
        return _dot2_bf16(r0, r1, x)
    return _dot2_f32(r0, r1, x)


@numba.njit(inline="always")
def far_pair(lo, hi, half, i):
    """Pair i of rows [lo, hi) with half = (hi - lo + 1) // 2: rows lo + i and lo + i + half
    (the last row twice when the count is odd).

    A thread's rows are read as two long sequential streams. Pairing adjacent rows (two
    read fronts a row apart, one stream) halves the DRAM read speed of Q4_0/Q8_0 GEMVs,
    1 thread and 2 (the hardware prefetchers lose track: Q4_0 5 vs 15 GB/s on one core);
    so do short streams (pairs 16 rows apart: 9 GB/s).
    """
    r0 = lo + i
    r1 = r0 + half
    return r0, (r1 if r1 < hi else r0)


@numba.njit(nogil=True, fastmath=FASTMATH)
def dequantize_row(t, row, out):
    """Decode one weight row of type code t (uint8 bytes) into out (float32[cols])."""
    if t == Q8_0:
        _deqrow_q8_0(row, out)
    elif t == Q4_0:
        _deqrow_q4_0(row, out)
    elif t == Q4_1:
        _deqrow_q4_1(row, out)
    elif t == Q5_0:
        _deqrow_q5_0(row, out)
    elif t == Q5_1:
        _deqrow_q5_1(row, out)
    elif t == Q4_K:
        _deqrow_q4_k(row, out)
    elif t == Q5_K:
        _deqrow_q5_k(row, out)
    elif t == Q6_K:
        _deqrow_q6_k(row, out)
    elif t == F16:
        _deqrow_f16(row, out)
    elif t == BF16:
        _deqrow_bf16(row, out)
    else:
        _deqrow_f32(row, out)


@numba.njit(inline="always", fastmath=FASTMATH)
def dot(a, b):
    """a . b for float32 vectors of the same length (LLVM vectorizes the reduction)."""
    s = np.float32(0)
    for i in range(a.size):
        s += a[i] * b[i]
    return s


# --- Python side: the byte view every kernel takes -------------------------------------

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
