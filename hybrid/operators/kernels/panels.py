"""Prefill on integer panels: 16 weight rows against many tokens, 64 products an instruction.

The decoded float tiles (batch.py) multiply one weight by one token per FMA lane. Here the
weights stay integers, as GGUF stores them, and so does x (its int16 form split in bytes,
`quantize_rows`' xb, or its int8 form):
- a panel is 16 rows; for each step of 256 columns its weights are unpacked once into a
  4 KB buffer laid out [group of 32 columns][column quad][row][4 bytes] (`_fill`), with the
  scales and offsets of each row's half-groups of 16 columns (sc, mn);
- one `vpdpbusd` multiplies the 4 bytes of x at a column quad, broadcast, with that quad of
  all 16 rows: 64 products summed by fours into one int32 lane per row (512-bit with AVX-512
  VNNI, two 256-bit halves with AVX-VNNI, `vpmaddubsw` + `vpmaddwd` on AVX2 for int8 x);
- four tokens share each load of the weights (`_step4`), and the integer sums of a group
  (of a half group for Q6_K, whose scales are per 16 columns) become floats once:
  y += xs * (sc * dot) - mn * (sum of x over the group).

The offsets (Q4_0's -8, Q5_0's -16, MXFP4's -12, Q8_0's stored +128, Q6_K's -32, Q4_1's
and Q4_K's minimums) come back through the tokens' sums of x per 16 columns (`panel_input`),
so the unsigned bytes go into vpdpbusd as they are. Formats: Q8_0, Q4_0, Q4_1, Q5_0, MXFP4,
Q4_K, Q6_K; a 32-weight format's row that is not whole steps ends in a partial one, whose
groups go one by one. On a CPU without VNNI only the int8 form, and not Q8_0 (whose bytes
up to 255 would saturate vpmaddubsw's pair sums).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .activations import ACT_INT8, ACT_INT16, quantize_rows
from .blocks import _e8m0_half, _k_scale_min
from .formats import MXFP4, PANEL8_TYPES, PANEL_TYPES, Q4_0, Q4_K, Q5_0, Q6_K, Q8_0
from .intrinsics import E2M1, FASTMATH, HAS_VNNI, HAS_VNNI512, _call, _dot4, _e2m1, _f16, _splat, _u32, _vec_at

PANEL = 16  # rows per panel: the int32 lanes of one 512-bit vector
STEP = 256  # columns unpacked per fill: a K-quant super-block, 8 blocks of the 32-formats
NO_FORM, SPLIT, INT8 = 0, 1, 2


@numba.njit(inline="always")
def panel_form(t, mode):
    """How rows of type code t go through the panels for the activation form `mode`
    (activations.ACT_*): SPLIT (int16 x in bytes, VNNI), INT8, or NO_FORM. Any row length
    goes: a row's last step may be part of one (`panel_dots`)."""
    if mode == ACT_INT16 and HAS_VNNI and t in PANEL_TYPES:
        return SPLIT
    if mode == ACT_INT8 and t in PANEL8_TYPES:
        return INT8
    return NO_FORM


# --- the product: 4 tokens against one filled step ----------------------------------------

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I32x16 = ir.VectorType(_I32, 16)
_I8x64 = ir.VectorType(_I8, 64)
_F32x16 = ir.VectorType(ir.FloatType(), 16)


def _half(builder, v, n, hi):
    """The low or high half (n lanes) of vector v."""
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n * hi, n * hi + n))))


def _dot16(builder, acc, w, x):
    """acc + the sums of four products zext(w) * sext(x) per int32 lane (acc: 16 lanes; w, x:
    64 bytes): one 512-bit vpdpbusd with AVX-512 VNNI, else two 256-bit `_dot4`."""
    if HAS_VNNI512:
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", _I32x16,
                     [acc, builder.bitcast(w, _I32x16), builder.bitcast(x, _I32x16)])
    lo = _dot4(builder, _half(builder, acc, 8, 0), _half(builder, w, 32, 0), _half(builder, x, 32, 0))
    hi = _dot4(builder, _half(builder, acc, 8, 1), _half(builder, w, 32, 1), _half(builder, x, 32, 1))
    return builder.shuffle_vector(lo, hi, ir.Constant(_I32x16, list(range(16))))


def _at(context, builder, aty, arr, off, k=0):
    """Pointer to element off + k of a 1-D array."""
    data = context.make_array(aty)(context, builder, arr).data
    return builder.gep(data, [builder.add(off, ir.Constant(off.type, k))])


def _step4(split, halves, groups=8):
    """The intrinsic that adds 4 tokens' products with one filled step to their rows of y:
    (y, y0..y3, buf, sc, mn, x, x0..x3, xs, s0..s3, x16) with y float32 (16 per token from
    y0..y3), buf the step's 4096 weight bytes, sc/mn float32 [8 groups][2 halves][16 rows],
    x the tokens' bytes (from x0..x3: per 32-block 32 high then 32 low bytes with `split`,
    else 32 int8), xs their block scales (from s0..s3) and x16 their sums per 16 columns
    (from 2 * s0..s3). Without `halves` (one scale per group: every format but Q6_K) a
    group's 8 quads go into one sum, which saves a shift and a conversion per 8 vpdpbusd
    (both share the port vpdpbusd runs on). `groups` < 8: only the first groups of the step
    (a row's last, partial step, given views that start at its group). Duplicate tokens are
    fine: all of y is read before any is written."""
    per_block = 64 if split else 32
    parts = ((0, 4), (4, 8)) if halves else ((0, 8),)

    @intrinsic
    def step4(typingctx, y, y0, y1, y2, y3, buf, sc, mn, x, x0, x1, x2, x3, xs, s0, s1, s2, s3, x16):
        def codegen(context, builder, sig, args):
            (y, y0, y1, y2, y3, buf, sc, mn, x, x0, x1, x2, x3, xs, s0, s1, s2, s3, x16) = args
            ty = sig.args
            yo, xo, so = (y0, y1, y2, y3), (x0, x1, x2, x3), (s0, s1, s2, s3)
            ys = [builder.load(_vec_at(context, builder, ty[0], y, o, 16), align=4) for o in yo]
            zero = ir.Constant(_I32x16, [0] * 16)
            for g in range(groups):
                w = [builder.load(_vec_at(context, builder, ty[5], buf, ir.Constant(y0.type, 512 * g + 64 * q), 64),
                                  align=1) for q in range(8)]
                scv = [builder.load(_vec_at(context, builder, ty[6], sc, ir.Constant(y0.type, 32 * g + 16 * h), 16),
                                    align=4) for h in range(2)]
                mnv = [builder.load(_vec_at(context, builder, ty[7], mn, ir.Constant(y0.type, 32 * g + 16 * h), 16),
                                    align=4) for h in range(2)]
                for t in range(4):
                    def quad(k):  # the token's 4 bytes at byte k of this block, in every lane
                        p = builder.bitcast(_at(context, builder, ty[8], x, xo[t], per_block * g + k), _I32.as_pointer())
                        return builder.bitcast(_splat(builder, builder.load(p, align=1), 16), _I8x64)
                    xs_g = builder.load(_at(context, builder, ty[13], xs, so[t], g))
                    s2 = builder.add(so[t], so[t])
                    sums = [builder.load(_at(context, builder, ty[18], x16, s2, 2 * g + h)) for h in range(2)]
                    for h, (q0, q1) in enumerate(parts):
                        # two chains of at most 4 vpdpbusd each, so that 8 chains (4 tokens x
                        # 2) hide the instruction's latency; one shift and one conversion
                        # per sum
                        mid = (q0 + q1) // 2
                        acc = zero
                        for q in range(q0, mid):
                            acc = _dot16(builder, acc, w[q], quad(4 * q))
                        if halves:
                            for q in range(mid, q1):
                                acc = _dot16(builder, acc, w[q], quad(4 * q))
                        else:
                            other = zero
                            for q in range(mid, q1):
                                other = _dot16(builder, other, w[q], quad(4 * q))
                            acc = builder.add(acc, other)
                        if split:  # x = 256 * high byte + low byte
                            acc = builder.shl(acc, ir.Constant(_I32x16, [8] * 16))
                            other = zero
                            for q in range(q0, mid):
                                acc = _dot16(builder, acc, w[q], quad(32 + 4 * q))
                            for q in range(mid, q1):
                                other = _dot16(builder, other, w[q], quad(32 + 4 * q))
                            acc = builder.add(acc, other)
                        s16 = sums[h] if halves else builder.fadd(sums[0], sums[1])
                        scaled = builder.fmul(scv[h], _splat(builder, xs_g, 16), flags=["contract"])
                        term = builder.fmul(builder.sitofp(acc, _F32x16), scaled, flags=["contract"])
                        off = builder.fmul(mnv[h], _splat(builder, s16, 16), flags=["contract"])
                        ys[t] = builder.fsub(builder.fadd(ys[t], term, flags=["contract"]), off, flags=["contract"])
            for t in range(4):
                builder.store(ys[t], _vec_at(context, builder, ty[0], y, yo[t], 16), align=4)
            return context.get_dummy_value()
        return types.none(y, y0, y1, y2, y3, buf, sc, mn, x, x0, x1, x2, x3, xs, s0, s1, s2, s3, x16), codegen
    return step4


_split_halves, _split_groups = _step4(True, True), _step4(True, False)
_int8_halves, _int8_groups = _step4(False, True), _step4(False, False)
# One group of 32 columns: the groups of a row's last step where its columns are not whole
# steps (the 32-weight formats only; a K-quant row is whole super-blocks).
_split_group, _int8_group = _step4(True, False, 1), _step4(False, False, 1)


# --- filling a step: 16 rows' weights as unsigned bytes, transposed into quads ------------
# buf32 (the buffer as uint32): word [g][q][i] = weights 4q..4q+3 of group g of row i.
# sc, mn: [g][half][i]; a weight is sc * (stored byte) minus mn / (sum of x) per half group.

_NIB = np.uint32(0x0F0F0F0F)


@numba.njit(inline="always")
def _scales(sc, mn, g, i, d, m):
    """Row i's scale d and offset m for both half groups of group g (the 32-weight formats)."""
    for h in range(2):
        sc[32 * g + 16 * h + i] = d
        mn[32 * g + 16 * h + i] = m


@numba.njit(inline="always", fastmath=FASTMATH)
def _fill_q8_0(row, s, i, buf32, sc, mn, ng):
    """Q8_0 (d | q:int8[32]): bytes q + 128, offset 128 d."""
    for g in range(ng):
        o = 34 * (8 * s + g)
        d = _f16(row, o)
        _scales(sc, mn, g, i, d, np.float32(128) * d)
        for q in range(8):
            buf32[128 * g + 16 * q + i] = _u32(row, o + 2 + 4 * q) ^ np.uint32(0x80808080)


@numba.njit(inline="always", fastmath=FASTMATH)
def _fill_q4(row, s, i, buf32, sc, mn, block_bytes, ng):
    """Q4_0 (d | qs, w = d*(q - 8)) and Q4_1 (d | m | qs, w = d*q + m): weights 0-15 the low
    nibbles of qs, 16-31 the high ones."""
    for g in range(ng):
        o = block_bytes * (8 * s + g)
        d = _f16(row, o)
        _scales(sc, mn, g, i, d, np.float32(8) * d if block_bytes == 18 else -_f16(row, o + 2))
        qs = o + block_bytes - 16
        for q in range(4):
            word = _u32(row, qs + 4 * q)
            buf32[128 * g + 16 * q + i] = word & _NIB
            buf32[128 * g + 16 * (q + 4) + i] = (word >> np.uint32(4)) & _NIB


@intrinsic
def _e2m1_quads(typingctx, buf32, at, row, o):
    """buf32[at + 16 q] = weights 4q..4q+3 of the MXFP4 block whose codes are at row[o:o + 16],
    as their doubled values plus 12 (bytes 0-24), for q < 8: one pshufb per 16 codes."""
    def codegen(context, builder, sig, args):
        buf, at, row, o = args
        words = builder.bitcast(_e2m1(builder, context, sig.args[2], row, o, [c + 12 for c in E2M1]),
                                ir.VectorType(_I32, 8))
        data = context.make_array(sig.args[0])(context, builder, buf).data
        for q in range(8):
            builder.store(builder.extract_element(words, ir.Constant(_I32, q)),
                          builder.gep(data, [builder.add(at, ir.Constant(at.type, 16 * q))]))
        return context.get_dummy_value()
    return types.none(buf32, at, row, o), codegen


@numba.njit(inline="always", fastmath=FASTMATH)
def _fill_mxfp4(row, s, i, buf32, sc, mn, ng):
    """MXFP4 (e | 16 bytes of E2M1 codes in Q4_0's order, w = 2^(e - 127) * value): the
    doubled values plus 12, with the halving in the scale (blocks._e8m0_half)."""
    for g in range(ng):
        o = 17 * (8 * s + g)
        d = _e8m0_half(row, o)
        _scales(sc, mn, g, i, d, np.float32(12) * d)
        _e2m1_quads(buf32, 128 * g + i, row, o + 1)


@numba.njit(inline="always")
def _spread4(bits):
    """Bits 0-3 of `bits` as bit 4 of bytes 0-3."""
    return ((bits & np.uint32(0xF)) * np.uint32(0x00204081) & np.uint32(0x01010101)) << np.uint32(4)


@numba.njit(inline="always", fastmath=FASTMATH)
def _fill_q5_0(row, s, i, buf32, sc, mn, ng):
    """Q5_0 (d | qh:u32 | qs, w = d*(q - 16)): weight j < 16 the low nibble of qs[j] with
    bit j of qh as its fifth bit, j + 16 the high nibble with bit j + 16."""
    for g in range(ng):
        o = 22 * (8 * s + g)
        d = _f16(row, o)
        _scales(sc, mn, g, i, d, np.float32(16) * d)
        qh = _u32(row, o + 2)
        for q in range(4):
            word = _u32(row, o + 6 + 4 * q)
            buf32[128 * g + 16 * q + i] = (word & _NIB) | _spread4(qh >> np.uint32(4 * q))
            buf32[128 * g + 16 * (q + 4) + i] = ((word >> np.uint32(4)) & _NIB) | _spread4(qh >> np.uint32(16 + 4 * q))


@numba.njit(inline="always", fastmath=FASTMATH)
def _fill_q4_k(row, s, i, buf32, sc, mn):
    """Q4_K: group 2c the low nibbles of qs[32c:32c + 32], 2c + 1 the high ones;
    w = d*sc*q - dmin*m."""
    o = 144 * s
    d = _f16(row, o)
    dmin = _f16(row, o + 2)
    for g in range(8):
        scale, m = _k_scale_min(row, o + 4, g)
        for h in range(2):
            sc[32 * g + 16 * h + i] = d * scale
            mn[32 * g + 16 * h + i] = dmin * m
    for c in range(4):
        for q in range(8):
            word = _u32(row, o + 16 + 32 * c + 4 * q)
            buf32[128 * (2 * c) + 16 * q + i] = word & _NIB
            buf32[128 * (2 * c + 1) + 16 * q + i] = (word >> np.uint32(4)) & _NIB


@numba.njit(inline="always", fastmath=FASTMATH)
def _fill_q6_k(row, s, i, buf32, sc, mn):
    """Q6_K (layout at blocks._acc_q6_k): group g = 4h + k, a scale per 16 weights;
    w = d*sc*(q - 32)."""
    o = 210 * s
    d = _f16(row, o + 208)
    for h in range(2):
        for k in range(4):
            g = 4 * h + k
            for half in range(2):
                scale = d * np.float32(np.int8(row[o + 192 + 8 * h + 2 * k + half]))
                sc[32 * g + 16 * half + i] = scale
                mn[32 * g + 16 * half + i] = np.float32(32) * scale
            low = o + 64 * h + 32 * (k & 1)
            shift = np.uint32(4 * (k >> 1))
            up = np.uint32(2 * k)
            for q in range(8):
                lw = _u32(row, low + 4 * q)
                hw = _u32(row, o + 128 + 32 * h + 4 * q)
                buf32[128 * g + 16 * q + i] = ((lw >> shift) & _NIB) | (((hw >> up) & np.uint32(0x03030303)) << np.uint32(4))


@numba.njit(inline="always", fastmath=FASTMATH)
def _fill(t, w, lo, hi, s, buf32, sc, mn, ng):
    """Step s of rows lo..lo+15 of w (a panel cut short by hi repeats row hi - 1): its first
    ng groups (8, or fewer in a 32-weight format's last, partial step)."""
    for i in range(PANEL):
        row = w[min(lo + i, hi - 1)]
        if t == Q4_K:
            _fill_q4_k(row, s, i, buf32, sc, mn)
        elif t == Q6_K:
            _fill_q6_k(row, s, i, buf32, sc, mn)
        elif t == Q8_0:
            _fill_q8_0(row, s, i, buf32, sc, mn, ng)
        elif t == Q5_0:
            _fill_q5_0(row, s, i, buf32, sc, mn, ng)
        elif t == MXFP4:
            _fill_mxfp4(row, s, i, buf32, sc, mn, ng)
        elif t == Q4_0:
            _fill_q4(row, s, i, buf32, sc, mn, 18, ng)
        else:
            _fill_q4(row, s, i, buf32, sc, mn, 20, ng)


# --- the loops ---------------------------------------------------------------------------

@numba.njit(inline="always", fastmath=FASTMATH)
def panel_input(x, form):
    """x (float32 [N, cols]) as the panels take it: (bytes int8 [N * row], row (bytes per
    token), xs float32 [N * nb] (block scales), x16 float32 [N * 2 nb] (sums of the rounded x
    times xs per 16 columns), nb (32-blocks per token))."""
    xa = quantize_rows(x, True, form == SPLIT, form == INT8)
    xq, xs, xb, x8 = xa[1], xa[2], xa[4], xa[5]
    n, nb = xs.shape
    x16 = np.empty((n, 2 * nb), np.float32)
    for i in range(n):
        for b in range(2 * nb):
            acc = np.int32(0)
            if form == SPLIT:
                for j in range(16):
                    acc += np.int32(xq[i, 16 * b + j])
            else:
                for j in range(16):
                    acc += np.int32(x8[i, 16 * b + j])
            x16[i, b] = np.float32(acc) * xs[i, b // 2]
    data = xb if form == SPLIT else x8
    return data.reshape(data.size), data.shape[1], xs.reshape(xs.size), x16.reshape(x16.size), nb


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def panel_dots(t, w, lo, hi, px, form, toks, nt, yp, buf, sc, mn):
    """yp[16 j + i] = w[lo + i] . x[toks[j]] for i < 16 (rows past hi: row hi - 1), j < nt;
    px = `panel_input(x, form)`; buf, sc, mn: scratch (`panel_scratch`). A function of its
    own, not inlined: its four unrolled `_step4` variants compile once for every kernel
    that calls it (inlined into `matmul_panels` and three times into `_moe_panels`, they
    took 32 and 105 s to compile)."""
    xf, xrow, xs, x16, nb = px
    per_block = 64 if form == SPLIT else 32
    buf32 = buf.view(np.uint32)
    yp[: 16 * nt] = 0
    for s in range(nb // 8):
        _fill(t, w, lo, hi, s, buf32, sc, mn, 8)
        for j in range(0, nt, 4):
            j1, j2, j3 = min(j + 1, nt - 1), min(j + 2, nt - 1), min(j + 3, nt - 1)
            a, b, c, d = toks[j], toks[j1], toks[j2], toks[j3]
            x0 = s * 8 * per_block
            xa, xb, xc, xd = a * xrow + x0, b * xrow + x0, c * xrow + x0, d * xrow + x0
            sa, sb, sc_, sd = a * nb + 8 * s, b * nb + 8 * s, c * nb + 8 * s, d * nb + 8 * s
            ya, yb, yc, yd = 16 * j, 16 * j1, 16 * j2, 16 * j3
            if form == SPLIT and t == Q6_K:
                _split_halves(yp, ya, yb, yc, yd, buf, sc, mn, xf, xa, xb, xc, xd, xs, sa, sb, sc_, sd, x16)
            elif form == SPLIT:
                _split_groups(yp, ya, yb, yc, yd, buf, sc, mn, xf, xa, xb, xc, xd, xs, sa, sb, sc_, sd, x16)
            elif t == Q6_K:
                _int8_halves(yp, ya, yb, yc, yd, buf, sc, mn, xf, xa, xb, xc, xd, xs, sa, sb, sc_, sd, x16)
            else:
                _int8_groups(yp, ya, yb, yc, yd, buf, sc, mn, xf, xa, xb, xc, xd, xs, sa, sb, sc_, sd, x16)
    tail = nb % 8  # groups in the last, partial step: one at a time
    if tail:
        s = nb // 8
        _fill(t, w, lo, hi, s, buf32, sc, mn, tail)
        for j in range(0, nt, 4):
            j1, j2, j3 = min(j + 1, nt - 1), min(j + 2, nt - 1), min(j + 3, nt - 1)
            a, b, c, d = toks[j], toks[j1], toks[j2], toks[j3]
            ya, yb, yc, yd = 16 * j, 16 * j1, 16 * j2, 16 * j3
            for g in range(tail):
                x0 = (s * 8 + g) * per_block
                xa, xb, xc, xd = a * xrow + x0, b * xrow + x0, c * xrow + x0, d * xrow + x0
                k = 8 * s + g
                sa, sb, sc_, sd = a * nb + k, b * nb + k, c * nb + k, d * nb + k
                bg, scg, mng = buf[512 * g:], sc[32 * g:], mn[32 * g:]
                if form == SPLIT:
                    _split_group(yp, ya, yb, yc, yd, bg, scg, mng, xf, xa, xb, xc, xd, xs, sa, sb, sc_, sd, x16)
                else:
                    _int8_group(yp, ya, yb, yc, yd, bg, scg, mng, xf, xa, xb, xc, xd, xs, sa, sb, sc_, sd, x16)


@numba.njit(inline="always")
def panel_scratch():
    """(buf, sc, mn) for `panel_dots`: one step's weight bytes and its scales."""
    return np.empty(4096, np.uint8), np.empty(256, np.float32), np.empty(256, np.float32)


@numba.njit(inline="always")
def tokens_per_block(form, cols, budget):
    """Tokens whose panel input fits in `budget` bytes (at least 4)."""
    return max(4, budget // ((2 if form == SPLIT else 1) * cols))


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def matmul_panels(t, w, x, y, chunks, form, budget):
    """w: uint8 [rows, row_bytes] of a `panel_form` type; x: float32 [N, cols]; y: float32
    [N, rows], written. Panels split in `chunks` (one per thread), each read once per block of
    tokens whose input fits in `budget` bytes."""
    rows = w.shape[0]
    n_tok, cols = x.shape
    px = panel_input(x, form)
    per = tokens_per_block(form, cols, budget)
    panels = (rows + PANEL - 1) // PANEL
    for c in numba.prange(chunks):
        p0 = c * panels // chunks
        p1 = (c + 1) * panels // chunks
        buf, sc, mn = panel_scratch()
        toks = np.empty(per, np.int64)
        yp = np.empty(PANEL * per, np.float32)
        for t0 in range(0, n_tok, per):
            nt = min(per, n_tok - t0)
            for j in range(nt):
                toks[j] = t0 + j
            for p in range(p0, p1):
                lo = PANEL * p
                hi = min(rows, lo + PANEL)
                panel_dots(t, w, lo, hi, px, form, toks, nt, yp, buf, sc, mn)
                for j in range(nt):
                    for i in range(hi - lo):
                        y[t0 + j, lo + i] = yp[PANEL * j + i]
