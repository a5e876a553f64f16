"""Fused MoE experts: out[n] = sum_k w[n,k] * down[e] @ (silu(gate[e] @ x[n]) * (up[e] @ x[n])).

Decode and small batches run as one numba call: tokens are grouped by expert, then one
parallel pass computes every (expert, row) of gate/up and a second every output row of
down, so each expert row is read once per call. Prefill (many tokens per expert) goes
expert by expert through `matmul`, which dequantizes tiles for BLAS.
"""

import numba
import numpy as np
from numba import prange

from .formats import FASTMATH, as_blocks, dot2
from .linear import matmul, num_threads

# Up to this many tokens the fused kernel wins; above, experts see enough tokens for BLAS.
FUSED_MAX_TOKENS = 16


@numba.njit(inline="always", fastmath=FASTMATH)
def _silu(g):
    return g / (np.float32(1) + np.exp(-g))


@numba.njit(nogil=True, cache=True)
def _group_by_expert(ids, experts):
    """(expert of each group, first pair of each group, pairs sorted by expert) for the valid
    (token, slot) pairs; a pair is n * K + k, ids < 0 are skipped."""
    n_tok, k_top = ids.shape
    count = np.zeros(experts + 1, np.int64)
    for n in range(n_tok):
        for k in range(k_top):
            if ids[n, k] >= 0:
                count[ids[n, k] + 1] += 1
    start = np.cumsum(count)
    pairs = np.empty(start[-1], np.int64)
    fill = start[:-1].copy()
    for n in range(n_tok):
        for k in range(k_top):
            e = ids[n, k]
            if e >= 0:
                pairs[fill[e]] = n * k_top + k
                fill[e] += 1
    used = np.flatnonzero(count[1:])
    first = np.empty(used.size + 1, np.int64)
    first[:-1] = start[used]
    first[-1] = pairs.size
    return used, first, pairs


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _moe_fused(tg, gate, tu, up, td, down, x, ids, weights, out):
    """gate, up: uint8 [E, I, H-row-bytes]; down: uint8 [E, H, I-row-bytes]; x: float32
    [N, H]; ids: int64 [N, K]; weights: float32 [N, K]; out: float32 [N, H] (overwritten)."""
    n_tok, k_top = ids.shape
    inter = gate.shape[1]
    hidden = down.shape[1]
    used, first, pairs = _group_by_expert(ids, gate.shape[0])
    h = np.empty((n_tok * k_top, inter), np.float32)

    # silu(gate @ x) * (up @ x) for every (expert, row pair) of the experts in use.
    half = (inter + 1) // 2
    for task in prange(used.size * half):
        g = task // half
        e = used[g]
        r0 = 2 * (task % half)
        r1 = min(r0 + 1, inter - 1)
        for i in range(first[g], first[g + 1]):
            p = pairs[i]
            xn = x[p // k_top]
            g0, g1 = dot2(tg, gate[e, r0], gate[e, r1], xn)
            u0, u1 = dot2(tu, up[e, r0], up[e, r1], xn)
            h[p, r0] = _silu(g0) * u0
            h[p, r1] = _silu(g1) * u1

    # out rows are owned by one task each: no races while summing over experts.
    for task in prange((hidden + 1) // 2):
        r0 = 2 * task
        r1 = min(r0 + 1, hidden - 1)
        for n in range(n_tok):
            out[n, r0] = 0
            out[n, r1] = 0
        for g in range(used.size):
            e = used[g]
            for i in range(first[g], first[g + 1]):
                p = pairs[i]
                n = p // k_top
                s0, s1 = dot2(td, down[e, r0], down[e, r1], h[p])
                wk = weights[n, p % k_top]
                out[n, r0] += wk * s0
                if r1 != r0:
                    out[n, r1] += wk * s1


def moe_forward(qtype_gate, gate, qtype_up, up, qtype_down, down, x, topk_ids, topk_weights,
                out=None, threads=None) -> np.ndarray:
    """Mixture-of-experts MLP with SiLU gating.

    gate, up: [E, I, H-row-bytes] GGUF blocks (logical [E, I, H]; or float [E, I, H]);
    down: [E, H, I-row-bytes] (logical [E, H, I]); x: float32 [N, H];
    topk_ids: int [N, K], -1 = skip; topk_weights: float32 [N, K]; returns float32 [N, H].
    """
    weights_in = (qtype_gate, gate, qtype_up, up, qtype_down, down)
    tg, gate, hidden = as_blocks(qtype_gate, gate)
    tu, up, hidden_u = as_blocks(qtype_up, up)
    td, down, inter = as_blocks(qtype_down, down)
    experts = gate.shape[0]
    if hidden_u != hidden or up.shape[:2] != gate.shape[:2] or down.shape[:2] != (experts, hidden) or gate.shape[1] != inter:
        raise ValueError(f"expert shapes disagree: gate {gate.shape}, up {up.shape}, down {down.shape} (bytes)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    ids = np.ascontiguousarray(topk_ids, dtype=np.int64)
    weights = np.ascontiguousarray(topk_weights, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != hidden or ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"x {x.shape}, topk_ids {ids.shape}, topk_weights {weights.shape} do not fit hidden size {hidden}")
    if ids.size and ids.max() >= experts:
        raise ValueError(f"expert id {ids.max()} out of range for {experts} experts")
    y = np.empty_like(x) if out is None else out
    with num_threads(threads):
        if x.shape[0] <= FUSED_MAX_TOKENS:
            _moe_fused(tg, gate, tu, up, td, down, x, ids, weights, y)
        else:
            _moe_by_expert(*weights_in, x, ids, weights, y)
    return y


def _moe_by_expert(qtype_gate, gate, qtype_up, up, qtype_down, down, x, ids, weights, out):
    """Prefill: each expert's weights are read once for all of its tokens."""
    out[...] = 0
    for e in np.unique(ids[ids >= 0]):
        tok, slot = np.nonzero(ids == e)
        xe = x[tok]
        g = matmul(qtype_gate, gate[e], xe)
        u = matmul(qtype_up, up[e], xe)
        with np.errstate(over="ignore", invalid="ignore"):
            h = g / (1 + np.exp(-g)) * u
        y = weights[tok, slot, None] * matmul(qtype_down, down[e], h)
        if np.unique(tok).size == tok.size:
            out[tok] += y
        else:  # a token that lists this expert twice
            np.add.at(out, tok, y)
