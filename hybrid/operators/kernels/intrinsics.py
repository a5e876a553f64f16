"""The target CPU and the numba building blocks every kernel path is written with: LLVM IR
intrinsics that numba does not offer (half floats, stack buffers, loads without the
negative-index fix-up, vector lanes and the x86 dot-product instructions), knowing nothing
of any GGUF format (their layouts are blocks.py's).

Three integer dot products are written here as LLVM vectors (LLVM made none of them from
scalar loops): `_madd` (vpmaddwd, int16 weights times int16 activations), `_dot_w` and its
siblings (vpdpbusd on the VNNI path: int16 activations split in bytes), `_dot8_*` (int8
activations: vpdpbusd with VNNI, vpmaddubsw + vpmaddwd on AVX2). Whether the target has
VNNI and AVX2 (`HAS_VNNI`, `HAS_AVX2`) is decided once, at import, from the host or from
NUMBA_CPU_NAME / NUMBA_CPU_FEATURES; it is part of each kernel's compiled code (numba's
cache is per CPU, so it stays consistent).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

# LLVM may reassociate and contract (needed to vectorize sums), but must keep NaN/Inf.
FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}
# The VNNI paths' flags: no reassociation, so a dot's order of operations is the source's
# and the same in every kernel that computes it (see `_sum16`).
STRICT = {"contract"}


def _host_has_vnni() -> bool:
    """Whether numba compiles for a CPU with vpdpbusd on 256-bit vectors (AVX-VNNI, or AVX-512
    VNNI with VL):
    the host's features, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES pick another target."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return False
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    return bool(features.get("avxvnni") or (features.get("avx512vnni") and features.get("avx512vl")))


HAS_VNNI = _host_has_vnni()


def _host_has_vnni512() -> bool:
    """Whether vpdpbusd also runs on 512-bit vectors (AVX-512 VNNI and BW), as `_host_has_vnni`
    the host's features unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES pick another target."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return False
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    return bool(features.get("avx512vnni") and features.get("avx512bw"))


HAS_VNNI512 = _host_has_vnni512()

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
def _i(q):
    """An integer as float32, through int32: LLVM keeps 16 lanes per vector, not numba's
    int64's 8."""
    return np.float32(np.int32(q))


@numba.njit(inline="always")
def _u32(row, o):
    """The little-endian uint32 at row[o:o + 4]."""
    return (np.uint32(row[o]) | (np.uint32(row[o + 1]) << np.uint32(8))
            | (np.uint32(row[o + 2]) << np.uint32(16)) | (np.uint32(row[o + 3]) << np.uint32(24)))


# --- int16 path: x quantized per 32-block to int16, weights multiplied in int32 -----------
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
def _prefetch(typingctx, arr, o, n):
    """Asks the CPU to bring arr's bytes o .. o + n - 1 into its caches, a 64-byte line at a
    time (prefetcht0; bytes past arr's end are harmless: a prefetch never faults)."""
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        start = builder.ptrtoint(builder.bitcast(data, i8p), ir.IntType(64))
        start = builder.add(start, args[1])
        fn = builder.module.globals.get("llvm.prefetch.p0") or ir.Function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        with cgutils.for_range_slice(builder, ir.Constant(ir.IntType(64), 0), args[2], ir.Constant(ir.IntType(64), 64)) as (at, _):
            ptr = builder.inttoptr(builder.add(start, at), i8p)
            builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(arr, types.int64, types.int64), codegen


# --- MXFP4: 4-bit E2M1 codes looked up in a 16-entry table ------------------------------
# A code's value, doubled so that it is an integer: 0, 1, 2, 3, 4, 6, 8, 12, then the same
# negated (bit 3 the sign). One pshufb (SSSE3, on every x86-64 CPU numba targets) looks up
# 16 codes; the block's scale carries the halving.
E2M1 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _e2m1(builder, context, rty, row, o, table):
    """<32 x i8>: table[code] for the 32 codes at row[o:o + 16], low nibbles first."""
    i8x16 = ir.VectorType(ir.IntType(8), 16)
    v = builder.load(_vec_at(context, builder, rty, row, o, 16), align=1)
    lo = builder.and_(v, ir.Constant(i8x16, [15] * 16))
    hi = builder.lshr(v, ir.Constant(i8x16, [4] * 16))
    t = ir.Constant(i8x16, [c & 0xFF for c in table])
    look = [_call(builder, "llvm.x86.ssse3.pshuf.b.128", i8x16, [t, n]) for n in (lo, hi)]
    return builder.shuffle_vector(look[0], look[1], ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))


@intrinsic
def _w_e2m1(typingctx, row, o):
    """The 32 E2M1 codes at row[o:o + 16] as a `_W8` of their doubled values plus 12 (0-24,
    unsigned: the -12 comes back through the block's sum of x, as Q4_0's -8)."""
    def codegen(context, builder, sig, args):
        return _e2m1(builder, context, sig.args[0], args[0], args[1], [c + 12 for c in E2M1])
    return _W8(row, o), codegen


@intrinsic
def _e2m1_lanes(typingctx, row, o):
    """The 32 E2M1 codes at row[o:o + 16] as `_Lanes` of their doubled values (int16 path)."""
    def codegen(context, builder, sig, args):
        return builder.sext(_e2m1(builder, context, sig.args[0], args[0], args[1], E2M1), _V16)
    return _LANES(row, o), codegen


@intrinsic
def _e2m1_fma(typingctx, a, row, o, d, x, xo):
    """a[0:32] += d * w[j] * x[xo + j] for the doubled values w of the 32 E2M1 codes at
    row[o:o + 16] (the float path); x: None writes d * w[j] into a[xo:xo + 32] (a row
    decoder)."""
    decode = isinstance(x, types.NoneType)

    def codegen(context, builder, sig, args):
        a, row, o, d, x, xo = args
        f32x32 = ir.VectorType(ir.FloatType(), 32)
        w = builder.sitofp(_e2m1(builder, context, sig.args[1], row, o, E2M1), f32x32)
        w = builder.fmul(w, _splat(builder, d, 32), flags=["fast"])
        if decode:
            builder.store(w, _vec_at(context, builder, sig.args[0], a, xo, 32), align=4)
        else:
            xv = builder.load(_vec_at(context, builder, sig.args[4], x, xo, 32), align=4)
            at = _vec_at(context, builder, sig.args[0], a, ir.Constant(ir.IntType(64), 0), 32)
            builder.store(builder.fadd(builder.load(at, align=4), builder.fmul(w, xv, flags=["fast"]), flags=["fast"]), at, align=4)
        return context.get_dummy_value()
    return types.none(a, row, o, d, x, xo), codegen
