"""Many tokens against one weight matrix in 8-bit dot products: 16 rows at a time, their
weights interleaved so that one vector lane is one row.

The L1 tiles of batch.py multiply float32 weights decoded from the blocks: 4 rows x 2 tokens
of FMAs, 16 products an instruction with AVX-512 (the real-scale MoE's 512-token prefill
reached 22-29 G multiply-adds/s on one core). Here x is in the integer form of the GEMV
paths (`quantize_rows`: the int16 split in bytes with VNNI, or int8), and a panel of 16 rows
is unpacked once per step of 256 columns into a 4 KB buffer laid out as
[group s][column quad q][row r][4 bytes]: for one group of 32 columns and one token, eight
`vpdpbusd` each multiply the 4 bytes of x of one quad (broadcast) with that quad of all 16
rows, 64 products an instruction, summed per row in int32 (split x: eight more for the low
bytes). Then one conversion and two FMAs per group of 32 columns and token: the group's
scale per row times the token's x scale, and its offset or minimum per row times the
token's block sum (as on the VNNI GEMV path). Four tokens share each load of the weights
(the 1-3 left over go one at a time).

Used by `matmul` for more than GEMM_TOKENS tokens and by the fused MoE's experts with more
than EXPERT_GEMV_TOKENS tokens, for the formats with a `panel` in formats.py's table, when x
is in integer form (int16 with VNNI, or int8). A token's result does not depend on the
other tokens of the call; it differs from its GEMV's in the last bits (another order of
sums).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .activations import ACT_INT8, ACT_INT16, quantize_rows
from .formats import FORMATS, PANEL8_TYPES, PANEL_TYPES
from .intrinsics import FASTMATH, HAS_VNNI512, _dot4, _I32x8, _splat, _stack_i64, _vec_at
from .policy import TILE_X_BYTES

# Rows per panel: the int32 lanes of a 512-bit vector.
PANEL = 16
_GROUP_BYTES = 32 * PANEL  # one group of 32 columns of the panel in the buffer

_I32x16 = ir.VectorType(ir.IntType(32), 16)
_I8x64 = ir.VectorType(ir.IntType(8), 64)
_F32x16 = ir.VectorType(ir.FloatType(), 16)


def _dp16(builder, acc, w, x):
    """acc + per int32 lane the sum of four products zext(w) * sext(x) (acc: <16 x i32>; w,
    x: <64 x i8>): one vpdpbusd on 512 bits, else two 256-bit `_dot4`."""
    if HAS_VNNI512:
        name = "llvm.x86.avx512.vpdpbusd.512"
        fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(_I32x16, [_I32x16] * 3), name)
        return builder.call(fn, [acc, builder.bitcast(w, _I32x16), builder.bitcast(x, _I32x16)])
    halves = []
    for h in range(2):
        lanes = ir.Constant(_I32x8, list(range(8 * h, 8 * h + 8)))
        bytes_ = ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32 * h, 32 * h + 32)))
        halves.append(_dot4(builder, builder.shuffle_vector(acc, acc, lanes), builder.shuffle_vector(w, w, bytes_),
                            builder.shuffle_vector(x, x, bytes_)))
    return builder.shuffle_vector(halves[0], halves[1], ir.Constant(_I32x16, list(range(16))))


def _dots(K, split):
    """An intrinsic dots(acc, ao, buf, bo, xq, xo, sc, mn, so, xs, xi, x16, xj) for K tokens
    (1 or 4) and one group of 32 columns of a panel: for k < K and rows r < 16,
    acc[ao + 16k + r] += sum over the group's halves h (16 columns each) of
    sc[so + 128h + r] * xs[xi[k]] * (w_rh . x_kh) + mn[so + 128h + r] * x16[xj[k] + h],
    w_r: the group's bytes of row r at buf[bo:] (`_put` layout), x_k: xq[xo[k]:] (split: 32
    high bytes then 32 low ones; else 32 int8), x16: the tokens' sums of x per 16. One code
    for every format: a format with one scale per group has the same in both halves."""

    @intrinsic
    def dots(typingctx, acc, ao, buf, bo, xq, xo, sc, mn, so, xs, xi, x16, xj):
        def codegen(context, builder, sig, args):
            acc, ao, buf, bo, xq, xo, sc, mn, so, xs, xi, x16, xj = args
            i32, i64 = ir.IntType(32), ir.IntType(64)
            names = ("acc", "ao", "buf", "bo", "xq", "xo", "sc", "mn", "so", "xs", "xi", "x16", "xj")
            ty = dict(zip(names, sig.args))

            def item(name, arr, i):
                data = context.make_array(ty[name])(context, builder, arr).data
                return builder.load(builder.gep(data, [i]))

            offs = [item("xo", xo, ir.Constant(i64, k)) for k in range(K)]
            xdata = context.make_array(ty["xq"])(context, builder, xq).data

            def x4(k, at):  # 4 bytes of x, broadcast to every lane
                p = builder.bitcast(builder.gep(xdata, [builder.add(offs[k], ir.Constant(offs[k].type, at))]), i32.as_pointer())
                return builder.bitcast(_splat(builder, builder.load(p, align=1), 16), _I8x64)

            zero = ir.Constant(_I32x16, [0] * 16)
            hi = [[zero] * K for _ in range(2)]
            lo = [[zero] * K for _ in range(2)]
            for q in range(8):
                at = builder.add(bo, ir.Constant(bo.type, 64 * q))
                w = builder.load(_vec_at(context, builder, ty["buf"], buf, at, 64), align=16)
                for k in range(K):
                    hi[q // 4][k] = _dp16(builder, hi[q // 4][k], w, x4(k, 4 * q))
                    if split:
                        lo[q // 4][k] = _dp16(builder, lo[q // 4][k], w, x4(k, 32 + 4 * q))
            scale, minus = [], []
            for h in range(2):
                at = builder.add(so, ir.Constant(so.type, 128 * h))
                scale.append(builder.load(_vec_at(context, builder, ty["sc"], sc, at, 16), align=4))
                minus.append(builder.load(_vec_at(context, builder, ty["mn"], mn, at, 16), align=4))
            flags = ["contract"]
            for k in range(K):
                sx = _splat(builder, item("xs", xs, item("xi", xi, ir.Constant(i64, k))), 16)
                at = _vec_at(context, builder, ty["acc"], acc, builder.add(ao, ir.Constant(ao.type, 16 * k)), 16)
                a = builder.load(at, align=4)
                for h in range(2):
                    t = builder.add(builder.shl(hi[h][k], ir.Constant(_I32x16, [8] * 16)), lo[h][k]) if split else hi[h][k]
                    a = builder.fadd(a, builder.fmul(builder.sitofp(t, _F32x16), builder.fmul(scale[h], sx, flags=flags), flags=flags), flags=flags)
                    total = item("x16", x16, builder.add(item("xj", xj, ir.Constant(i64, k)), ir.Constant(i64, h)))
                    a = builder.fadd(a, builder.fmul(minus[h], _splat(builder, total, 16), flags=flags), flags=flags)
                builder.store(a, at, align=4)
            return context.get_dummy_value()
        return types.none(acc, ao, buf, bo, xq, xo, sc, mn, so, xs, xi, x16, xj), codegen

    return dots


@intrinsic
def _put(typingctx, buf, bo, w0, w1, w2, w3):
    """Four rows' `_W8` groups into the buffer: quad q of row i at buf[bo + 64q + 4i:]
    (bo: the group's offset plus 4 times its first row)."""
    def codegen(context, builder, sig, args):
        buf, bo = args[:2]
        i32x32 = ir.VectorType(ir.IntType(32), 32)
        rows = [builder.bitcast(w, _I32x8) for w in args[2:]]
        pair0 = builder.shuffle_vector(rows[0], rows[1], ir.Constant(ir.VectorType(ir.IntType(32), 16), list(range(16))))
        pair1 = builder.shuffle_vector(rows[2], rows[3], ir.Constant(ir.VectorType(ir.IntType(32), 16), list(range(16))))
        both = builder.shuffle_vector(pair0, pair1, ir.Constant(i32x32, list(range(32))))
        data = context.make_array(sig.args[0])(context, builder, buf).data
        for q in range(8):
            quad = builder.shuffle_vector(both, both, ir.Constant(ir.VectorType(ir.IntType(32), 4), [8 * i + q for i in range(4)]))
            at = builder.gep(data, [builder.add(bo, ir.Constant(bo.type, 64 * q))])
            builder.store(quad, builder.bitcast(at, ir.VectorType(ir.IntType(32), 4).as_pointer()), align=4)
        return context.get_dummy_value()
    return types.none(buf, bo, w0, w1, w2, w3), codegen


def _fill(sub, off, halves):
    """fill(w, r0, hi, o, groups, buf, sc, mn): the panel of rows r0..r0+15 (a row past hi-1
    repeats hi-1) of the step at byte o of each row into buf, with sc[16s + i] the scale of
    the first half of group s of row r0 + i, mn[16s + i] its offset coefficient (OFF * m),
    and the second half's at 128 + 16s + i (the same, without `halves`)."""

    @numba.njit(inline="always", fastmath=FASTMATH)
    def one_halves(row, o, s, sc, mn, j):
        d, w, m, d1, m1 = sub(row, o, s)
        sc[j], mn[j], sc[128 + j], mn[128 + j] = d, off * m, d1, off * m1
        return w

    @numba.njit(inline="always", fastmath=FASTMATH)
    def one_group(row, o, s, sc, mn, j):
        d, w, m = sub(row, o, s)
        sc[j], mn[j], sc[128 + j], mn[128 + j] = d, off * m, d, off * m
        return w

    one = one_halves if halves else one_group

    @numba.njit(inline="always", fastmath=FASTMATH)
    def fill(w, r0, hi, o, groups, buf, sc, mn):
        for i in range(0, PANEL, 4):
            ra = w[min(r0 + i, hi - 1)]
            rb = w[min(r0 + i + 1, hi - 1)]
            rc = w[min(r0 + i + 2, hi - 1)]
            rd = w[min(r0 + i + 3, hi - 1)]
            for s in range(groups):
                j = PANEL * s + i
                _put(buf, _GROUP_BYTES * s + 4 * i, one(ra, o, s, sc, mn, j), one(rb, o, s, sc, mn, j + 1),
                     one(rc, o, s, sc, mn, j + 2), one(rd, o, s, sc, mn, j + 3))

    return fill


def _fill_by_type(fills):
    """fill(t, w, r0, hi, o, groups, buf, sc, mn) of type code t from ((code, fill), ...),
    an if/else chain (the last takes every code not listed before it)."""
    code, first = fills[0]
    if len(fills) == 1:
        @numba.njit(inline="always")
        def last(t, w, r0, hi, o, groups, buf, sc, mn):
            first(w, r0, hi, o, groups, buf, sc, mn)

        return last
    rest = _fill_by_type(fills[1:])

    @numba.njit(inline="always")
    def pick(t, w, r0, hi, o, groups, buf, sc, mn):
        if t == code:
            first(w, r0, hi, o, groups, buf, sc, mn)
        else:
            rest(t, w, r0, hi, o, groups, buf, sc, mn)

    return pick


_PANEL_FORMATS = tuple(f for f in FORMATS if f.panel)
_fill_any = _fill_by_type(tuple((f.code, _fill(f.panel.sub, f.panel.off, f.panel.halves)) for f in _PANEL_FORMATS))
_STEP_CODES = np.array([f.code for f in _PANEL_FORMATS], np.int64)
_STEP_BYTES = np.array([f.panel.step_bytes for f in _PANEL_FORMATS], np.int64)


@numba.njit(inline="always")
def _step_bytes(t):
    for i in range(_STEP_CODES.size):
        if _STEP_CODES[i] == t:
            return _STEP_BYTES[i]
    return _STEP_BYTES[0]


def _panels(split):
    """rows(t, w, x, lo, hi, y): y[iy[j], r] = w[r] . x[ix[j]] for j < count and rows
    lo..hi-1 of a weight of type code t (one with a `panel`); x: (xq, xs, ix, iy, count,
    xv) with xq the split bytes (`split`) or the int8 x of `quantize_rows`, [N, *], and xv
    the rounded x itself (int16 or int8), whose sums per 16 the offsets take. Only the
    unpacking (`fill`) is per format: the token loop, the code that takes LLVM the longest,
    is compiled once for all of them."""
    dots4, dots1 = _dots(4, split), _dots(1, split)
    xstep = 64 if split else 32

    @numba.njit(inline="always", fastmath=FASTMATH)
    def rows(t, w, x, lo, hi, y):
        xq, xs, ix, iy, count, xv = x
        nb32 = xs.shape[1]
        xqf, xsf = xq.reshape(xq.size), xs.reshape(xs.size)
        row_bytes = w.shape[1]
        step_bytes = _step_bytes(t)
        per_chunk = max(4, TILE_X_BYTES // max(1, xq.shape[1]))  # tokens whose x stays in L2
        buf = np.empty(8 * _GROUP_BYTES, np.uint8)
        sc = np.empty(16 * PANEL, np.float32)
        mn = np.empty(16 * PANEL, np.float32)
        acc = np.empty(PANEL * min(count, per_chunk), np.float32)
        x16 = np.empty(2 * nb32 * min(count, per_chunk), np.float32)
        xo = numba.carray(_stack_i64(4), (4,))
        xi = numba.carray(_stack_i64(4), (4,))
        xj = numba.carray(_stack_i64(4), (4,))
        for t0 in range(0, count, per_chunk):
            t1 = min(count, t0 + per_chunk)
            n = t1 - t0
            rest = n % 4
            for j in range(n):  # the tokens' sums of rounded x per 16, times their block's scale
                v = xv[ix[t0 + j]]
                for g in range(2 * nb32):
                    total = np.int32(0)
                    for c in range(16 * g, 16 * g + 16):
                        total += np.int32(v[c])
                    x16[2 * nb32 * j + g] = np.float32(total) * xs[ix[t0 + j], g >> 1]
            for r0 in range(lo, hi, PANEL):
                acc[: PANEL * n] = 0
                for o in range(0, row_bytes, step_bytes):
                    groups = min(8, (row_bytes - o) * 8 // step_bytes)
                    _fill_any(t, w, r0, hi, o, groups, buf, sc, mn)
                    g0 = o * 8 // step_bytes  # the step's first group of 32 columns
                    for s in range(groups):
                        for j in range(t0, t1 - rest, 4):
                            for k in range(4):
                                xi[k] = ix[j + k] * nb32 + g0 + s
                                xo[k] = xstep * xi[k]
                                xj[k] = 2 * (nb32 * (j + k - t0) + g0 + s)
                            dots4(acc, PANEL * (j - t0), buf, _GROUP_BYTES * s, xqf, xo, sc, mn, PANEL * s, xsf, xi, x16, xj)
                        for j in range(t1 - rest, t1):  # one at a time (fewer variants to compile)
                            xi[0] = ix[j] * nb32 + g0 + s
                            xo[0] = xstep * xi[0]
                            xj[0] = 2 * (nb32 * (j - t0) + g0 + s)
                            dots1(acc, PANEL * (j - t0), buf, _GROUP_BYTES * s, xqf, xo, sc, mn, PANEL * s, xsf, xi, x16, xj)
                for j in range(t0, t1):
                    yr = y[iy[j]]
                    for i in range(min(PANEL, hi - r0)):
                        yr[r0 + i] = acc[PANEL * (j - t0) + i]

    return rows


_split_panels = _panels(True)
_int8_panels = _panels(False)


@numba.njit(inline="always")
def panel_takes(xa, t):
    """Whether `panel_rows` takes type code t with x in the form xa (`quantize_rows`)."""
    return (xa[5].shape[1] > 0 and t in PANEL8_TYPES) or (xa[4].shape[1] > 0 and t in PANEL_TYPES)


@numba.njit(nogil=True, fastmath=FASTMATH)
def panel_rows(t, w, xa, ix, iy, count, lo, hi, y):
    """y[iy[j], r] = w[r] . x[ix[j]] for j < count and rows lo..hi-1 of w (uint8 [rows,
    row_bytes], type code t as `panel_takes` allows; lo a multiple of 16 reads whole
    panels); xa as `quantize_rows` gives it; ix, iy: int64 token and output row indices;
    y: float32 [*, rows]."""
    _, xq, xs, _, xb, x8 = xa
    if x8.shape[1]:
        _int8_panels(t, w, (x8, xs, ix, iy, count, x8), lo, hi, y)
    else:
        _split_panels(t, w, (xb, xs, ix, iy, count, xq), lo, hi, y)


def panel_form(t: int, mode: int) -> bool:
    """Whether `matmul_panels` takes type code t in activation form `mode` (`act_mode`)."""
    return (mode == ACT_INT8 and t in PANEL8_TYPES) or (mode == ACT_INT16 and t in PANEL_TYPES)


def panel_chunks(rows: int, threads: int) -> int:
    """Row chunks for panels: one per thread, at most one per panel."""
    return max(1, min(threads, -(-rows // PANEL)))


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def matmul_panels(t, w, x, y, chunks, mode):
    """y[n] = w @ x[n] for every token of x (float32 [N, cols]) in the activation form
    `mode` (`panel_form` true for it); rows split in `chunks` of whole panels (one per
    thread)."""
    rows = w.shape[0]
    count = x.shape[0]
    xa = quantize_rows(x, True, False, True) if mode == ACT_INT8 else quantize_rows(x, True, True)
    tokens = np.arange(count)
    panels = (rows + PANEL - 1) // PANEL
    for c in prange(chunks):
        lo = min(rows, c * panels // chunks * PANEL)
        hi = min(rows, (c + 1) * panels // chunks * PANEL)
        panel_rows(t, w, xa, tokens, tokens, count, lo, hi, y)
