"""The repacked layout the decode kernels do not have yet, measured against the row loop
they use: Q4_K with 8 rows interleaved at load, x rounded to int8 per 32 values, each
512-bit `vpdpbusd` serving 4 bytes of each of 8 rows, a group's scale applied to the 8 rows
at once, no horizontal sum a row. Checks its result against `kernels.gemv` (int8) and
prints GB/s of the original Q4_K bytes, with the weights in cache and from DRAM, 1 and 2
threads. With AVX-512 VNNI the dot is the 512-bit `vpdpbusd`; otherwise (or under
NUMBA_CPU_NAME=haswell) two 256-bit `vpmaddubsw` + `vpmaddwd`.

    python scripts/bench_repack.py
    NUMBA_CPU_NAME=haswell python scripts/bench_repack.py

Repacked block of 8 rows x 256 columns (1184 bytes against 8 x 144): the 8 rows' d and dmin
(float16), their 6-bit scales and mins unpacked to bytes ([group][row]), then for each of
the 4 pairs of groups and each quarter of it, 8 bytes of each row's nibbles (low: the even
group's weight, high: the odd one's).
"""
import sys
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType as Q
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from bench_kernels import random_weight
from hybrid.operators import kernels
from hybrid.operators.kernels.activations import ACT_INT8, ACT_INT16, quantize_rows
from hybrid.operators.kernels.intrinsics import HAS_AVX2, HAS_VNNI512, _call, _vec_at

I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def V(t, n):
    return ir.VectorType(t, n)


def repack(w):
    """Q4_K blocks uint8 [rows, row_bytes] (rows a multiple of 8) -> [rows / 8, blocks * 1184]."""
    rows, row_bytes = w.shape
    nb = row_bytes // 144
    blocks = w.reshape(rows, nb, 144)
    groups = rows // 8

    def by_group(a):  # [rows, nb, ...] -> [groups, nb, 8 rows, ...]
        return a.reshape(groups, 8, nb, *a.shape[2:]).swapaxes(1, 2)
    q = blocks[:, :, 4:16]
    scale = np.empty((rows, nb, 8), np.uint8)
    mins = np.empty((rows, nb, 8), np.uint8)
    scale[..., :4] = q[..., 0:4] & 63
    mins[..., :4] = q[..., 4:8] & 63
    scale[..., 4:] = (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)
    mins[..., 4:] = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    out = np.empty((groups, nb, 1184), np.uint8)
    out[:, :, 0:16] = by_group(blocks[:, :, 0:2]).reshape(groups, nb, 16)  # the rows' d
    out[:, :, 16:32] = by_group(blocks[:, :, 2:4]).reshape(groups, nb, 16)  # dmin
    out[:, :, 32:96] = by_group(scale).swapaxes(2, 3).reshape(groups, nb, 64)  # [group][row]
    out[:, :, 96:160] = by_group(mins).swapaxes(2, 3).reshape(groups, nb, 64)
    nibbles = by_group(blocks[:, :, 16:144]).reshape(groups, nb, 8, 4, 4, 8)  # row, pair c, quarter i, 8 bytes
    out[:, :, 160:] = nibbles.transpose(0, 1, 3, 4, 2, 5).reshape(groups, nb, 1024)  # c, i, row, 8 bytes
    return out.reshape(groups, nb * 1184)


def _block_code(context, builder, sig, args, source):
    """The 8 rows' dots over one Q4_K block (as `_block8`), the block's fields read through
    `source(builder, at) -> (d, dmin, scale(k), mins(k), nibbles(c, i))`: <8 x float> d and
    dmin of the rows, <8 x i8> scale and min of group k, <64 x i8> 8 bytes of each row's
    nibbles, quarter i of group pair c."""
    x8, xs, xsum, b, acc, accm = args[-6:]
    tys = sig.args[-6:]

    def at(arr, ty, off, n):
        return builder.load(_vec_at(context, builder, ty, arr, off, n), align=1)

    def add(v, k):
        return builder.add(v, ir.Constant(v.type, k))

    def splat(v, n):
        vec = builder.insert_element(ir.Constant(V(v.type, n), None), v, ir.Constant(I32, 0))
        return builder.shuffle_vector(vec, vec, ir.Constant(V(I32, n), [0] * n))

    def dot(acc, w8, x8v):  # acc + 4-product sums per int32 lane of <64 x i8> w (u8), x (s8)
        if HAS_VNNI512:
            return _call(builder, "llvm.x86.avx512.vpdpbusd.512", V(I32, 16),
                         [acc, builder.bitcast(w8, V(I32, 16)), builder.bitcast(x8v, V(I32, 16))])
        # AVX2: two 256-bit halves, vpmaddubsw (|products| <= 2 * 15 * 128, no saturation)
        # then vpmaddwd with ones
        parts = []
        for h in range(2):
            pick = ir.Constant(V(I32, 32), list(range(32 * h, 32 * h + 32)))
            pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", V(I16, 16),
                          [builder.shuffle_vector(w8, w8, pick), builder.shuffle_vector(x8v, x8v, pick)])
            parts.append(_call(builder, "llvm.x86.avx2.pmadd.wd", V(I32, 8), [pairs, ir.Constant(V(I16, 16), [1] * 16)]))
        return builder.add(acc, builder.shuffle_vector(parts[0], parts[1], ir.Constant(V(I32, 16), list(range(16)))))

    d, dm, scale, mins, nibbles = source(builder, at)
    g0 = builder.mul(b, ir.Constant(b.type, 8))
    fa = builder.load(_vec_at(context, builder, tys[4], acc, ir.Constant(b.type, 0), 8), align=4)
    fm = ir.Constant(V(F32, 8), [0.0] * 8)
    mask = ir.Constant(V(I8, 64), [15] * 64)
    even = ir.Constant(V(I32, 8), list(range(0, 16, 2)))
    odd = ir.Constant(V(I32, 8), list(range(1, 16, 2)))
    xs_data = context.make_array(tys[1])(context, builder, xs).data
    xsum_data = context.make_array(tys[2])(context, builder, xsum).data
    for c in range(4):
        ae = ao = ir.Constant(V(I32, 16), [0] * 16)
        xe0 = builder.mul(add(g0, 2 * c), ir.Constant(g0.type, 32))
        for i in range(4):
            v = nibbles(c, i)
            lo = builder.and_(v, mask)
            hi = builder.and_(builder.lshr(v, ir.Constant(V(I8, 64), [4] * 64)), mask)
            xe = builder.bitcast(at(x8, tys[0], add(xe0, 8 * i), 8), ir.IntType(64))
            xo = builder.bitcast(at(x8, tys[0], add(xe0, 32 + 8 * i), 8), ir.IntType(64))
            ae = dot(ae, lo, builder.bitcast(splat(xe, 8), V(I8, 64)))
            ao = dot(ao, hi, builder.bitcast(splat(xo, 8), V(I8, 64)))
        for t, k in ((ae, 2 * c), (ao, 2 * c + 1)):
            s8 = builder.add(builder.shuffle_vector(t, t, even), builder.shuffle_vector(t, t, odd))
            s = builder.fmul(builder.fmul(d, builder.uitofp(scale(k), V(F32, 8))),
                             splat(builder.load(builder.gep(xs_data, [add(g0, k)])), 8))
            fa = builder.fadd(fa, builder.fmul(builder.sitofp(s8, V(F32, 8)), s, flags=["contract"]), flags=["contract"])
    for k in range(8):
        xk = builder.load(builder.gep(xsum_data, [add(g0, k)]))
        fm = builder.fadd(fm, builder.fmul(builder.uitofp(mins(k), V(F32, 8)), splat(xk, 8), flags=["contract"]),
                          flags=["contract"])
    builder.store(fa, _vec_at(context, builder, tys[4], acc, ir.Constant(b.type, 0), 8), align=4)
    pm = _vec_at(context, builder, tys[5], accm, ir.Constant(b.type, 0), 8)
    builder.store(builder.fadd(builder.load(pm, align=4), builder.fmul(fm, dm)), pm, align=4)
    return context.get_dummy_value()


def _halves(builder, raw):
    return builder.fpext(builder.bitcast(raw, V(ir.HalfType(), 8)), V(F32, 8))


@intrinsic
def _block8(typingctx, w, group, o, x8, xs, xsum, b, acc, accm):
    """acc[0:8] += the 8 rows' dots with x8 over block b (repacked: row `group` of w, from its
    byte o); accm[0:8] += their minimum terms, dmin * sum_g m_g * xsum[8b + g]."""
    def codegen(context, builder, sig, args):
        w, group, o = args[:3]
        ary = context.make_array(sig.args[0])(context, builder, w)
        start = builder.add(builder.mul(group, cgutils.unpack_tuple(builder, ary.strides, 2)[0]), o)

        def source(builder, at):
            def field(k, n):
                return at(w, sig.args[0], builder.add(start, ir.Constant(start.type, k)), n)
            return (_halves(builder, field(0, 16)), _halves(builder, field(16, 16)), lambda k: field(32 + 8 * k, 8),
                    lambda k: field(96 + 8 * k, 8), lambda c, i: field(160 + 64 * (4 * c + i), 64))
        return _block_code(context, builder, sig, args, source)
    return types.none(w, group, o, x8, xs, xsum, b, acc, accm), codegen


@intrinsic
def _block8_rows(typingctx, w, group, o, x8, xs, xsum, b, acc, accm):
    """As `_block8` on rows 8 group .. 8 group + 7 of the original Q4_K blocks (w: uint8
    [rows, row_bytes]), block at byte o of each row: the 8-row interleave built in
    registers, no copy."""
    def codegen(context, builder, sig, args):
        w, group, o = args[:3]
        r0 = builder.mul(group, ir.Constant(group.type, 8))
        ary = context.make_array(sig.args[0])(context, builder, w)
        stride = cgutils.unpack_tuple(builder, ary.strides, 2)[0]

        def source(builder, at):
            def load(r, off, n):
                start = builder.add(builder.mul(builder.add(r0, ir.Constant(r0.type, r)), stride),
                                    builder.add(o, ir.Constant(o.type, off)))
                ptr = builder.bitcast(builder.gep(ary.data, [start]), V(I8, n).as_pointer())
                return builder.load(ptr, align=1)

            def concat(vs):  # <n x i8> values -> one <len * n x i8>
                while len(vs) > 1:
                    n = vs[0].type.count
                    vs = [builder.shuffle_vector(vs[j], vs[j + 1], ir.Constant(V(I32, 2 * n), list(range(2 * n))))
                          for j in range(0, len(vs), 2)]
                return vs[0]
            head = concat([load(r, 0, 16) for r in range(8)])  # row r's bytes 0-15 at 16r
            t = builder.shuffle_vector(head, head, ir.Constant(V(I32, 128), [16 * r + j for j in range(16) for r in range(8)]))

            def byte(j):  # byte j of the 8 rows' headers, <8 x i8>
                return builder.shuffle_vector(t, t, ir.Constant(V(I32, 8), list(range(8 * j, 8 * j + 8))))

            def half(j):  # bytes j, j + 1 as the 8 rows' float16
                lo, hi = (builder.zext(byte(j + k), V(I16, 8)) for k in (0, 1))
                return _halves(builder, builder.or_(lo, builder.shl(hi, ir.Constant(V(I16, 8), [8] * 8))))
            q = [byte(4 + k) for k in range(12)]

            def c8(v):
                return ir.Constant(V(I8, 8), [v] * 8)

            def scale(k):
                if k < 4:
                    return builder.and_(q[k], c8(63))
                return builder.or_(builder.and_(q[k + 4], c8(15)), builder.shl(builder.lshr(q[k - 4], c8(6)), c8(4)))

            def mins(k):
                if k < 4:
                    return builder.and_(q[k + 4], c8(63))
                return builder.or_(builder.lshr(q[k + 4], c8(4)), builder.shl(builder.lshr(q[k], c8(6)), c8(4)))
            cache = {}

            def nibbles(c, i):
                if c not in cache:
                    cache[c] = concat([load(r, 16 + 32 * c, 32) for r in range(8)])  # row r's 32 bytes at 32r
                return builder.shuffle_vector(cache[c], cache[c], ir.Constant(
                    V(I32, 64), [32 * r + 8 * i + k for r in range(8) for k in range(8)]))
            return half(0), half(2), scale, mins, nibbles
        return _block_code(context, builder, sig, args, source)
    return types.none(w, group, o, x8, xs, xsum, b, acc, accm), codegen


def _gemv(block, block_bytes, rows_per_group):
    """gemv(w, x8, xs, xsum, y, chunks): y[8R:8R + 8] for every group R of 8 output rows, `block`
    over each of its blocks of `block_bytes`, the groups split in `chunks`; w holds
    `rows_per_group` of its rows per group (1 repacked, 8 original)."""

    @numba.njit(nogil=True, fastmath={"contract"})
    def rows(w, x8, xs, xsum, lo, hi, y):
        acc = np.empty(8, np.float32)
        accm = np.empty(8, np.float32)
        for group in range(lo, hi):
            acc[:] = 0
            accm[:] = 0
            for b in range(w.shape[1] // block_bytes):
                block(w, group, b * block_bytes, x8, xs, xsum, b, acc, accm)
            for r in range(8):
                y[8 * group + r] = acc[r] - accm[r]

    @numba.njit(parallel=True, nogil=True)
    def gemv(w, x8, xs, xsum, y, chunks):
        groups = w.shape[0] // rows_per_group
        for c in numba.prange(chunks):
            rows(w, x8, xs, xsum, c * groups // chunks, (c + 1) * groups // chunks, y)

    return gemv


gemv8 = _gemv(_block8, 1184, 1)
gemv8_orig = _gemv(_block8_rows, 144, 8)


def main():
    if not HAS_AVX2:
        sys.exit("bench_repack.py: this prototype needs AVX2")
    print(f"repacked dot: {'512-bit vpdpbusd' if HAS_VNNI512 else 'AVX2 vpmaddubsw + vpmaddwd'}\n")
    rng = np.random.default_rng(0)
    print("| Q4_K matrix | threads | row loop, int16 x (the default) | row loop, int8 x | 8 rows repacked | 8 rows interleaved in registers |")
    print("|---|---:|---:|---:|---:|---:|")
    for rows, where in ((7168, "in cache"), (131072, "from DRAM")):
        w = random_weight(Q.Q4_K, (rows, 2048), rng)
        packed = repack(w)
        x = rng.standard_normal((1, 2048)).astype(np.float32)
        xa = quantize_rows(x, True, False, True)
        x8, xs, xsum = xa[5][0], xa[2][0], xa[3][0]
        y = np.zeros(rows, np.float32)
        ref = kernels.gemv(Q.Q4_K, w, x[0], acts=ACT_INT8)
        y2 = np.zeros(rows, np.float32)
        gemv8(packed, x8, xs, xsum, y, 1)
        gemv8_orig(w, x8, xs, xsum, y2, 1)
        for name, out in (("repacked", y), ("interleaved in registers", y2)):
            err = np.abs(out - ref).max() / np.abs(ref).max()
            if err > 1e-5:
                sys.exit(f"bench_repack.py: the {name} GEMV differs from kernels.gemv by {err:.2e} of the largest output")
        for threads in (1, 2):
            numba.set_num_threads(threads)
            runs = {
                "int16": lambda: kernels.gemv(Q.Q4_K, w, x[0], out=ref, threads=threads, acts=ACT_INT16),
                "int8": lambda: kernels.gemv(Q.Q4_K, w, x[0], out=ref, threads=threads, acts=ACT_INT8),
                "repacked": lambda: gemv8(packed, x8, xs, xsum, y, threads),
                "in registers": lambda: gemv8_orig(w, x8, xs, xsum, y2, threads),
            }
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(12 if rows < 10000 else 4):  # interleaved, best of each
                for name, fn in runs.items():
                    t = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t)
            cells = " | ".join(f"{w.nbytes / best[k] / 1e9:.1f}" for k in runs)
            print(f"| {rows} x 2048, {where} | {threads} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
