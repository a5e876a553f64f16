"""GGML block formats for numba: per-format block routines and the loops around them.

A weight row is the GGUF bytes of one output row (`row_bytes = cols // block_elems *
block_bytes`); float weights are the same row viewed as bytes. Per format, `_acc_<fmt>`
accumulates one block's weights times x into 32 float32 lanes; `_pair` wraps it in the
loop over a row pair's blocks and `_rows_of` in the loop over a range of rows
(`gemv_rows`). Rows are dequantized by `batch.decode_row` (a vectorized decoder).

What makes LLVM vectorize (measured on Q8_0, one core, weights in L2): accumulators and
decoded blocks live in stack buffers (`_lanes`), which cannot alias the weights and are
promoted to vector registers (heap scratch arrays: 3 GB/s; stack: 13 GB/s); two rows are
dotted at once for two independent FMA chains (19 GB/s); integers are narrowed to int32
before conversion (numba computes in int64, which halves the lanes: Q4_0 3 -> 11 GB/s).
Bit fields that combine two bytes (Q5_*, Q6_K) are extracted by `_bits`, all in int32:
numba's int64 steps were not narrowed back by LLVM there (Q5_K 7 -> 11, Q6_K 9 -> 14 GB/s).
F32 rows take a plain dot: through the block loop LLVM vectorized across blocks with
gathers. Which two rows are paired matters for DRAM reads: see `far_pair`.

Formats in INT_TYPES also have an integer path (`gemv_rows` with int16 activations, for
the GEMV and the fused MoE): x is rounded per 32-block to int16 (`quantize_rows`, ~2e-5 relative error), a block is
32 int16 weights (`_Lanes`, a vector written in LLVM IR: LLVM made no vpmaddwd of scalar
integer loops) and `_madd` takes it with int32 pairwise products, one convert and one FMA
(one core, weights in DRAM: Q8_0 17 -> 39 GB/s, Q4_K 13 -> 19, Q6_K 16 -> 20, Q4_0 17 -> 18;
Q4_1 gained nothing). What mattered there: the f16 scale load kept off vpinsrw (`_f16`),
blocks taken in pairs into separate lanes, K-quant scales unpacked as one vector and fed to
the FMAs from memory (`_k_scales`, `_opaque`). Q4_0 is bound by instruction count, about
13 per block; fewer needs int8 activations or a repacked layout.

Where the CPU has AVX-512 VNNI (`HAS_VNNI`), Q8_0, Q4_0, Q4_1 and Q4_K take a third path: the
int16 x split into two bytes, a block as two vpdpbusd (`_dot_split`), see "VNNI path" below.
"""

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

# LLVM may reassociate and contract (needed to vectorize sums), but must keep NaN/Inf.
FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}
# The VNNI paths' flags: no reassociation, so a dot's order of operations is the source's
# and the same in every kernel that computes it (see `_sum16`).
STRICT = {"contract"}

# Type codes are GGML's own numbers, so a kernel can branch on int(qtype).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = (
    int(t) for t in (Q.F32, Q.F16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.BF16)
)
SUPPORTED_TYPES = frozenset(Q(t) for t in (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K))
FLOAT_DTYPES = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}


def _host_has_vnni() -> bool:
    """Whether numba compiles for a CPU with vpdpbusd on 256-bit vectors (AVX-VNNI, or AVX-512
    VNNI with VL):
    the host's features, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES pick another target."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return False
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    return bool(features.get("avxvnni") or (features.get("avx512vnni") and features.get("avx512vl")))


# Part of each kernel's compiled code (numba's cache is per CPU, so it stays consistent).
HAS_VNNI = _host_has_vnni()


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
def _u2f(typingctx, bits):
    """float32 with the bits of a uint32."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


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


@intrinsic
def _stack_i64(typingctx, n):
    """Pointer to an int64[n] on the stack (n a literal)."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = ir.Constant(ir.IntType(64), n.literal_value)

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, ir.IntType(64), size=size)
    return types.CPointer(types.int64)(n), codegen


@numba.njit(inline="always")
def _lanes():
    return numba.carray(_stack_f32(32), (32,))


@intrinsic
def _f16(typingctx, row, o):
    """The IEEE half at byte o of row (uint8/int8) as float32: one 2-byte load (indexing
    with a signed o would add numba's negative-index fix-up, several instructions a block)."""
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        at = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(16).as_pointer())
        bits = builder.zext(builder.load(at, align=1), ir.IntType(32))
        # Through a general register (an empty asm) into a zeroed vector (vmovd): LLVM's own
        # choice, vpinsrw, merges into the register the previous block's scale was in, which
        # chained every block of a row (Q8_0: 12 -> 33 GB/s on one core).
        i32 = ir.IntType(32)
        bits = builder.asm(ir.FunctionType(i32, [i32]), "", "=r,0", [bits], False)
        vec = builder.insert_element(ir.Constant(ir.VectorType(i32, 4), None), bits, ir.Constant(i32, 0))
        halves = builder.fpext(builder.bitcast(vec, ir.VectorType(ir.HalfType(), 8)), ir.VectorType(ir.FloatType(), 8))
        return builder.extract_element(halves, ir.Constant(i32, 0))
    return types.float32(row, o), codegen


@intrinsic
def _get(typingctx, arr, i):
    """arr[i] for 0 <= i < arr.size, without numba's negative-index fix-up."""
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.load(builder.gep(data, [args[1]]))
    return arr.dtype(arr, i), codegen


@numba.njit(inline="always")
def _k_scale_min(row, o, s):
    """6-bit scale and min of group s from the 12 packed bytes at o (Q4_K, Q5_K)."""
    if s < 4:
        return np.float32(row[o + s] & 63), np.float32(row[o + s + 4] & 63)
    sc = (row[o + s + 4] & 15) | ((row[o + s - 4] >> 6) << 4)
    m = (row[o + s + 4] >> 4) | ((row[o + s] >> 6) << 4)
    return np.float32(sc), np.float32(m)


# --- per format: _acc_<fmt> (a[j % 32] += w[j] * x[xo + j] over one block). Integers are
# cast to int32 before float so LLVM keeps 16 lanes per vector instead of numba's int64.

@numba.njit(inline="always")
def _i(q):
    return np.float32(np.int32(q))


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
def _acc_q5_0(row, v, o, x, xo, a):
    d = _f16(row, o)
    _acc_q5(row, o, o + 6, d, np.float32(-16) * d, x, xo, a)


@numba.njit(inline="always", fastmath=FASTMATH)
def _acc_q5_1(row, v, o, x, xo, a):
    _acc_q5(row, o, o + 8, _f16(row, o), _f16(row, o + 2), x, xo, a)


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


# --- integer path: x quantized per 32-block to int16, weights multiplied in int32 ---------
# One block of 32 weights is a `_Lanes` value (an LLVM <32 x i16> vector: numba has no
# vector type, and LLVM did not turn scalar integer loops into these instructions). `_madd`
# multiplies it with 32 int16 activations and adds neighbouring products (vpmaddwd), so a
# block costs about 4 vector instructions instead of 8 float ones plus their conversions.
# int16 activations cost ~2e-5 relative error (int8, as llama.cpp uses, broke the tests).

class _LanesType(types.Type):
    def __init__(self):
        super().__init__(name="Lanes16x32")


_LANES = _LanesType()
_V16 = ir.VectorType(ir.IntType(16), 32)


@register_model(_LanesType)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16)


def _vec_at(context, builder, aty, arr, off, n):
    """Pointer to n elements of array `arr` (numba type aty) from element `off`, as a vector."""
    data = context.make_array(aty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [off]), ir.VectorType(data.type.pointee, n).as_pointer())


def _splat(builder, v, n):
    vec = builder.insert_element(ir.Constant(ir.VectorType(v.type, n), None), v, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


def _i16(builder, v):
    return builder.trunc(v, ir.IntType(16)) if v.type.width > 16 else builder.zext(v, ir.IntType(16))


@intrinsic
def _bytes(typingctx, row, o, shift, mask):
    """Lanes (row[o + j] >> shift) & mask for j < 32 (row: uint8, or int8 with mask 0 = all
    bits, sign-extended)."""
    def codegen(context, builder, sig, args):
        row, o, shift, mask = args
        v = builder.load(_vec_at(context, builder, sig.args[0], row, o, 32), align=1)
        if sig.args[0].dtype.signed:
            return builder.sext(v, _V16)
        v = builder.lshr(builder.zext(v, _V16), _splat(builder, _i16(builder, shift), 32))
        return builder.and_(v, _splat(builder, _i16(builder, mask), 32))
    return _LANES(row, o, shift, mask), codegen


@intrinsic
def _nibbles(typingctx, row, o):
    """Lanes row[o + j] & 15, then row[o + j] >> 4, for j < 16 (the Q4_0/Q4_1 order)."""
    def codegen(context, builder, sig, args):
        v = builder.load(_vec_at(context, builder, sig.args[0], args[0], args[1], 16), align=1)
        w = builder.zext(v, ir.VectorType(ir.IntType(16), 16))
        lo = builder.and_(w, _splat(builder, ir.Constant(ir.IntType(16), 15), 16))
        hi = builder.lshr(w, _splat(builder, ir.Constant(ir.IntType(16), 4), 16))
        return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
    return _LANES(row, o), codegen


@intrinsic
def _with_high(typingctx, q, row, o, shift, sub):
    """Lanes q | ((row[o + j] >> shift) & 3) << 4, minus sub (the Q6_K high bits)."""
    def codegen(context, builder, sig, args):
        q, row, o, shift, sub = args
        h = builder.zext(builder.load(_vec_at(context, builder, sig.args[1], row, o, 32), align=1), _V16)
        h = builder.lshr(h, _splat(builder, _i16(builder, shift), 32))
        h = builder.and_(h, ir.Constant(_V16, [3] * 32))
        q = builder.or_(q, builder.shl(h, ir.Constant(_V16, [4] * 32)))
        return builder.sub(q, _splat(builder, _i16(builder, sub), 32))
    return _LANES(q, row, o, shift, sub), codegen


@intrinsic
def _minus(typingctx, q, c):
    """Lanes q - c."""
    def codegen(context, builder, sig, args):
        return builder.sub(args[0], _splat(builder, _i16(builder, args[1]), 32))
    return _LANES(q, c), codegen


@intrinsic
def _madd(typingctx, a, ao, s0, s1, q, xq, xo):
    """a[ao + k] += s * (q[2k] * xq[xo + 2k] + q[2k + 1] * xq[xo + 2k + 1]) for k < 16, the
    products summed in int32 (one vpmaddwd); s = s0 for k < 8 (weights 0-15), s1 above."""
    def codegen(context, builder, sig, args):
        a, ao, s0, s1, q, xq, xo = args
        i32x16, i32x32 = ir.VectorType(ir.IntType(32), 16), ir.VectorType(ir.IntType(32), 32)
        x = builder.load(_vec_at(context, builder, sig.args[5], xq, xo, 32), align=2)
        p = builder.mul(builder.sext(q, i32x32), builder.sext(x, i32x32), flags=["nsw"])
        even, odd = (ir.Constant(i32x16, list(range(k, 32, 2))) for k in (0, 1))
        pairs = builder.add(builder.shuffle_vector(p, p, even), builder.shuffle_vector(p, p, odd), flags=["nsw"])
        f32x16 = ir.VectorType(ir.FloatType(), 16)
        s = builder.shuffle_vector(_splat(builder, s0, 16), _splat(builder, s1, 16),
                                   ir.Constant(i32x16, [0] * 8 + [16] * 8))
        at = _vec_at(context, builder, sig.args[0], a, ao, 16)
        prod = builder.fmul(builder.sitofp(pairs, f32x16), s, flags=["fast"])
        builder.store(builder.fadd(builder.load(at, align=4), prod, flags=["fast"]), at, align=4)
        return context.get_dummy_value()
    return types.none(a, ao, s0, s1, q, xq, xo), codegen


def _opaque(builder, ptr):
    """ptr, hidden from LLVM by an empty asm: a store through it is not forwarded to later
    loads, which stay loads and fold into the FMAs as broadcasts (from a register, each
    broadcast of a lane past the first cost two shuffles)."""
    return builder.asm(ir.FunctionType(ptr.type, [ptr.type]), "", "=r,0", [ptr], True)


@intrinsic
def _opaque_f32(typingctx, ptr):
    """A float32 pointer as `_opaque` gives it."""
    def codegen(context, builder, sig, args):
        return _opaque(builder, args[0])
    return ptr(ptr), codegen


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


# --- VNNI path: 8-bit products into int32 (vpdpbusd), int16 precision kept ---------------
# Where the CPU has AVX-512 VNNI, Q4_0, Q4_1, Q4_K and Q8_0 rows take vpdpbusd: 32 products of
# unsigned bytes (the weights: 4-bit values as they are, 8-bit ones plus 128) with signed
# bytes, summed by fours into 8 int32 lanes, in one instruction. x keeps its int16
# rounding, split into bytes, x = 256 * xh + xl (`quantize_rows`' xb: per block 32 xh, then
# 32 xl), so a block is two vpdpbusd and a shift; the weights' offset (-8, -128) or Q4_1's
# minimum comes back as a multiple of the block's sum of x (xsum). Bitwise the same integer
# dot as the int16 path; one core, weights in L2: Q4_0 12.4 -> 17.3, Q4_K 15.1 -> 25.2 G
# weights/s (docs/performance.md, "Kernels").

_I8x32 = ir.VectorType(ir.IntType(8), 32)
_I32x8 = ir.VectorType(ir.IntType(32), 8)
_F32x8 = ir.VectorType(ir.FloatType(), 8)


def _dpbusd(builder, acc, a, b):
    """acc + sums of four products zext(a) * sext(b) per int32 lane (a, b: <32 x i8>)."""
    if HAS_VNNI:
        fnty = ir.FunctionType(_I32x8, [_I32x8] * 3)
        name = "llvm.x86.avx512.vpdpbusd.256"
        fn = builder.module.globals.get(name) or ir.Function(builder.module, fnty, name)
        return builder.call(fn, [acc, builder.bitcast(a, _I32x8), builder.bitcast(b, _I32x8)])
    # the same in plain IR, for a target without VNNI (the kernels never run it there)
    i32x32 = ir.VectorType(ir.IntType(32), 32)
    p = builder.mul(builder.zext(a, i32x32), builder.sext(b, i32x32))
    for k in range(4):
        part = builder.shuffle_vector(p, p, ir.Constant(_I32x8, list(range(k, 32, 4))))
        acc = builder.add(acc, part)
    return acc


def _split_dot(context, builder, aty, a, ao, w, xbty, xb, xo, s):
    """a[ao:ao + 8] += s * (w . x) for x = 256 * xb[xo:xo + 32] + xb[xo + 32:xo + 64]."""
    xh = builder.load(_vec_at(context, builder, xbty, xb, xo, 32), align=1)
    xl = builder.load(_vec_at(context, builder, xbty, xb, builder.add(xo, ir.Constant(xo.type, 32)), 32), align=1)
    t = _dpbusd(builder, ir.Constant(_I32x8, [0] * 8), w, xh)
    t = _dpbusd(builder, builder.shl(t, ir.Constant(_I32x8, [8] * 8)), w, xl)
    at = _vec_at(context, builder, aty, a, ao, 8)
    prod = builder.fmul(builder.sitofp(t, _F32x8), _splat(builder, s, 8), flags=["contract"])
    builder.store(builder.fadd(builder.load(at, align=4), prod, flags=["contract"]), at, align=4)
    return context.get_dummy_value()


def _dot_split(context, builder, sig, args, w):
    """`_split_dot` for an intrinsic (a, ao, row, o, xb, xo, s) that makes w from row[o:]."""
    a, ao, _, _, xb, xo, s = args
    return _split_dot(context, builder, sig.args[0], a, ao, w, sig.args[4], xb, xo, s)


class _W8Type(types.Type):
    """32 weights as unsigned bytes, an LLVM <32 x i8> value: one block made ready for
    vpdpbusd once and dotted with several tokens (`_dot_w`)."""

    def __init__(self):
        super().__init__(name="W8x32")


_W8 = _W8Type()


@register_model(_W8Type)
class _W8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _I8x32)


@intrinsic
def _w_nibbles(typingctx, row, o):
    """The 32 4-bit weights at row[o:o + 16] (low nibbles first, as Q4_0) as a `_W8`."""
    def codegen(context, builder, sig, args):
        i8x16 = ir.VectorType(ir.IntType(8), 16)
        v = builder.load(_vec_at(context, builder, sig.args[0], args[0], args[1], 16), align=1)
        lo = builder.and_(v, ir.Constant(i8x16, [15] * 16))
        hi = builder.lshr(v, ir.Constant(i8x16, [4] * 16))
        return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
    return _W8(row, o), codegen


@intrinsic
def _w_bytes(typingctx, row, o):
    """The 32 signed 8-bit weights at row[o:o + 32] plus 128 (as unsigned) as a `_W8`."""
    def codegen(context, builder, sig, args):
        v = builder.load(_vec_at(context, builder, sig.args[0], args[0], args[1], 32), align=1)
        return builder.xor(v, ir.Constant(_I8x32, [0x80] * 32))
    return _W8(row, o), codegen


@intrinsic
def _dot_w(typingctx, a, ao, w, xb, xo, s):
    """`_split_dot` of a `_W8` block w with the token bytes at xb[xo:xo + 64]."""
    def codegen(context, builder, sig, args):
        a, ao, w, xb, xo, s = args
        return _split_dot(context, builder, sig.args[0], a, ao, w, sig.args[3], xb, xo, s)
    return types.none(a, ao, w, xb, xo, s), codegen


def _dot_half_bytes(shift):
    @intrinsic
    def dot(typingctx, a, ao, row, o, xb, xo, s):
        def codegen(context, builder, sig, args):
            v = builder.load(_vec_at(context, builder, sig.args[2], args[2], args[3], 32), align=1)
            w = builder.lshr(v, ir.Constant(_I8x32, [shift] * 32)) if shift else v
            w = builder.and_(w, ir.Constant(_I8x32, [15] * 32))
            return _dot_split(context, builder, sig, args, w)
        return types.none(a, ao, row, o, xb, xo, s), codegen
    return dot


# `_dot_split` of the low or the high nibbles of the 32 bytes at row[o:o + 32] (Q4_K)
_dot_low4, _dot_high4 = _dot_half_bytes(0), _dot_half_bytes(4)


# _blk_<fmt>(row, o): (scale d, the block as a `_W8`, the coefficient m of the block's
# offset or minimum) of a 32-weight block: w . x = d * xs * (w8 . xq) + OFF * m * xsum, with
# OFF = -8 (Q4_0), -128 (Q8_0) or 1 (Q4_1, m its minimum) applied once to a row's sum of
# m * xsum (a power of two: the same as per block, one multiply a block fewer).
OFF_Q4_0, OFF_Q4_1, OFF_Q8_0 = np.float32(-8), np.float32(1), np.float32(-128)

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


def _vnni_of(blk):
    """_vnni_<fmt>(row, o, xb, xs, xsum, b, a, ao): block b (bytes from o) into a[ao:ao + 8];
    returns the offset or minimum term. The same arithmetic, in the same order, as a
    token's share of `_dots_vnni`."""

    @numba.njit(inline="always", fastmath=FASTMATH)
    def block(row, o, xb, xs, xsum, b, a, ao):
        d, w, m = blk(row, o)
        _dot_w(a, ao, w, xb, 64 * b, d * _get(xs, b))
        return m * _get(xsum, b)

    return block


_vnni_q4_0, _vnni_q4_1, _vnni_q8_0 = _vnni_of(_blk_q4_0), _vnni_of(_blk_q4_1), _vnni_of(_blk_q8_0)


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
def _sum16(typingctx, a, o, c):
    """c + the 16 lanes a[o:o + 16] (float32), halved as vectors down to one lane, in a
    fixed order: the VNNI paths are compiled without reassociation (STRICT), so that a
    token's dot is bitwise the same from `gemv_rows` and from `gemm_rows` whatever other
    tokens it comes with."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        # as two 8-lane halves, the accesses `_split_dot` makes (a 16-lane load kept the
        # lanes out of registers: gemm_rows 33 -> 24 G weight-tokens/s)
        lo = builder.load(_vec_at(context, builder, sig.args[0], args[0], args[1], 8), align=4)
        hi = builder.load(_vec_at(context, builder, sig.args[0], args[0], builder.add(args[1], ir.Constant(args[1].type, 8)), 8), align=4)
        v = builder.fadd(lo, hi)
        n = 8
        while n > 1:
            n //= 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n, 2 * n))))
            v = builder.fadd(lo, hi)
        return builder.fadd(args[2], builder.extract_element(v, ir.Constant(i32, 0)))
    return types.float32(a, o, c), codegen


# --- int8 path: x rounded to int8 per 32-block, one 8-bit dot product per block ---------
# llama.cpp's activation form (its Q8_0 companion): x = d * q8 per 32 values, |q8| <= 127.
# A block's 32 products are summed by fours into 8 int32 lanes by one instruction where the
# CPU has VNNI (vpdpbusd, AVX-512 VNNI or AVX-VNNI) or two on AVX2 (vpmaddubsw, then vpmaddwd
# with ones). Both take unsigned weights: 4-bit ones as they are (the -8 offset or Q4_1's
# minimum comes back through the block's sum of x, as on the VNNI path), signed ones (Q8_0,
# Q6_K) as |w| against x with w's sign, so that vpmaddubsw's int16 pair sums cannot
# saturate (|w| <= 128, |q8| <= 127). x's rounding error is ~4e-3 of a block's largest
# value; docs/performance.md ("Activations") has what it does to a model's perplexity.

_AVX2_CPUS = frozenset(
    "haswell broadwell skylake skylake-avx512 cascadelake cooperlake cannonlake icelake-client"
    " icelake-server tigerlake rocketlake alderlake raptorlake meteorlake arrowlake lunarlake"
    " sapphirerapids emeraldrapids graniterapids znver1 znver2 znver3 znver4 znver5 x86-64-v3"
    " x86-64-v4".split()
)


def _target_has_avx2() -> bool:
    """Whether numba compiles for a CPU with AVX2 (the host's, or NUMBA_CPU_NAME's)."""
    if numba.config.CPU_FEATURES:
        return "+avx2" in numba.config.CPU_FEATURES.split(",")
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        return numba.config.CPU_NAME in _AVX2_CPUS
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get("avx2"))


HAS_AVX2 = _target_has_avx2()


def _call(builder, name, ret, args):
    fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _dot4(builder, acc, w, x):
    """acc + the sums of four products zext(w) * sext(x) per int32 lane (w, x: <32 x i8>;
    w <= 128, where AVX2's pairwise int16 sums stay exact)."""
    if HAS_VNNI or not HAS_AVX2:
        return _dpbusd(builder, acc, w, x)
    i16x16 = ir.VectorType(ir.IntType(16), 16)
    pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", i16x16, [w, x])
    return builder.add(acc, _call(builder, "llvm.x86.avx2.pmadd.wd", _I32x8, [pairs, ir.Constant(i16x16, [1] * 16)]))


def _dot4_signed(builder, acc, w, x):
    """`_dot4` of signed weights (-128..127): |w| against x with w's sign."""
    zero = ir.Constant(_I8x32, [0] * 32)
    neg = builder.icmp_signed("<", w, zero)
    return _dot4(builder, acc, builder.select(neg, builder.sub(zero, w), w), builder.select(neg, builder.sub(zero, x), x))


def _into_lanes(context, builder, aty, a, ao, t, s):
    """a[ao:ao + 8] += float(t) * s (t: <8 x i32>; s: a float, or <8 x float> per lane)."""
    if not isinstance(s.type, ir.VectorType):
        s = _splat(builder, s, 8)
    at = _vec_at(context, builder, aty, a, ao, 8)
    prod = builder.fmul(builder.sitofp(t, _F32x8), s, flags=["contract"])
    builder.store(builder.fadd(builder.load(at, align=4), prod, flags=["contract"]), at, align=4)
    return context.get_dummy_value()


def _load32(context, builder, aty, arr, o):
    return builder.load(_vec_at(context, builder, aty, arr, o, 32), align=1)


_NO_LANES = ir.Constant(_I32x8, [0] * 8)


@intrinsic
def _dot8_w(typingctx, a, ao, w, x8, xo, s):
    """a[ao:ao + 8] += s * (w . x8[xo:xo + 32]) for a `_W8` block w of unsigned weights."""
    def codegen(context, builder, sig, args):
        a, ao, w, x8, xo, s = args
        t = _dot4(builder, _NO_LANES, w, _load32(context, builder, sig.args[3], x8, xo))
        return _into_lanes(context, builder, sig.args[0], a, ao, t, s)
    return types.none(a, ao, w, x8, xo, s), codegen


@intrinsic
def _dot8_sw(typingctx, a, ao, w, x8, xo, s):
    """As `_dot8_w` for a block w of signed weights (`_w_raw`)."""
    def codegen(context, builder, sig, args):
        a, ao, w, x8, xo, s = args
        t = _dot4_signed(builder, _NO_LANES, w, _load32(context, builder, sig.args[3], x8, xo))
        return _into_lanes(context, builder, sig.args[0], a, ao, t, s)
    return types.none(a, ao, w, x8, xo, s), codegen


@intrinsic
def _w_raw(typingctx, row, o):
    """The 32 bytes at row[o:o + 32] as a `_W8` (Q8_0's signed weights as they are)."""
    def codegen(context, builder, sig, args):
        return _load32(context, builder, sig.args[0], args[0], args[1])
    return _W8(row, o), codegen


@numba.njit(inline="always", fastmath=FASTMATH)
def _blk8_q8_0(row, o):
    """A Q8_0 block for the int8 path: (d, its signed weights, no offset)."""
    return _f16(row, o), _w_raw(row, o + 2), np.float32(0)


def _dot8_nibbles(shift):
    @intrinsic
    def dot(typingctx, a, ao, row, o, x8, xo, s):
        def codegen(context, builder, sig, args):
            a, ao, row, o, x8, xo, s = args
            w = _load32(context, builder, sig.args[2], row, o)
            w = builder.lshr(w, ir.Constant(_I8x32, [shift] * 32)) if shift else w
            w = builder.and_(w, ir.Constant(_I8x32, [15] * 32))
            t = _dot4(builder, _NO_LANES, w, _load32(context, builder, sig.args[4], x8, xo))
            return _into_lanes(context, builder, sig.args[0], a, ao, t, s)
        return types.none(a, ao, row, o, x8, xo, s), codegen
    return dot


# a[ao:ao + 8] += s * (w . x8[xo:]) for the low or the high nibbles of the 32 bytes at row[o:] (Q4_K)
_dot8_low4, _dot8_high4 = _dot8_nibbles(0), _dot8_nibbles(4)


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


# _i8_<fmt>(row, o, x8, xs, xsum, b, a, ao): block b (bytes from o) of a row against x as
# `quantize_rows(..., int8=True)` gives it, into a[ao:ao + 8] (K-quants: lanes 0-7 and 8-15
# themselves); returns the block's offset or minimum term, as the VNNI path's blocks do.

def _i8_of(blk, dot):
    """The int8 block of a 32-weight format: the same arithmetic, in the same order, as a
    token's share of `_dots` with `dot`."""

    @numba.njit(inline="always", fastmath=FASTMATH)
    def block(row, o, x8, xs, xsum, b, a, ao):
        d, w, m = blk(row, o)
        dot(a, ao, w, x8, 32 * b, d * _get(xs, b))
        return m * _get(xsum, b)

    return block


_i8_q4_0, _i8_q4_1, _i8_q8_0 = _i8_of(_blk_q4_0, _dot8_w), _i8_of(_blk_q4_1, _dot8_w), _i8_of(_blk8_q8_0, _dot8_sw)


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


# --- generic loops, specialized per format ---------------------------------------------
# A `_pair_*` function dots two rows; `_rows_of` wraps it in the loop over a range of row
# pairs, inlined: as a function called per pair, the call and the reference counts of the
# row views it took cost as much as the dots of short rows (Q8_0 1024 x 512, 2 threads:
# 19.5 us against 10.7 inlined; SmolLM2's Q4_1 gate, 576 columns: 32.8 against 20.9).

def _pair(acc, block_elems, block_bytes, view):
    """Two rows of one format on the float path; the block routine, sizes and the element
    type they read (`view`, taken once per row: a view inside the loop costs a refcount
    call) are compile-time constants of the closure."""

    @numba.njit(inline="always", fastmath=FASTMATH)
    def pair_fmt(r0, r1, x):
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

    return pair_fmt


def _pair_int(acc, block_bytes, view):
    """Two rows on the integer path; x: (xq, xs, xsum) of one token as `quantize_rows` gives them."""
    if block_bytes > 34:
        return _pair_int_k(acc, block_bytes, view)

    @numba.njit(inline="always", fastmath=FASTMATH)
    def pair_int(r0, r1, x):
        xq, xs, xsum = x
        # 32-weight blocks in pairs, into lanes 0-15 and 16-31: two FMA chains per row.
        a0 = _lanes()
        a1 = _lanes()
        for j in range(32):
            a0[j] = 0
            a1[j] = 0
        c0 = np.float32(0)
        c1 = np.float32(0)
        v0 = r0.view(view)
        v1 = r1.view(view)
        nb = r0.size // block_bytes
        for b in range(0, nb - 1, 2):
            o = b * block_bytes
            c0 += acc(r0, v0, o, xq, xs, xsum, b, a0, 0)
            c1 += acc(r1, v1, o, xq, xs, xsum, b, a1, 0)
            c0 += acc(r0, v0, o + block_bytes, xq, xs, xsum, b + 1, a0, 16)
            c1 += acc(r1, v1, o + block_bytes, xq, xs, xsum, b + 1, a1, 16)
        if nb % 2:
            o = (nb - 1) * block_bytes
            c0 += acc(r0, v0, o, xq, xs, xsum, nb - 1, a0, 0)
            c1 += acc(r1, v1, o, xq, xs, xsum, nb - 1, a1, 0)
        for j in range(32):
            c0 += a0[j]
            c1 += a1[j]
        return c0, c1

    return pair_int


def _pair_vnni(acc, block_bytes, off=np.float32(1)):
    """Two rows on the VNNI path; x: (xb, xs, xsum) of one token as `quantize_rows` gives them.
    Blocks go in pairs into lanes 0-7 and 8-15: two accumulator chains per row."""

    @numba.njit(inline="always", fastmath=FASTMATH)
    def pair_vnni(r0, r1, x):
        xb, xs, xsum = x
        a0 = numba.carray(_stack_f32(16), (16,))
        a1 = numba.carray(_stack_f32(16), (16,))
        for j in range(16):
            a0[j] = 0
            a1[j] = 0
        c0 = np.float32(0)
        c1 = np.float32(0)
        nb = r0.size // block_bytes
        if block_bytes > 34:  # K-quants alternate the lanes within a block
            for b in range(nb):
                c0 += acc(r0, b * block_bytes, xb, xs, xsum, b, a0, 0)
                c1 += acc(r1, b * block_bytes, xb, xs, xsum, b, a1, 0)
            nb = 0
        for b in range(0, nb - 1, 2):
            o = b * block_bytes
            c0 += acc(r0, o, xb, xs, xsum, b, a0, 0)
            c1 += acc(r1, o, xb, xs, xsum, b, a1, 0)
            c0 += acc(r0, o + block_bytes, xb, xs, xsum, b + 1, a0, 8)
            c1 += acc(r1, o + block_bytes, xb, xs, xsum, b + 1, a1, 8)
        if nb % 2:
            o = (nb - 1) * block_bytes
            c0 += acc(r0, o, xb, xs, xsum, nb - 1, a0, 0)
            c1 += acc(r1, o, xb, xs, xsum, nb - 1, a1, 0)
        return _sum16(a0, 0, off * c0), _sum16(a1, 0, off * c1)

    return pair_vnni


def _pair_int_k(acc, block_bytes, view):
    """As `_pair_int` for K-quants: a 256-weight block alternates lanes 0-15 and 16-31
    itself; blocks go one at a time (in pairs, the scalar scale decoding spilled registers)."""

    @numba.njit(inline="always", fastmath=FASTMATH)
    def pair_int(r0, r1, x):
        xq, xs, xsum = x
        a0 = _lanes()
        a1 = _lanes()
        for j in range(32):
            a0[j] = 0
            a1[j] = 0
        c0 = np.float32(0)
        c1 = np.float32(0)
        v0 = r0.view(view)
        v1 = r1.view(view)
        for b in range(r0.size // block_bytes):
            c0 += acc(r0, v0, b * block_bytes, xq, xs, xsum, b, a0, 0)
            c1 += acc(r1, v1, b * block_bytes, xq, xs, xsum, b, a1, 0)
        for j in range(32):
            c0 += a0[j]
            c1 += a1[j]
        return c0, c1

    return pair_int


@numba.njit(inline="always", fastmath=FASTMATH)
def _pair_f32(r0, r1, x):
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


def _rows_of(pair, fastmath=FASTMATH):
    """y[r] = w[r] . x for rows lo..hi-1 of w (uint8 [rows, row_bytes]), in far pairs."""

    @numba.njit(nogil=True, fastmath=fastmath)
    def rows(w, x, lo, hi, y):
        half = (hi - lo + 1) // 2
        for i in range(half):
            r0, r1 = far_pair(lo, hi, half, i)
            y[r0], y[r1] = pair(w[r0], w[r1], x)

    return rows


_rows_q8_0 = _rows_of(_pair(_acc_q8_0, 32, 34, np.int8))
_rows_q4_0 = _rows_of(_pair(_acc_q4_0, 32, 18, np.uint8))
_rows_q4_1 = _rows_of(_pair(_acc_q4_1, 32, 20, np.uint8))
_rows_q5_0 = _rows_of(_pair(_acc_q5_0, 32, 22, np.uint8))
_rows_q5_1 = _rows_of(_pair(_acc_q5_1, 32, 24, np.uint8))
_rows_q4_k = _rows_of(_pair(_acc_q4_k, 256, 144, np.uint8))
_rows_q5_k = _rows_of(_pair(_acc_q5_k, 256, 176, np.uint8))
_rows_q6_k = _rows_of(_pair(_acc_q6_k, 256, 210, np.int8))
_rows_f16 = _rows_of(_pair(_acc_f16, 32, 64, np.uint16))
_rows_bf16 = _rows_of(_pair(_acc_bf16, 32, 64, np.uint16))
_rows_f32 = _rows_of(_pair_f32)
_rows_int_q8_0 = _rows_of(_pair_int(_int_q8_0, 34, np.int8))
_rows_int_q4_0 = _rows_of(_pair_int(_int_q4_0, 18, np.uint8))
_rows_int_q4_k = _rows_of(_pair_int(_int_q4_k, 144, np.uint8))
_rows_int_q6_k = _rows_of(_pair_int(_int_q6_k, 210, np.int8))
_rows_vnni_q8_0 = _rows_of(_pair_vnni(_vnni_q8_0, 34, OFF_Q8_0), STRICT)
_rows_vnni_q4_0 = _rows_of(_pair_vnni(_vnni_q4_0, 18, OFF_Q4_0), STRICT)
_rows_vnni_q4_1 = _rows_of(_pair_vnni(_vnni_q4_1, 20, OFF_Q4_1), STRICT)
_rows_vnni_q4_k = _rows_of(_pair_vnni(_vnni_q4_k, 144), STRICT)
_rows_i8_q8_0 = _rows_of(_pair_vnni(_i8_q8_0, 34), STRICT)
_rows_i8_q4_0 = _rows_of(_pair_vnni(_i8_q4_0, 18, OFF_Q4_0), STRICT)
_rows_i8_q4_1 = _rows_of(_pair_vnni(_i8_q4_1, 20, OFF_Q4_1), STRICT)
_rows_i8_q4_k = _rows_of(_pair_vnni(_i8_q4_k, 144), STRICT)
_rows_i8_q6_k = _rows_of(_pair_vnni(_i8_q6_k, 210), STRICT)
# Formats with an int8 path (`quantize_rows(..., int8=True)`), on any x86-64 CPU.
INT8_TYPES = (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)
VNNI_TYPES = (Q8_0, Q4_0, Q4_1, Q4_K) if HAS_VNNI else ()
# Formats whose GEMV takes x rounded to integers (`quantize_rows`). Q4_1 only with VNNI: on
# the int16 path it gained nothing (SmolLM2's step 7.20 vs 7.11 ms).
INT16_TYPES = (Q8_0, Q4_0, Q4_K, Q6_K)
INT_TYPES = INT16_TYPES + ((Q4_1,) if HAS_VNNI else ())

# --- several tokens per weight row (VNNI) -------------------------------------------------
# A batch of tokens (a batched decode step, the tokens an expert got) on the GEMV path
# unpacks every block once per token; here a row's block is unpacked once and dotted with
# K tokens, rows read once, front to back. A token's lanes and its offset sum run in the
# same order as `_pair_vnni` (even blocks into lanes 0-7, odd ones into 8-15), so each
# token gets the GEMV's result, bit for bit.

def _dots(blk, block_bytes, off, K, dot, step):
    """y[iy[j0 + k], r] = w[r] . x[ix[j0 + k]] for k < K (a compile-time count); w: the
    flattened rows (row r from byte r * nb * block_bytes), xb, xs, xsum: the flattened
    arrays of `quantize_rows`; nb: blocks per row; a, c, at: stack scratch (float32 16 * K
    lanes, K offset sums, K first-block indices); dot: the block dot of the path (`_dot_w` on
    split int16 bytes, `step` 64 per block; `_dot8_w`/`_dot8_sw` on int8, 32). Flat arrays and
    scratch from the caller: a row view or a carray made per call costs a reference-count
    call each, per row."""

    @numba.njit(inline="always", fastmath=FASTMATH)
    def dots(w, xb, xs, xsum, nb, ix, j0, y, iy, r, a, c, at):
        for j in range(16 * K):
            a[j] = 0
        for k in range(K):
            c[k] = 0
            at[k] = _get(ix, j0 + k) * nb  # token k's first block
        o = r * nb * block_bytes
        for b in range(0, nb - 1, 2):
            d0, w0, m0 = blk(w, o + b * block_bytes)
            d1, w1, m1 = blk(w, o + (b + 1) * block_bytes)
            for k in range(K):
                s = at[k] + b
                dot(a, 16 * k, w0, xb, step * s, d0 * _get(xs, s))
                c[k] += m0 * _get(xsum, s)
                dot(a, 16 * k + 8, w1, xb, step * s + step, d1 * _get(xs, s + 1))
                c[k] += m1 * _get(xsum, s + 1)
        if nb % 2:
            b = nb - 1
            d0, w0, m0 = blk(w, o + b * block_bytes)
            for k in range(K):
                s = at[k] + b
                dot(a, 16 * k, w0, xb, step * s, d0 * _get(xs, s))
                c[k] += m0 * _get(xsum, s)
        for k in range(K):
            y[_get(iy, j0 + k), r] = _sum16(a, 16 * k, off * c[k])

    return dots


def _gemm(blk, block_bytes, off, dot=_dot_w, step=64):
    """Rows lo..hi-1, each against `count` tokens: four at a time, the rest (1-3) at once."""
    dots4 = _dots(blk, block_bytes, off, 4, dot, step)
    dots3 = _dots(blk, block_bytes, off, 3, dot, step)
    dots2 = _dots(blk, block_bytes, off, 2, dot, step)
    dots1 = _dots(blk, block_bytes, off, 1, dot, step)

    @numba.njit(inline="always", fastmath=FASTMATH)
    def rows(w, xb, xs, xsum, ix, count, lo, hi, y, iy):
        nb = w.shape[1] // block_bytes
        wf = w.reshape(w.size)
        a = numba.carray(_stack_f32(64), (64,))
        c = numba.carray(_stack_f32(4), (4,))
        at = numba.carray(_stack_i64(4), (4,))
        rest = count % 4
        for r in range(lo, hi):
            for j in range(0, count - rest, 4):
                dots4(wf, xb, xs, xsum, nb, ix, j, y, iy, r, a, c, at)
            j = count - rest
            if rest == 3:
                dots3(wf, xb, xs, xsum, nb, ix, j, y, iy, r, a, c, at)
            elif rest == 2:
                dots2(wf, xb, xs, xsum, nb, ix, j, y, iy, r, a, c, at)
            elif rest == 1:
                dots1(wf, xb, xs, xsum, nb, ix, j, y, iy, r, a, c, at)

    return rows


_gemm_q8_0 = _gemm(_blk_q8_0, 34, OFF_Q8_0)
_gemm_q4_0 = _gemm(_blk_q4_0, 18, OFF_Q4_0)
_gemm_q4_1 = _gemm(_blk_q4_1, 20, OFF_Q4_1)
_gemm8_q8_0 = _gemm(_blk8_q8_0, 34, np.float32(1), _dot8_sw, 32)
_gemm8_q4_0 = _gemm(_blk_q4_0, 18, OFF_Q4_0, _dot8_w, 32)
_gemm8_q4_1 = _gemm(_blk_q4_1, 20, OFF_Q4_1, _dot8_w, 32)
# Formats `gemm_rows` takes (the 32-weight blocks of the VNNI path), and up to how many
# tokens it is used: one core, 512 x 1024 in L2, G weight-tokens/s for 2, 3, 4 tokens,
# Q8_0: GEMV per token 22, 22, 22, decoded float tiles 14, 15, 21, gemm_rows 25, 28, 31;
# from about 5 tokens on the float tiles are as fast and gain with every token.
MULTI_TYPES = (Q8_0, Q4_0, Q4_1) if HAS_VNNI else ()
# ... and on the int8 path, on any CPU
MULTI8_TYPES = (Q8_0, Q4_0, Q4_1)
GEMM_TOKENS = 8


@numba.njit(inline="always")
def gemm_takes(xa, t):
    """Whether `gemm_rows` takes type code t with x in the form xa (`quantize_rows`)."""
    return (xa[5].shape[1] > 0 and t in MULTI8_TYPES) or (xa[4].shape[1] > 0 and t in MULTI_TYPES)


@numba.njit(nogil=True, fastmath=STRICT)
def gemm_rows(t, w, xa, ix, iy, count, lo, hi, y):
    """y[iy[j], r] = w[r] . x[ix[j]] for j < count and rows lo..hi-1 of w (uint8 [rows,
    row_bytes], type code t as `gemm_takes` allows); xa as `quantize_rows` gives it, in
    int8 or with the split int16 bytes; ix, iy: int64 token and output row indices;
    y: float32 [*, rows]. Each token gets what `gemv_rows` gives it, bit for bit."""
    xb, xs, xsum, x8 = xa[4], xa[2], xa[3], xa[5]
    xbf, xsf, xsumf = xb.reshape(xb.size), xs.reshape(xs.size), xsum.reshape(xsum.size)
    x8f = x8.reshape(x8.size)
    if x8.shape[1]:
        if t == Q8_0:
            _gemm8_q8_0(w, x8f, xsf, xsumf, ix, count, lo, hi, y, iy)
        elif t == Q4_0:
            _gemm8_q4_0(w, x8f, xsf, xsumf, ix, count, lo, hi, y, iy)
        else:
            _gemm8_q4_1(w, x8f, xsf, xsumf, ix, count, lo, hi, y, iy)
    elif t == Q8_0:
        _gemm_q8_0(w, xbf, xsf, xsumf, ix, count, lo, hi, y, iy)
    elif t == Q4_0:
        _gemm_q4_0(w, xbf, xsf, xsumf, ix, count, lo, hi, y, iy)
    else:
        _gemm_q4_1(w, xbf, xsf, xsumf, ix, count, lo, hi, y, iy)


@numba.njit(nogil=True, fastmath=FASTMATH)
def gemv_rows(t, w, xa, n, lo, hi, y):
    """y[r] = w[r] . x[n] for rows lo..hi-1 of w (type code t, uint8 [rows, row_bytes]);
    xa: the tokens x as `quantize_rows` gives them (formats in VNNI_TYPES take the VNNI
    path where xa has the split bytes, the others in INT16_TYPES the int16 path where it
    has xq, the rest the float one); y: float32 [rows]. Rows are dotted in far pairs."""
    x, xq, xs, xsum, xb, x8 = xa
    if x8.shape[1] and t in INT8_TYPES:
        x1 = (x8[n], xs[n], xsum[n])
        if t == Q8_0:
            _rows_i8_q8_0(w, x1, lo, hi, y)
        elif t == Q4_0:
            _rows_i8_q4_0(w, x1, lo, hi, y)
        elif t == Q4_1:
            _rows_i8_q4_1(w, x1, lo, hi, y)
        elif t == Q4_K:
            _rows_i8_q4_k(w, x1, lo, hi, y)
        else:
            _rows_i8_q6_k(w, x1, lo, hi, y)
    elif xb.shape[1] and t in VNNI_TYPES:
        xv = (xb[n], xs[n], xsum[n])
        if t == Q8_0:
            _rows_vnni_q8_0(w, xv, lo, hi, y)
        elif t == Q4_0:
            _rows_vnni_q4_0(w, xv, lo, hi, y)
        elif t == Q4_1:
            _rows_vnni_q4_1(w, xv, lo, hi, y)
        else:
            _rows_vnni_q4_k(w, xv, lo, hi, y)
    elif xq.shape[1] and t in INT16_TYPES:
        xi = (xq[n], xs[n], xsum[n])
        if t == Q8_0:
            _rows_int_q8_0(w, xi, lo, hi, y)
        elif t == Q4_0:
            _rows_int_q4_0(w, xi, lo, hi, y)
        elif t == Q4_K:
            _rows_int_q4_k(w, xi, lo, hi, y)
        else:
            _rows_int_q6_k(w, xi, lo, hi, y)
    elif t == Q8_0:
        _rows_q8_0(w, x[n], lo, hi, y)
    elif t == Q4_0:
        _rows_q4_0(w, x[n], lo, hi, y)
    elif t == Q4_1:
        _rows_q4_1(w, x[n], lo, hi, y)
    elif t == Q5_0:
        _rows_q5_0(w, x[n], lo, hi, y)
    elif t == Q5_1:
        _rows_q5_1(w, x[n], lo, hi, y)
    elif t == Q4_K:
        _rows_q4_k(w, x[n], lo, hi, y)
    elif t == Q5_K:
        _rows_q5_k(w, x[n], lo, hi, y)
    elif t == Q6_K:
        _rows_q6_k(w, x[n], lo, hi, y)
    elif t == F16:
        _rows_f16(w, x[n], lo, hi, y)
    elif t == BF16:
        _rows_bf16(w, x[n], lo, hi, y)
    else:
        _rows_f32(w, x[n], lo, hi, y)


# x is rounded to at most 127 * 256 in magnitude, so that its high byte (the VNNI path's xh)
# stays within int8 however the low byte rounds; on the int8 path to at most 127.
X_MAX = 32512
X8_MAX = 127


@numba.njit(nogil=True, fastmath=FASTMATH)
def quantize_rows(x, needed=True, split=HAS_VNNI, int8=False):
    """(x, xq, xs, xsum, xb, x8): each 32-block of each row of x (float32 [N, cols]) rounded
    to integers times a scale xs [N, cols // 32], with the block's sum xsum (of the rounded
    values times xs); the form `gemv_rows` takes. Rounded to int16, xq [N, cols], and with
    `split` (the VNNI path) also xq's bytes: int8 xb [N, 2 * cols], per block 32 high bytes
    xh then 32 low ones xl, xq = 256 * xh + xl. With `int8`, rounded to int8 instead: x8
    [N, cols] (xq and xb empty).
    A block holding NaN or Inf gets scale NaN or Inf and zeros, so its dots are NaN. Not
    `needed` (no row of a format on an integer path): only x, with empty integer arrays."""
    n, cols = x.shape
    nb = cols // 32 if needed else 0
    top_q = X8_MAX if int8 else X_MAX
    xq = np.empty((n, 0 if int8 else 32 * nb), np.int16)
    x8 = np.empty((n, 32 * nb if int8 else 0), np.int8)
    xs = np.empty((n, nb), np.float32)
    xsum = np.empty((n, nb), np.float32)
    xb = np.empty((n, 64 * nb if split and not int8 else 0), np.int8)
    for i in range(n):
        bits = x[i].view(np.uint32)
        for b in range(nb):
            # max |x| as the max of the bit patterns without sign (an integer max vectorizes,
            # a float one without NaN flags does not)
            top = np.uint32(0)
            for j in range(32):
                top = max(top, bits[32 * b + j] & np.uint32(0x7FFFFFFF))
            m = _u2f(top)
            inv = np.float32(top_q) / m if m > 0 else np.float32(0)  # 0 for NaN and Inf
            s = np.float32(0)
            if int8:
                for j in range(32):
                    q = np.floor(x[i, 32 * b + j] * inv + np.float32(0.5))
                    x8[i, 32 * b + j] = np.int8(q)
                    s += q
            else:
                for j in range(32):
                    q = np.floor(x[i, 32 * b + j] * inv + np.float32(0.5))
                    xq[i, 32 * b + j] = np.int16(q)
                    s += q
            xs[i, b] = m / np.float32(top_q)
            # the sum of the rounded block: a min term (Q4_K) then cancels against the
            # integer dot exactly as in w . rounded x (with the sum of x itself, real Q4_K
            # rows were 9e-5 off, not 2e-5)
            xsum[i, b] = s * xs[i, b]
        if xb.shape[1]:
            for b in range(nb):
                for j in range(32):
                    q = np.int32(xq[i, 32 * b + j])
                    low = np.int8(q & 255)  # as signed: q - 256 * high
                    xb[i, 64 * b + 32 + j] = low
                    xb[i, 64 * b + j] = np.int8((q - np.int32(low)) >> 8)
    return x, xq, xs, xsum, xb, x8


# What an operator's `activations` kwarg asks for: x as it is (the float path of every
# format), rounded to int16 per 32-block (`INT_TYPES`; ~2e-5 relative error), or to int8
# (`INT8_TYPES`; ~4e-3 of a block's largest value). A format without the asked-for path
# takes the next one down.
ACT_FLOAT, ACT_INT16, ACT_INT8 = 0, 1, 2
ACTIVATIONS = {"float": ACT_FLOAT, "int16": ACT_INT16, "int8": ACT_INT8}
DEFAULT_ACTIVATIONS = "int16"


def check_activations(op: str, activations: str) -> int:
    """The ACT_* code of an operator's `activations` kwarg."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"{op}: activations {activations!r} is not one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[activations]


@numba.njit(inline="always")
def act_mode(acts, t):
    """The activation form (ACT_*) a weight of type code t takes under `acts`."""
    if acts == ACT_INT8 and t in INT8_TYPES:
        return ACT_INT8
    if acts != ACT_FLOAT and t in INT_TYPES:
        return ACT_INT16
    return ACT_FLOAT


@numba.njit(inline="always", fastmath=FASTMATH)
def rows_input(x, mode):
    """x (float32 [B, cols]) as `gemv_rows` and `gemm_rows` take it for weights whose
    activation form is `mode` (`act_mode`): int8 for up to GEMM_TOKENS tokens; int16 for
    one token, or up to GEMM_TOKENS with VNNI (`gemm_rows`); more tokens go through float
    tiles."""
    B = x.shape[0]
    if mode == ACT_INT8 and B <= GEMM_TOKENS:
        return quantize_rows(x, True, False, True)
    return quantize_rows(x, mode != ACT_FLOAT and (B == 1 or (HAS_VNNI and B <= GEMM_TOKENS)))


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
