"""One numba call per layer for a decode step (one new token in each of B sequences):
Llama-family attention (q/k/v, bias, q/k norm, RoPE, KV-cache write, attention over the
cache, o_proj) and the gated MLP (gate, up, SiLU, down).

Weights are uint8 GGUF blocks [rows, row_bytes] with their type code (`as_blocks`); each
weight row is read once per call and dotted with the B tokens while it sits in L1. The KV
cache is float32, or float16 kept as its uint16 bits (numba has no CPU float16).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from .activations import act_mode, rows_input
from .intrinsics import FASTMATH, _h2f, _stack_f32
from .records import AttentionWeights, MlpWeights
from .rows import token_rows


@intrinsic
def _f2h(typingctx, value):
    """float32 -> IEEE half bits (uint16), round to nearest even; one vcvtps2ph with F16C."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


def _load(a, i):
    """Element i of a cache row as float32."""


def _store(a, i, value):
    """a[i] = value (float32), in the cache row's element type."""


@overload(_load, inline="always")
def _load_impl(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: _h2f(a[i])
    return lambda a, i: a[i]


@overload(_store, inline="always")
def _store_impl(a, i, value):
    if a.dtype == types.uint16:
        def store_half(a, i, value):
            a[i] = _f2h(np.float32(value))
        return store_half

    def store(a, i, value):
        a[i] = value
    return store


@numba.njit(inline="always", fastmath=FASTMATH)
def _share(rows, c, chunks):
    return c * rows // chunks, (c + 1) * rows // chunks


@numba.njit(inline="always", fastmath=FASTMATH)
def _rms_norm(x, w, eps):
    s = np.float32(0)
    for i in range(x.size):
        s += x[i] * x[i]
    r = np.float32(1) / np.sqrt(s / np.float32(x.size) + np.float32(eps))
    for i in range(x.size):
        x[i] = w[i] * (x[i] * r)


@numba.njit(inline="always", fastmath=FASTMATH)
def _rope(x, cos, sin):
    """Llama's rotation of the two halves of one head, in place."""
    half = x.size // 2
    for i in range(half):
        a, b = x[i], x[i + half]
        x[i] = a * cos[i] - b * sin[i]
        x[i + half] = b * cos[i + half] + a * sin[i + half]


@intrinsic
def _pow2(typingctx, n):
    """2**n as float32 for an int32 n in [-126, 127] (built from the exponent bits)."""
    def codegen(context, builder, sig, args):
        bits = builder.shl(builder.add(args[0], ir.Constant(ir.IntType(32), 127)), ir.Constant(ir.IntType(32), 23))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(types.int32), codegen


@numba.njit(inline="always", fastmath=FASTMATH)
def _exp(x):
    """e**x in float32 for x <= 0 (softmax arguments), within 2 ulp (Cephes' expf), in plain
    arithmetic so that LLVM vectorizes it: there is no vector expf without SVML. NaN stays NaN."""
    if x < np.float32(-87.0):
        x = np.float32(-87.0)
    n = np.floor(x * np.float32(1.44269504) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * r * r + r + np.float32(1)) * _pow2(np.int32(n))


KEYS = 64  # keys scored per block of the online softmax
MAX_D = 256  # head_dim limit of the stack buffers


@numba.njit(inline="always", fastmath=FASTMATH)
def _attend(q, q0, gc, keys, vals, lo, hi, scale, m_out, l_out, o_out, D, W):
    """Softmax attention of gc <= 4 query heads (q[q0:q0 + gc * D], consecutive) over keys
    and values lo..hi-1 of one kv head (keys, vals: [max_len, D], float32 or float16 bits);
    writes each head's max score, exp-sum and unnormalized output to m_out, l_out, o_out.
    Online softmax in blocks of KEYS keys; each key and value row is read once for all gc
    heads. Queries, scores and outputs live in stack buffers (no aliasing with the cache, so
    LLVM keeps them in vector registers). D: the head size, a constant where the caller
    can make it one (fully unrolled loops over a head); W: heads computed per pass, 4, or 3
    for groups of exactly 3 (SmolLM2: a padded 4th head was a quarter of the work)."""
    qg = numba.carray(_stack_f32(1024), (4, MAX_D))  # 4 * MAX_D
    o = numba.carray(_stack_f32(1024), (4, MAX_D))  # 4 * MAX_D
    p = numba.carray(_stack_f32(256), (4, KEYS))  # 4 * KEYS
    m = numba.carray(_stack_f32(4), (4,))
    l = numba.carray(_stack_f32(4), (4,))
    f = numba.carray(_stack_f32(4), (4,))
    for g in range(4):
        m[g] = -np.inf
        l[g] = 0
        for d in range(D):
            qg[g, d] = q[q0 + g * D + d] * scale if g < gc else np.float32(0)
            o[g, d] = 0
    for j0 in range(lo, hi, KEYS):
        nb = min(KEYS, hi - j0)
        # W dot products per pass over a key: one horizontal sum per key and head.
        for j in range(nb):
            row = keys[j0 + j]
            a0 = a1 = a2 = a3 = np.float32(0)
            for d in range(D):
                kd = _load(row, d)
                a0 += qg[0, d] * kd
                a1 += qg[1, d] * kd
                a2 += qg[2, d] * kd
                if W == 4:
                    a3 += qg[3, d] * kd
            p[0, j], p[1, j], p[2, j], p[3, j] = a0, a1, a2, a3
        for g in range(gc):
            mb = m[g]
            for j in range(nb):
                mb = max(mb, p[g, j])
            # A NaN score makes mb NaN and so every output of the head: NaN stays NaN.
            c = _exp(m[g] - mb) if m[g] != -np.inf else np.float32(0)
            total = np.float32(0)
            for j in range(nb):
                e = _exp(p[g, j] - mb)
                p[g, j] = e
                total += e
            l[g] = l[g] * c + total
            m[g] = mb
            f[g] = c
        for g in range(gc, 4):
            f[g] = 0
            for j in range(nb):
                p[g, j] = 0
        # Constant trip counts from here on: o stays in registers over the whole range.
        for g in range(W):
            for d in range(D):
                o[g, d] *= f[g]
        for j in range(nb):
            row = vals[j0 + j]
            for g in range(W):
                pj = p[g, j]
                for d in range(D):
                    o[g, d] += pj * _load(row, d)
    for g in range(gc):
        m_out[g] = m[g]
        l_out[g] = l[g]
        for d in range(D):
            o_out[g, d] = o[g, d]


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def attention_step(x, attn, kc, vc, cos, sin, slots, pos, threads):
    """Grouped-query attention of one new token per sequence; returns float32 [B, hidden].

    x: float32 [B, hidden], the normed input of token b of sequence b;
    attn: the weights, a `records.AttentionWeights` (as a plain tuple);
    kc, vc: float32, or uint16 float16 bits, [slots, Hkv, R, D]: R rows a slot, position p
    at row p % R (R = max_len for a full cache, a ring for a sliding one: R >= window);
    cos, sin: float32 [B, D] rotary tables at each token's position (scale included);
    slots, pos: int64 [B] cache slot and position of each token (it attends to keys 0..pos[b],
    the last `window` of them with a window);
    threads: numba's thread count (asking for it in here would keep the kernel out of the cache).
    """
    w = AttentionWeights(*attn)
    # what the parallel loops read, as locals (see records)
    tq, wq, tk, wk, tv, wv, to, wo = w.tq, w.wq, w.tk, w.wk, w.tv, w.wv, w.to, w.wo
    window, scale = w.window, w.scale
    B = x.shape[0]
    Hkv, R, D = kc.shape[1], kc.shape[2], kc.shape[3]
    H = wq.shape[0] // D
    G = H // Hkv
    if D > MAX_D:
        raise ValueError("head_dim above MAX_D")

    # q, k, v for every token: one parallel region, each thread its share of all three.
    q = np.empty((B, H * D), np.float32)
    k = np.empty((B, Hkv * D), np.float32)
    v = np.empty((B, Hkv * D), np.float32)
    xa = rows_input(x, max(act_mode(w.acts, tq), act_mode(w.acts, tk), act_mode(w.acts, tv)))
    for c in prange(threads):
        lo, hi = _share(H * D, c, threads)
        token_rows(tq, wq, xa, q, lo, hi)
        lo, hi = _share(Hkv * D, c, threads)
        token_rows(tk, wk, xa, k, lo, hi)
        token_rows(tv, wv, xa, v, lo, hi)

    # bias, q/k norm, rotary; k and v go into the cache.
    for b in range(B):
        if w.bq.size:
            q[b] += w.bq
            k[b] += w.bk
            v[b] += w.bv
        for h in range(H):
            qh = q[b, h * D : (h + 1) * D]
            if w.qn.size:
                _rms_norm(qh, w.qn, w.eps)
            _rope(qh, cos[b], sin[b])
        for h in range(Hkv):
            kh = k[b, h * D : (h + 1) * D]
            if w.kn.size:
                _rms_norm(kh, w.kn, w.eps)
            _rope(kh, cos[b], sin[b])
            krow = kc[slots[b], h, pos[b] % R]
            vrow = vc[slots[b], h, pos[b] % R]
            for d in range(D):
                _store(krow, d, kh[d])
                _store(vrow, d, v[b, h * D + d])

    # Attention, split over (sequence, kv head, key range) so that two cores share even
    # one long sequence; each part keeps its max, sum and weighted values (flash decoding).
    # The G query heads of a kv head read each key and value row once, together. A key
    # range of a ring may wrap past its last row: its part is two, before and after.
    longest = 0
    for b in range(B):
        longest = max(longest, min(pos[b] + 1, window) if window > 0 else pos[b] + 1)
    S = max(1, min((8 * threads + B * Hkv - 1) // (B * Hkv), longest // 256))
    part_m = np.empty((B, Hkv, 2 * S, G), np.float32)
    part_l = np.empty((B, Hkv, 2 * S, G), np.float32)
    part_o = np.empty((B, Hkv, 2 * S, G, D), np.float32)
    for u in prange(B * Hkv * S):
        b, h, s = u // (Hkv * S), u // S % Hkv, u % S
        sl = slots[b]
        first = max(0, pos[b] + 1 - window) if window > 0 else 0
        lo, hi = _share(pos[b] + 1 - first, s, S)
        r0 = (first + lo) % R
        r1 = min(R, r0 + hi - lo)  # rows r0..r1-1, then 0..wrap-1
        wrap = r0 + hi - lo - r1
        keys, vals = kc[sl, h], vc[sl, h]  # [R, D]
        for half in range(2):
            a, z = (r0, r1) if half == 0 else (0, wrap)
            for g0 in range(0, G, 4):
                q0, gc = (h * G + g0) * D, min(4, G - g0)
                pm, pl, po = part_m[b, h, 2 * s + half, g0:], part_l[b, h, 2 * s + half, g0:], part_o[b, h, 2 * s + half, g0:]
                if a == z:  # no keys (the second half unless the range wraps): an empty part
                    for g in range(gc):
                        pm[g], pl[g] = -np.inf, 0
                elif D == 64 and gc == 3:
                    _attend(q[b], q0, gc, keys, vals, a, z, scale, pm, pl, po, 64, 3)
                elif D == 64:
                    _attend(q[b], q0, gc, keys, vals, a, z, scale, pm, pl, po, 64, 4)
                elif D == 128:
                    _attend(q[b], q0, gc, keys, vals, a, z, scale, pm, pl, po, 128, 4)
                else:
                    _attend(q[b], q0, gc, keys, vals, a, z, scale, pm, pl, po, D, 4)

    # Merge the parts of each head: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s,
    # a sink logit z adding e^(z - M) to the sum alone; an empty part (m = -inf, l = 0)
    # adds nothing; a NaN anywhere stays NaN.
    att = np.zeros((B, H * D), np.float32)
    for b in range(B):
        for h in range(Hkv):
            for g in range(G):
                qo = (h * G + g) * D
                M = np.float32(-np.inf)
                for s in range(2 * S):
                    M = max(M, part_m[b, h, s, g])
                total = np.float32(0)
                if w.sinks.size:
                    M = max(M, w.sinks[h * G + g])
                    total = np.exp(w.sinks[h * G + g] - M)
                for s in range(2 * S):
                    if part_l[b, h, s, g] != 0 or part_m[b, h, s, g] != -np.inf:
                        f = np.exp(part_m[b, h, s, g] - M)
                        total += f * part_l[b, h, s, g]
                        for d in range(D):
                            att[b, qo + d] += f * part_o[b, h, s, g, d]
                for d in range(D):
                    att[b, qo + d] /= total

    y = np.empty((B, wo.shape[0]), np.float32)
    atta = rows_input(att, act_mode(w.acts, to))
    for c in prange(threads):
        lo, hi = _share(wo.shape[0], c, threads)
        token_rows(to, wo, atta, y, lo, hi)
    if w.bo.size:
        for b in range(B):
            y[b] += w.bo
    return y


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def mlp_step(x, mlp, threads):
    """down(silu(gate x) * up x) for a few tokens; returns float32 [N, hidden].

    x: float32 [N, hidden]; mlp: the weights, a `records.MlpWeights` (as a plain tuple);
    threads: numba's thread count.
    """
    m = MlpWeights(*mlp)
    tg, wg, tu, wu, td, wd = m.tg, m.wg, m.tu, m.wu, m.td, m.wd  # as locals for the parallel loops
    N, I = x.shape[0], wg.shape[0]
    act = np.empty((N, I), np.float32)
    up = np.empty((N, I), np.float32)
    xa = rows_input(x, max(act_mode(m.acts, tg), act_mode(m.acts, tu)))
    for c in prange(threads):
        lo, hi = _share(I, c, threads)
        # gate's rows, then the same rows of up (as `token_rows` picks for the format)
        token_rows(tg, wg, xa, act, lo, hi)
        token_rows(tu, wu, xa, up, lo, hi)
        for n in range(N):
            for r in range(lo, hi):
                g = act[n, r]
                act[n, r] = g / (np.float32(1) + np.exp(-g)) * up[n, r]
    y = np.empty((N, wd.shape[0]), np.float32)
    acta = rows_input(act, act_mode(m.acts, td))
    for c in prange(threads):
        lo, hi = _share(wd.shape[0], c, threads)
        token_rows(td, wd, acta, y, lo, hi)
    return y


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def rms_norm(x, w, eps):
    """w * x / sqrt(mean(x^2) + eps) per row; x: float32 [N, C]; w: float32 [C]; returns float32 [N, C]."""
    y = np.empty_like(x)
    for n in range(x.shape[0]):
        s = np.float32(0)
        for i in range(x.shape[1]):
            s += x[n, i] * x[n, i]
        r = np.float32(1) / np.sqrt(s / np.float32(x.shape[1]) + np.float32(eps))
        for i in range(x.shape[1]):
            y[n, i] = w[i] * (x[n, i] * r)
    return y
