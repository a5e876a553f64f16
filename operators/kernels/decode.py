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

from .formats import FASTMATH, _h2f, dot2, far_pair


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
def _rows(t, w, x, y, lo, hi):
    """y[b, r] = w[r] . x[b] for rows lo..hi-1 and every token b (far row pairs, as `_gemv`)."""
    half = (hi - lo + 1) // 2
    for i in range(half):
        r0, r1 = far_pair(lo, hi, half, i)
        for b in range(x.shape[0]):
            y[b, r0], y[b, r1] = dot2(t, w[r0], w[r1], x[b])


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


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def attention_step(x, tq, wq, tk, wk, tv, wv, to, wo, bq, bk, bv, bo, qn, kn, eps, cos, sin, kc, vc, slots, pos, scale, threads):
    """Grouped-query attention of one new token per sequence; returns float32 [B, hidden].

    x: float32 [B, hidden], the normed input of token b of sequence b;
    wq, wk, wv, wo: uint8 blocks [rows, row_bytes], type codes tq, tk, tv, to;
    bq, bk, bv, bo: float32 [rows] biases, or [0] for none;
    qn, kn: float32 [D] q/k RMSNorm weights, or [0] for none (eps: their epsilon);
    cos, sin: float32 [B, D] rotary tables at each token's position (scale included);
    kc, vc: float32, or uint16 float16 bits, [slots, Hkv, max_len, D], written at (slots[b], :, pos[b]);
    slots, pos: int64 [B] cache slot and position of each token (it attends to keys 0..pos[b]);
    threads: numba's thread count (asking for it in here would keep the kernel out of the cache).
    """
    B = x.shape[0]
    Hkv, D = kc.shape[1], kc.shape[3]
    H = wq.shape[0] // D
    G = H // Hkv

    # q, k, v for every token: one parallel region, each thread its share of all three.
    q = np.empty((B, H * D), np.float32)
    k = np.empty((B, Hkv * D), np.float32)
    v = np.empty((B, Hkv * D), np.float32)
    for c in prange(threads):
        lo, hi = _share(H * D, c, threads)
        _rows(tq, wq, x, q, lo, hi)
        lo, hi = _share(Hkv * D, c, threads)
        _rows(tk, wk, x, k, lo, hi)
        _rows(tv, wv, x, v, lo, hi)

    # bias, q/k norm, rotary; k and v go into the cache.
    for b in range(B):
        if bq.size:
            q[b] += bq
            k[b] += bk
            v[b] += bv
        for h in range(H):
            qh = q[b, h * D : (h + 1) * D]
            if qn.size:
                _rms_norm(qh, qn, eps)
            _rope(qh, cos[b], sin[b])
        for h in range(Hkv):
            kh = k[b, h * D : (h + 1) * D]
            if kn.size:
                _rms_norm(kh, kn, eps)
            _rope(kh, cos[b], sin[b])
            krow = kc[slots[b], h, pos[b]]
            vrow = vc[slots[b], h, pos[b]]
            for d in range(D):
                _store(krow, d, kh[d])
                _store(vrow, d, v[b, h * D + d])

    # Attention, split over (sequence, kv head, key range) so that two cores share even
    # one long sequence; each part keeps its max, sum and weighted values (flash decoding).
    # The G query heads of a kv head read each key and value row once, together.
    longest = 0
    for b in range(B):
        longest = max(longest, pos[b] + 1)
    S = max(1, min((8 * threads + B * Hkv - 1) // (B * Hkv), longest // 256))
    part_m = np.empty((B, Hkv, S, G), np.float32)
    part_l = np.empty((B, Hkv, S, G), np.float32)
    part_o = np.empty((B, Hkv, S, G, D), np.float32)
    for u in prange(B * Hkv * S):
        b, h, s = u // (Hkv * S), u // S % Hkv, u % S
        sl = slots[b]
        lo, hi = _share(pos[b] + 1, s, S)
        n = hi - lo
        keys, vals = kc[sl, h], vc[sl, h]  # [max_len, D]
        # This kv head's query heads, scaled, padded to a multiple of 4: four dot products
        # share one pass over a key (one horizontal sum per key instead of per head).
        G4 = (G + 3) // 4 * 4
        qg = np.zeros((G4, D), np.float32)
        for g in range(G):
            for d in range(D):
                qg[g, d] = q[b, (h * G + g) * D + d] * scale
        row = np.empty(D, np.float32)
        p = np.empty((G4, max(n, 1)), np.float32)
        for j in range(n):
            for d in range(D):
                row[d] = _load(keys, (lo + j, d))
            for g in range(0, G4, 4):
                a0 = a1 = a2 = a3 = np.float32(0)
                for d in range(D):
                    a0 += qg[g, d] * row[d]
                    a1 += qg[g + 1, d] * row[d]
                    a2 += qg[g + 2, d] * row[d]
                    a3 += qg[g + 3, d] * row[d]
                p[g, j], p[g + 1, j], p[g + 2, j], p[g + 3, j] = a0, a1, a2, a3
        for g in range(G):
            m = np.float32(-np.inf)
            for j in range(n):
                if p[g, j] > m:
                    m = p[g, j]
            total = np.float32(0)
            for j in range(n):
                e = _exp(p[g, j] - m)
                p[g, j] = e
                total += e
            part_m[b, h, s, g] = m
            part_l[b, h, s, g] = total
        o = np.zeros((G, D), np.float32)
        for j in range(n):
            for d in range(D):
                row[d] = _load(vals, (lo + j, d))
            for g in range(G):
                pj = p[g, j]
                for d in range(D):
                    o[g, d] += pj * row[d]
        part_o[b, h, s] = o

    # Merge the parts of each head: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s;
    # an empty part (m = -inf, l = 0) adds nothing; a NaN anywhere stays NaN.
    att = np.zeros((B, H * D), np.float32)
    for b in range(B):
        for h in range(Hkv):
            for g in range(G):
                qo = (h * G + g) * D
                M = np.float32(-np.inf)
                for s in range(S):
                    M = max(M, part_m[b, h, s, g])
                total = np.float32(0)
                for s in range(S):
                    if part_l[b, h, s, g] != 0 or part_m[b, h, s, g] != -np.inf:
                        f = np.exp(part_m[b, h, s, g] - M)
                        total += f * part_l[b, h, s, g]
                        for d in range(D):
                            att[b, qo + d] += f * part_o[b, h, s, g, d]
                for d in range(D):
                    att[b, qo + d] /= total

    y = np.empty((B, wo.shape[0]), np.float32)
    for c in prange(threads):
        lo, hi = _share(wo.shape[0], c, threads)
        _rows(to, wo, att, y, lo, hi)
    if bo.size:
        for b in range(B):
            y[b] += bo
    return y


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def mlp_step(x, tg, wg, tu, wu, td, wd, threads):
    """down(silu(gate x) * up x) for a few tokens; returns float32 [N, hidden].

    x: float32 [N, hidden]; wg, wu: uint8 blocks [I, row_bytes]; wd: [hidden, row_bytes];
    tg, tu, td: their type codes; threads: numba's thread count.
    """
    N, I = x.shape[0], wg.shape[0]
    act = np.empty((N, I), np.float32)
    for c in prange(threads):
        lo, hi = _share(I, c, threads)
        half = (hi - lo + 1) // 2
        for i in range(half):
            r0, r1 = far_pair(lo, hi, half, i)
            for n in range(N):
                g0, g1 = dot2(tg, wg[r0], wg[r1], x[n])
                u0, u1 = dot2(tu, wu[r0], wu[r1], x[n])
                act[n, r0] = g0 / (np.float32(1) + np.exp(-g0)) * u0
                act[n, r1] = g1 / (np.float32(1) + np.exp(-g1)) * u1
    y = np.empty((N, wd.shape[0]), np.float32)
    for c in prange(threads):
        lo, hi = _share(wd.shape[0], c, threads)
        _rows(td, wd, act, y, lo, hi)
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
