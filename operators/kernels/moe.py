"""Fused MoE experts: out[n] = sum_k w[n,k] * down[e] @ (silu(gate[e] @ x[n]) * (up[e] @ x[n])).

Decode and small batches run as one numba call: tokens are grouped by expert, then one
parallel pass computes every (expert, chunk of rows) of gate/up and a second every chunk
of output rows of down, so each expert row is read from memory once per call. Prefill
(many tokens per expert) goes expert by expert through `matmul`, which dequantizes tiles
for a GEMM.
"""

import numba
import numpy as np
from numba import prange

from .formats import FASTMATH, as_blocks, dot2, far_pair
from .linear import gemv_chunks, matmul, num_threads

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
def _moe_fused(tg, gate, tu, up, td, down, x, ids, weights, out, chunks):
    """gate, up: uint8 [E, I, H-row-bytes]; down: uint8 [E, H, I-row-bytes]; x: float32
    [N, H]; ids: int64 [N, K]; weights: float32 [N, K]; out: float32 [N, H] (overwritten);
    the rows of each matrix are split in `chunks` (one per thread)."""
    n_tok, k_top = ids.shape
    inter = gate.shape[1]
    hidden = down.shape[1]
    used, first, pairs = _group_by_expert(ids, gate.shape[0])
    h = np.empty((n_tok * k_top, inter), np.float32)

    # silu(gate @ x) * (up @ x) for every (expert, chunk of rows) in use. A task reads its
    # rows of gate, then the same rows of up, each as two long streams (`far_pair`):
    # interleaving gate and up row pair by row pair halved the DRAM read speed. Each row
    # pair is dotted with every token of the expert while it is in L1.
    for task in prange(used.size * chunks):
        g = task // chunks
        e = used[g]
        lo = (task % chunks) * inter // chunks
        hi = (task % chunks + 1) * inter // chunks
        half = (hi - lo + 1) // 2
        for i in range(half):
            r0, r1 = far_pair(lo, hi, half, i)
            for j in range(first[g], first[g + 1]):
                p = pairs[j]
                h[p, r0], h[p, r1] = dot2(tg, gate[e, r0], gate[e, r1], x[p // k_top])
        for i in range(half):
            r0, r1 = far_pair(lo, hi, half, i)
            for j in range(first[g], first[g + 1]):
                p = pairs[j]
                u0, u1 = dot2(tu, up[e, r0], up[e, r1], x[p // k_top])
                g0, g1 = h[p, r0], h[p, r1]
                h[p, r0] = _silu(g0) * u0
                h[p, r1] = _silu(g1) * u1

    # A chunk of out rows is owned by one task (no races while summing over experts) and
    # read expert by expert, as above.
    for c in prange(chunks):
        lo = c * hidden // chunks
        hi = (c + 1) * hidden // chunks
        half = (hi - lo + 1) // 2
        out[:, lo:hi] = 0
        for g in range(used.size):
            e = used[g]
            for i in range(half):
                r0, r1 = far_pair(lo, hi, half, i)
                for j in range(first[g], first[g + 1]):
                    p = pairs[j]
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
            _moe_fused(tg, gate, tu, up, td, down, x, ids, weights, y, gemv_chunks(min(inter, hidden)))
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
