"""A whole decoder layer's decode step as one numba call: pre-norm, attention, residual,
pre-norm, feed-forward (dense gated MLP, or Mixtral's router, top-k and fused experts),
residual. Between the per-module calls a layer spent ~100 us in Python and torch (a
SmolLM2 step: 30 layers, most of its time); here the layer's kernels call each other.

Argument groups are tuples, in the order the per-module kernels take them:
attn = (tq, wq, tk, wk, tv, wv, to, wo, bq, bk, bv, bo, qn, kn, qk_eps, acts) as
`decode.attention_step`; step = (cos, sin, kc, vc, slots, pos, scale);
mlp = (tg, wg, tu, wu, td, wd, acts) as `decode.mlp_step`;
router = (tr, wr, top_k, normalize); experts = (tg, gate, tu, up, td, down, acts) as
`moe._moe_fused`; shared = None, or Qwen2-MoE's shared expert and its gate:
(tg, wg, tu, wu, td, wd, acts, tsg, wsg). acts: the activation form (activations.ACT_*); the
router and the shared expert's gate take int16 activations whatever it is (a router's
ranking decides which experts run).
"""

import numba
import numpy as np

from .activations import ACT_INT16, act_mode, rows_input
from .decode import attention_step, mlp_step, rms_norm
from .intrinsics import FASTMATH
from .moe import NO_PANELS, _moe_fused
from .rows import token_rows


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def _attention_block(x, n1, eps1, attn, step, threads):
    """x + attention(rms_norm(x))."""
    h = rms_norm(x, n1, eps1)
    return x + attention_step(h, *attn, *step, threads)


@numba.njit(nogil=True, cache=True)
def dense_layer_step(x, n1, eps1, n2, eps2, attn, step, mlp, threads):
    """One decode token per sequence through a Llama block; x: float32 [B, hidden] (the
    residual stream), n1, n2: float32 [hidden] norm weights; returns float32 [B, hidden]."""
    x = _attention_block(x, n1, eps1, attn, step, threads)
    return x + mlp_step(rms_norm(x, n2, eps2), *mlp, threads)


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def softmax_topk(logits, k, normalize):
    """(ids int64 [N, k], weights float32 [N, k]) of the k most probable experts under a
    softmax over each row of logits (float32 [N, E]), renormalised to sum to one if asked;
    as `mixtral.softmax_topk` (ties: the lower expert id). A NaN row picks experts 0..k-1
    with NaN weights, so the NaN reaches the output."""
    N, E = logits.shape
    ids = np.empty((N, k), np.int64)
    weights = np.empty((N, k), np.float32)
    p = np.empty(E, np.float32)
    for n in range(N):
        m = logits[n, 0]
        for e in range(1, E):
            m = max(m, logits[n, e])
        total = np.float32(0)
        for e in range(E):
            p[e] = np.exp(logits[n, e] - m)
            total += p[e]
        chosen = np.float32(0)
        for j in range(k):
            best = -1
            for e in range(E):
                if p[e] >= 0 and (best < 0 or p[e] > p[best]):
                    best = e
            if best < 0:  # NaN probabilities: take the lowest unused id
                best = 0
                while p[best] < 0:
                    best += 1
            ids[n, j] = best
            weights[n, j] = p[best] / total
            chosen += weights[n, j]
            p[best] = -1  # used
        if normalize:
            for j in range(k):
                weights[n, j] /= chosen
    return ids, weights


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def _router(x, tr, wr, top_k, normalize):
    logits = np.empty((x.shape[0], wr.shape[0]), np.float32)
    token_rows(tr, wr, rows_input(x, act_mode(ACT_INT16, tr)), logits, 0, wr.shape[0])
    return softmax_topk(logits, top_k, normalize)


@numba.njit(nogil=True, cache=True)
def moe_layer_step(x, n1, eps1, n2, eps2, attn, step, router, experts, shared, moe_chunks, threads):
    """As `dense_layer_step` with a sparse MoE as the feed-forward: router logits, softmax
    top-k, the fused experts over each token's k experts, plus the shared expert scaled by
    its sigmoid gate when there is one."""
    x = _attention_block(x, n1, eps1, attn, step, threads)
    h = rms_norm(x, n2, eps2)
    ids, weights = _router(h, *router)
    out = np.empty_like(h)
    none = np.zeros((0, 0), np.float32)
    _moe_fused(*experts, h, ids, weights, out, moe_chunks, NO_PANELS, (none, none, none), (np.float32(0), np.float32(0)))
    if shared is not None:
        _add_shared_expert(h, shared, out, threads)
    return x + out


@numba.njit(nogil=True, cache=True)
def dense_stack_step(x, layers, cos, sin, slots, pos, threads):
    """`dense_layer_step` through consecutive layers in one call: layers is a tuple of
    (n1, eps1, n2, eps2, attn, k cache, v cache, scale, mlp), one per layer, all of one
    type; the rope tables and the step's slots and positions are shared by all of them."""
    for i in range(len(layers)):
        n1, eps1, n2, eps2, attn, kc, vc, scale, mlp = layers[i]
        x = dense_layer_step(x, n1, eps1, n2, eps2, attn, (cos, sin, kc, vc, slots, pos, scale), mlp, threads)
    return x


@numba.njit(nogil=True, cache=True)
def moe_stack_step(x, layers, cos, sin, slots, pos, threads):
    """As `dense_stack_step` for MoE layers: (n1, eps1, n2, eps2, attn, k cache, v cache,
    scale, router, experts, shared, moe_chunks) each."""
    for i in range(len(layers)):
        n1, eps1, n2, eps2, attn, kc, vc, scale, router, experts, shared, chunks = layers[i]
        step = (cos, sin, kc, vc, slots, pos, scale)
        x = moe_layer_step(x, n1, eps1, n2, eps2, attn, step, router, experts, shared, chunks, threads)
    return x


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def _add_shared_expert(h, shared, out, threads):
    tg, wg, tu, wu, td, wd, acts, tsg, wsg = shared
    y = mlp_step(h, tg, wg, tu, wu, td, wd, acts, threads)
    gate = np.empty((h.shape[0], 1), np.float32)
    token_rows(tsg, wsg, rows_input(h, act_mode(ACT_INT16, tsg)), gate, 0, 1)
    for b in range(h.shape[0]):
        g = np.float32(1) / (np.float32(1) + np.exp(-gate[b, 0]))
        for i in range(h.shape[1]):
            out[b, i] += g * y[b, i]
