"""The loops around the block routines: a range of weight rows against one token
(`gemv_rows`) or against a few (`gemm_rows`), each path's kernels built per format from
formats.py's table and dispatched on the type code; and the choice between them for a
number of tokens (`token_rows`).

A `_pair_*` function dots two rows of one format; `_rows_of` wraps it in the loop over a
range of row pairs (`far_pair`), inlined: as a function called per pair, the call and the
reference counts of the row views it took cost as much as the dots of short rows (Q8_0
1024 x 512, 2 threads: 19.5 us against 10.7 inlined; SmolLM2's Q4_1 gate, 576 columns: 32.8
against 20.9). F32 rows take a plain dot: through the block loop LLVM vectorized across
blocks with gathers.
"""

import numba
import numpy as np

from .batch import ROWS, tile_rows
from .blocks import W8
from .formats import FORMATS, INT8_TYPES, INT16_TYPES, MULTI8_TYPES, MULTI_TYPES, VNNI_TYPES
from .intrinsics import FASTMATH, STRICT, _dot8_sw, _dot8_w, _dot_w, _get, _lanes, _prefetch, _stack_f32, _stack_i64, _sum16
from .policy import GEMM_TOKENS, GEMV_EACH_TOKENS, GEMV_SLICE_BYTES, PREFETCH_BYTES

# --- one token: two rows at a time ------------------------------------------------------

@numba.njit(inline="always")
def _ahead(r0, r1, o, n):
    """Prefetch bytes o .. o + n - 1 of rows r0 and r1, PREFETCH_BYTES ahead (policy.py)."""
    _prefetch(r0, o + PREFETCH_BYTES, n)
    _prefetch(r1, o + PREFETCH_BYTES, n)


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
            _ahead(r0, r1, b * block_bytes, block_bytes)
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
            _ahead(r0, r1, o, 2 * block_bytes)
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
                _ahead(r0, r1, b * block_bytes, block_bytes)
                c0 += acc(r0, b * block_bytes, xb, xs, xsum, b, a0, 0)
                c1 += acc(r1, b * block_bytes, xb, xs, xsum, b, a1, 0)
            nb = 0
        for b in range(0, nb - 1, 2):
            o = b * block_bytes
            _ahead(r0, r1, o, 2 * block_bytes)
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
            _ahead(r0, r1, b * block_bytes, block_bytes)
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


def _rows_of(pair, name, fastmath=FASTMATH):
    """y[r] = w[r] . x for rows lo..hi-1 of w (uint8 [rows, row_bytes]), in far pairs; a
    function of its own (not inlined) named `name`, one name per kernel: numba names compiled
    code by qualified name, a per-process counter and argument types, and a cached library
    loaded next to another keeps the first definition of a name (linkonce_odr), so two
    kernels both called `_rows_of.<locals>.rows`, compiled by different processes, could
    run each other's code once both came from the cache."""

    def rows(w, x, lo, hi, y):
        half = (hi - lo + 1) // 2
        for i in range(half):
            r0, r1 = far_pair(lo, hi, half, i)
            y[r0], y[r1] = pair(w[r0], w[r1], x)

    rows.__name__ = rows.__qualname__ = name
    return numba.njit(nogil=True, fastmath=fastmath)(rows)


# --- several tokens per weight row -------------------------------------------------------
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
            _prefetch(w, o + b * block_bytes + PREFETCH_BYTES, 2 * block_bytes)
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


def _gemm(w8: W8, block_bytes, split):
    """Rows lo..hi-1 of w against `count` tokens, four at a time, the rest (1-3) at once, on
    the split int16 x (`split`, VNNI) or the int8 x; x: (xb or x8, xs, xsum) of
    `quantize_rows` flattened, then ix, iy: int64 token and output row indices, and count."""
    dot, step = (_dot_w, 64) if split else (_dot8_sw if w8.signed else _dot8_w, 32)
    dots4 = _dots(w8.unpack, block_bytes, w8.off, 4, dot, step)
    dots3 = _dots(w8.unpack, block_bytes, w8.off, 3, dot, step)
    dots2 = _dots(w8.unpack, block_bytes, w8.off, 2, dot, step)
    dots1 = _dots(w8.unpack, block_bytes, w8.off, 1, dot, step)

    @numba.njit(inline="always", fastmath=FASTMATH)
    def rows(w, x, lo, hi, y):
        xb, xs, xsum, ix, iy, count = x
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


# --- per-format dispatch -------------------------------------------------------------------

def _by_type(kernels):
    """kernel(t, w, x, lo, hi, y) that runs the kernel(w, x, lo, hi, y) of type code t from
    kernels, ((code, kernel), ...): an if/else chain (numba cannot index a table of
    functions), inlined; the last kernel takes every code not listed before it."""
    code, first = kernels[0]
    if len(kernels) == 1:
        @numba.njit(inline="always")
        def last(t, w, x, lo, hi, y):
            first(w, x, lo, hi, y)

        return last
    rest = _by_type(kernels[1:])

    @numba.njit(inline="always")
    def pick(t, w, x, lo, hi, y):
        if t == code:
            first(w, x, lo, hi, y)
        else:
            rest(t, w, x, lo, hi, y)

    return pick


# Each path's row kernels, for the formats formats.FORMATS gives a routine on it.
_float_rows = _by_type(tuple(
    (f.code, _rows_of(_pair(f.float_block, f.elems, f.nbytes, f.view) if f.float_block else _pair_f32,
                      f"float_rows_{f.qtype.name}"))
    for f in FORMATS))
_int16_rows = _by_type(tuple((f.code, _rows_of(_pair_int(f.int16_block, f.nbytes, f.view), f"int16_rows_{f.qtype.name}"))
                             for f in FORMATS if f.int16_block))
_vnni_rows = _by_type(tuple((f.code, _rows_of(_pair_vnni(f.vnni.block, f.nbytes, f.vnni.off),
                                              f"vnni_rows_{f.qtype.name}", STRICT))
                            for f in FORMATS if f.vnni))
_int8_rows = _by_type(tuple((f.code, _rows_of(_pair_vnni(f.int8.block, f.nbytes, f.int8.off),
                                              f"int8_rows_{f.qtype.name}", STRICT))
                            for f in FORMATS if f.int8))
_gemm_vnni = _by_type(tuple((f.code, _gemm(f.gemm_vnni, f.nbytes, True)) for f in FORMATS if f.gemm_vnni))
_gemm_int8 = _by_type(tuple((f.code, _gemm(f.gemm_int8, f.nbytes, False)) for f in FORMATS if f.gemm_int8))


@numba.njit(nogil=True, fastmath=FASTMATH)
def gemv_rows(t, w, xa, n, lo, hi, y):
    """y[r] = w[r] . x[n] for rows lo..hi-1 of w (type code t, uint8 [rows, row_bytes]);
    xa: the tokens x as `quantize_rows` gives them (formats in INT8_TYPES take the int8 path
    where xa has x8, those in VNNI_TYPES the VNNI path where it has the split bytes, those
    in INT16_TYPES the int16 path where it has xq, the rest the float one); y: float32
    [rows]. Rows are dotted in far pairs."""
    x, xq, xs, xsum, xb, x8 = xa
    if x8.shape[1] and t in INT8_TYPES:
        _int8_rows(t, w, (x8[n], xs[n], xsum[n]), lo, hi, y)
    elif xb.shape[1] and t in VNNI_TYPES:
        _vnni_rows(t, w, (xb[n], xs[n], xsum[n]), lo, hi, y)
    elif xq.shape[1] and t in INT16_TYPES:
        _int16_rows(t, w, (xq[n], xs[n], xsum[n]), lo, hi, y)
    else:
        _float_rows(t, w, x[n], lo, hi, y)


@numba.njit(inline="always")
def gemm_takes(xa, t):
    """Whether `gemm_rows` takes type code t with x in the form xa (`quantize_rows`)."""
    return (xa[5].shape[1] > 0 and t in MULTI8_TYPES) or (xa[4].shape[1] > 0 and t in MULTI_TYPES)


@numba.njit(inline="always")
def int_rows_take(xa, t):
    """Whether `gemv_rows` takes type code t with x in the form xa on an integer path."""
    _, xq, _, _, xb, x8 = xa
    return ((x8.shape[1] > 0 and t in INT8_TYPES) or (xb.shape[1] > 0 and t in VNNI_TYPES)
            or (xq.shape[1] > 0 and t in INT16_TYPES))


@numba.njit(nogil=True, fastmath=STRICT)
def gemm_rows(t, w, xa, ix, iy, count, lo, hi, y):
    """y[iy[j], r] = w[r] . x[ix[j]] for j < count and rows lo..hi-1 of w (uint8 [rows,
    row_bytes], type code t as `gemm_takes` allows); xa as `quantize_rows` gives it, in
    int8 or with the split int16 bytes; ix, iy: int64 token and output row indices;
    y: float32 [*, rows]. Each token gets what `gemv_rows` gives it, bit for bit."""
    _, _, xs, xsum, xb, x8 = xa
    xsf, xsumf = xs.reshape(xs.size), xsum.reshape(xsum.size)
    if x8.shape[1]:
        _gemm_int8(t, w, (x8.reshape(x8.size), xsf, xsumf, ix, iy, count), lo, hi, y)
    else:
        _gemm_vnni(t, w, (xb.reshape(xb.size), xsf, xsumf, ix, iy, count), lo, hi, y)


@numba.njit(inline="always", fastmath=FASTMATH)
def token_rows(t, w, xa, y, lo, hi):
    """y[b, r] = w[r] . x[b] for rows lo..hi-1 and every token b; xa: the tokens x as
    `quantize_rows` gives them. One token: `gemv_rows`. Two to GEMM_TOKENS where
    `gemm_takes` the format: `gemm_rows`. Up to GEMV_EACH_TOKENS where the format has an
    integer row path but no `gemm_rows` (the K-quants): a GEMV per token over slices of
    GEMV_SLICE_BYTES, so a slice comes from DRAM once and from L2 for the other tokens.
    Otherwise rows decoded once into L1 tiles for all tokens (a per-token dot over all the
    rows decodes every row B times: a batch-8 MoE attention took 6.7x batch 1)."""
    x = xa[0]
    B = x.shape[0]
    if B == 1:
        gemv_rows(t, w, xa, 0, lo, hi, y[0])
    elif B <= GEMM_TOKENS and gemm_takes(xa, t):
        tokens = np.arange(B)
        gemm_rows(t, w, xa, tokens, tokens, B, lo, hi, y)
    elif B <= GEMV_EACH_TOKENS and int_rows_take(xa, t):
        step = max(2, GEMV_SLICE_BYTES // w.shape[1])
        for r0 in range(lo, hi, step):
            r1 = min(hi, r0 + step)
            for b in range(B):
                gemv_rows(t, w, xa, b, r0, r1, y[b])
    else:
        tile_rows(t, w, x, y, lo, hi, 0, B, np.empty((ROWS, x.shape[1]), np.float32))
