"""A whole decoder layer's decode step as one numba call: pre-norm, attention, residual,
pre-norm, feed-forward (dense gated MLP, or Mixtral's router, top-k and fused experts),
residual. Between the per-module calls a layer spent ~100 us in Python and torch (a
SmolLM2 step: 30 layers, most of its time); here the layer's kernels call each other.

A layer is a record (records.py): `DenseLayer` or `MoeLayer`, as a plain tuple. The step's
arrays come beside it: kc, vc, the layer's KV cache, and cos, sin, slots, pos, shared by
every layer of the step, as `decode.attention_step` takes them.
"""

import numba
import numpy as np

from .activations import ACT_INT16, act_mode, rows_input
from .decode import attention_step, mlp_step, rms_norm
from .intrinsics import FASTMATH
from .linear import row_chunks
from .moe import NO_PANELS, _moe_fused
from .records import DenseLayer, ExpertWeights, MoeLayer, Router, SharedExpert
from .rows import token_rows


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def _attention_block(x, norm, eps, attn, kc, vc, cos, sin, slots, pos, threads):
    """x + attention(rms_norm(x))."""
    h = rms_norm(x, norm, eps)
    return x + attention_step(h, attn, kc, vc, cos, sin, slots, pos, threads)


@numba.njit(nogil=True, cache=True)
def dense_layer_step(x, layer, kc, vc, cos, sin, slots, pos, threads):
    """One decode token per sequence through a Llama block; x: float32 [B, hidden] (the
    residual stream), layer: a `records.DenseLayer`; returns float32 [B, hidden]."""
    lay = DenseLayer(*layer)
    x = _attention_block(x, lay.norm1, lay.eps1, lay.attn, kc, vc, cos, sin, slots, pos, threads)
    return x + mlp_step(rms_norm(x, lay.norm2, lay.eps2), lay.mlp, threads)


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
def _router(x, router):
    r = Router(*router)
    logits = np.empty((x.shape[0], r.wr.shape[0]), np.float32)
    token_rows(r.tr, r.wr, rows_input(x, act_mode(ACT_INT16, r.tr)), logits, 0, r.wr.shape[0])
    return softmax_topk(logits, r.top_k, r.normalize)


@numba.njit(nogil=True, cache=True)
def moe_layer_step(x, layer, kc, vc, cos, sin, slots, pos, threads):
    """As `dense_layer_step` with a sparse MoE as the feed-forward (layer: a
    `records.MoeLayer`): router logits, softmax top-k, the fused experts over each token's
    k experts, plus the shared expert scaled by its sigmoid gate when there is one."""
    lay = MoeLayer(*layer)
    x = _attention_block(x, lay.norm1, lay.eps1, lay.attn, kc, vc, cos, sin, slots, pos, threads)
    h = rms_norm(x, lay.norm2, lay.eps2)
    ids, weights = _router(h, lay.router)
    out = np.empty_like(h)
    e = ExpertWeights(*lay.experts)
    chunks = row_chunks(min(e.gate.shape[1], e.down.shape[1]), threads)  # as `linear.gemv_chunks`
    none = np.zeros((0, 0), np.float32)  # no biases; silu(g) * u
    _moe_fused(e.tg, e.gate, e.tu, e.up, e.td, e.down, e.acts, h, ids, weights, out, chunks, NO_PANELS, (none, none, none),
               (np.float32(0), np.float32(0)))
    _add_shared_expert(h, lay.shared, out, threads)
    return x + out


@numba.njit(nogil=True, cache=True)
def dense_stack_step(x, layers, caches, cos, sin, slots, pos, threads):
    """`dense_layer_step` through consecutive layers in one call: layers, a tuple of
    `records.DenseLayer`, all of one type; caches, their (k cache, v cache); the rope tables
    and the step's slots and positions are shared by all of them."""
    for i in range(len(layers)):
        kc, vc = caches[i]
        x = dense_layer_step(x, layers[i], kc, vc, cos, sin, slots, pos, threads)
    return x


@numba.njit(nogil=True, cache=True)
def moe_stack_step(x, layers, caches, cos, sin, slots, pos, threads):
    """As `dense_stack_step` for `records.MoeLayer`s."""
    for i in range(len(layers)):
        kc, vc = caches[i]
        x = moe_layer_step(x, layers[i], kc, vc, cos, sin, slots, pos, threads)
    return x


@numba.njit(nogil=True, cache=True, fastmath=FASTMATH)
def _add_shared_expert(h, shared, out, threads):
    """out += sigmoid(gate h) * expert(h) for a `records.SharedExpert`; nothing for None."""
    if shared is None:
        return
    s = SharedExpert(*shared)
    y = mlp_step(h, s.mlp, threads)
    gate = np.empty((h.shape[0], 1), np.float32)
    token_rows(s.tg, s.wg, rows_input(h, act_mode(ACT_INT16, s.tg)), gate, 0, 1)
    for b in range(h.shape[0]):
        g = np.float32(1) / (np.float32(1) + np.exp(-gate[b, 0]))
        for i in range(h.shape[1]):
            out[b, i] += g * y[b, i]
