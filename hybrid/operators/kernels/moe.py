"""Fused MoE experts: out[n] = sum_k w[n,k] * down[e] @ (silu(gate[e] @ x[n]) * (up[e] @ x[n])),
or with biases on the three projections and gpt-oss's clamped SwiGLU in place of silu(g) * u.

Up to MOE_FUSED_MAX_TOKENS tokens (decode, batches, prefill chunks; policy.py) run as one
numba call: tokens are grouped by expert, then one parallel pass computes every (expert,
chunk of rows) of gate/up and a second every chunk of output rows of down, so each expert
row is read from memory, and decoded, once per call (an expert with several tokens multiplies them
all with a decoded tile: batch.py). Longer inputs go expert by expert through `matmul`.
"""

import numba
import numpy as np
from numba import prange

from . import policy
from .activations import ACT_FLOAT, ACT_INT8, ACT_INT16, act_mode, panel_mode, quantize_rows
from .batch import ROWS, decode_tile, tile_dot
from .formats import as_blocks
from .intrinsics import FASTMATH
from .linear import gemv_chunks, matmul, num_threads
from .panels import NO_FORM, PANEL, panel_dots, panel_form, panel_input, panel_scratch, tokens_per_block
from .policy import EXPERT_GEMV_TOKENS, GEMM_TOKENS, PANEL_MIN_TOKENS, TILE_X_BYTES

# `_moe_fused`'s first_panel when no expert goes through the panels.
NO_PANELS = 1 << 62
# `_moe_fused`'s bias when the experts have none, and its act for silu(g) * u.
NO_BIAS = (np.zeros((0, 0), np.float32),) * 3
SILU = (np.float32(0), np.float32(0))
from .rows import gemm_rows, gemm_takes, gemv_rows


@numba.njit(inline="always", fastmath=FASTMATH)
def _silu(g):
    return g / (np.float32(1) + np.exp(-g))


@numba.njit(inline="always", fastmath=FASTMATH)
def _bias(b, e, r):
    """b[e, r], or 0 where there is no bias (b of shape (0, 0)): adding it changes no bit."""
    return b[e, r] if b.shape[0] else np.float32(0)


@numba.njit(inline="always", fastmath=FASTMATH)
def _gated(g, u, bias, act, e, r):
    """Row r of expert e's hidden state from its gate and up outputs g, u, each plus its
    bias first: silu(g) * u, or for act = (limit, alpha) with alpha > 0 gpt-oss's clamped
    SwiGLU, (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'), g' = min(g, limit)."""
    g += _bias(bias[0], e, r)
    u += _bias(bias[1], e, r)
    limit, alpha = act
    if alpha == 0:
        return _silu(g) * u
    g = min(g, limit)
    u = min(max(u, -limit), limit)
    return (u + np.float32(1)) * g / (np.float32(1) + np.exp(-alpha * g))


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


@numba.njit(inline="always", fastmath=FASTMATH)
def _experts_input(x, mode):
    """x as the fused MoE's GEMVs and `gemm_rows` take it for the activation form `mode`
    (`act_mode`): every token rounded to int8, or to int16 (with VNNI, also split) whenever
    a format asks for integers."""
    if mode == ACT_INT8:
        return quantize_rows(x, True, False, True)
    return quantize_rows(x, mode != ACT_FLOAT)


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _moe_fused(tg, gate, tu, up, td, down, acts, x, ids, weights, out, chunks, first_panel, bias, act):
    """gate, up: uint8 [E, I, H-row-bytes]; down: uint8 [E, H, I-row-bytes]; x: float32
    [N, H]; ids: int64 [N, K]; weights: float32 [N, K]; out: float32 [N, H] (overwritten);
    acts: the activation form asked for (activations.ACT_*);
    the rows of each matrix are split in `chunks` (one per thread); experts with
    `first_panel` or more (token, slot) pairs are left to `_moe_panels` (NO_PANELS: none);
    bias: float32 (gate [E, I], up [E, I], down [E, H]) or NO_BIAS; act: as `_gated`."""
    n_tok, k_top = ids.shape
    inter = gate.shape[1]
    hidden = down.shape[1]
    used, first, pairs = _group_by_expert(ids, gate.shape[0])
    h = np.empty((n_tok * k_top, inter), np.float32)
    xa = _experts_input(x, max(act_mode(acts, tg), act_mode(acts, tu)))  # the form gemv_rows takes
    multi = gemm_takes(xa, tg) and gemm_takes(xa, tu)

    # silu(gate @ x) * (up @ x) for every (expert, chunk of rows) in use. A task reads its
    # rows of gate, then the same rows of up: interleaving gate and up row by row halved
    # the DRAM read speed. An expert with up to EXPERT_GEMV_TOKENS (token, slot) pairs runs a
    # GEMV per pair; with more, each row is decoded once into a tile and multiplied there
    # with every pair (batch.py).
    for task in prange(used.size * chunks):
        g = task // chunks
        e = used[g]
        lo = (task % chunks) * inter // chunks
        hi = (task % chunks + 1) * inter // chunks
        j0, j1 = first[g], first[g + 1]
        if j1 - j0 >= first_panel:
            continue
        if 2 <= j1 - j0 <= GEMM_TOKENS and multi:
            ps = pairs[j0:j1]
            u = np.empty((j1 - j0, inter), np.float32)
            gemm_rows(tg, gate[e], xa, ps // k_top, ps, j1 - j0, lo, hi, h)
            gemm_rows(tu, up[e], xa, ps // k_top, np.arange(j1 - j0), j1 - j0, lo, hi, u)
            for j in range(j1 - j0):
                p = ps[j]
                for r in range(lo, hi):
                    h[p, r] = _gated(h[p, r], u[j, r], bias, act, e, r)
            continue
        if j1 - j0 <= EXPERT_GEMV_TOKENS:
            u = np.empty(inter, np.float32)
            for j in range(j0, j1):
                p = pairs[j]
                n = p // k_top
                gemv_rows(tg, gate[e], xa, n, lo, hi, h[p])
                gemv_rows(tu, up[e], xa, n, lo, hi, u)
                for r in range(lo, hi):
                    h[p, r] = _gated(h[p, r], u[r], bias, act, e, r)
            continue
        tile = np.empty((ROWS, x.shape[1]), np.float32)
        for r in range(lo, hi, ROWS):
            decode_tile(tg, gate[e], r, hi, tile)
            for j in range(j0, j1, 2):
                pa, pb = pairs[j], pairs[min(j + 1, j1 - 1)]  # an odd last pair is done twice
                s = tile_dot(tile, x[pa // k_top], x[pb // k_top])
                for i in range(min(ROWS, hi - r)):
                    h[pa, r + i] = s[i]
                    h[pb, r + i] = s[ROWS + i]
        for r in range(lo, hi, ROWS):
            decode_tile(tu, up[e], r, hi, tile)
            for j in range(j0, j1, 2):
                pa, pb = pairs[j], pairs[min(j + 1, j1 - 1)]
                s = tile_dot(tile, x[pa // k_top], x[pb // k_top])
                for i in range(min(ROWS, hi - r)):
                    h[pa, r + i] = _gated(h[pa, r + i], s[i], bias, act, e, r + i)
                    if pb != pa:
                        h[pb, r + i] = _gated(h[pb, r + i], s[ROWS + i], bias, act, e, r + i)

    # A chunk of out rows is owned by one task (no races while summing over experts) and
    # read expert by expert, as above.
    ha = _experts_input(h, act_mode(acts, td))
    multi = gemm_takes(ha, td)
    for c in prange(chunks):
        lo = c * hidden // chunks
        hi = (c + 1) * hidden // chunks
        out[:, lo:hi] = 0
        tile = np.empty((ROWS, inter), np.float32)
        y = np.empty(hidden, np.float32)
        ys = np.empty((GEMM_TOKENS, hidden), np.float32)
        for g in range(used.size):
            e = used[g]
            j0, j1 = first[g], first[g + 1]
            if j1 - j0 >= first_panel:
                continue
            if 2 <= j1 - j0 <= GEMM_TOKENS and multi:
                ps = pairs[j0:j1]
                gemm_rows(td, down[e], ha, ps, np.arange(j1 - j0), j1 - j0, lo, hi, ys)
                for j in range(j1 - j0):
                    n = ps[j] // k_top
                    wk = weights[n, ps[j] % k_top]
                    for r in range(lo, hi):
                        out[n, r] += wk * (ys[j, r] + _bias(bias[2], e, r))
                continue
            if j1 - j0 <= EXPERT_GEMV_TOKENS:
                for j in range(j0, j1):
                    p = pairs[j]
                    n = p // k_top
                    wk = weights[n, p % k_top]
                    gemv_rows(td, down[e], ha, p, lo, hi, y)
                    for r in range(lo, hi):
                        out[n, r] += wk * (y[r] + _bias(bias[2], e, r))
                continue
            for r in range(lo, hi, ROWS):
                decode_tile(td, down[e], r, hi, tile)
                for j in range(j0, j1, 2):
                    pa, pb = pairs[j], pairs[min(j + 1, j1 - 1)]
                    s = tile_dot(tile, h[pa], h[pb])
                    na, nb = pa // k_top, pb // k_top
                    wa, wb = weights[na, pa % k_top], weights[nb, pb % k_top]
                    for i in range(min(ROWS, hi - r)):
                        out[na, r + i] += wa * (s[i] + _bias(bias[2], e, r + i))
                        if pb != pa:
                            out[nb, r + i] += wb * (s[ROWS + i] + _bias(bias[2], e, r + i))


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=FASTMATH)
def _moe_panels(tg, gate, tu, up, td, down, form_in, form_mid, x, ids, weights, out, chunks, first_panel, bias, act):
    """Adds to out (as `_moe_fused`'s arguments) the experts with `first_panel` or more
    (token, slot) pairs, on the integer panels (panels.py): x in the form form_in for gate
    and up, the hidden state in form_mid for down. Each task takes one expert's panels of
    gate and up rows for all of its pairs; then each task owns a range of out's columns
    and adds every such expert's down rows there (no races)."""
    n_tok, k_top = ids.shape
    inter = gate.shape[1]
    hidden = down.shape[1]
    used, first, pairs = _group_by_expert(ids, gate.shape[0])
    big = np.flatnonzero(first[1:] - first[:-1] >= first_panel)
    if big.size == 0:
        return
    # h holds only these experts' pairs, expert after expert: row base[i] + j is pair
    # first[big[i]] + j (so only they are quantized for down)
    base = np.zeros(big.size + 1, np.int64)
    for i in range(big.size):
        base[i + 1] = base[i] + first[big[i] + 1] - first[big[i]]
    px = panel_input(x, form_in)
    h = np.empty((base[-1], inter), np.float32)
    per = tokens_per_block(form_in, x.shape[1], TILE_X_BYTES)
    panels_in = (inter + PANEL - 1) // PANEL
    for task in prange(big.size * chunks):
        g = big[task // chunks]
        e = used[g]
        row0 = base[task // chunks] - first[g]  # h's row of pair index b0 + j: row0 + b0 + j
        p0 = (task % chunks) * panels_in // chunks
        p1 = (task % chunks + 1) * panels_in // chunks
        buf, sc, mn = panel_scratch()
        yg = np.empty(PANEL * per, np.float32)
        yu = np.empty(PANEL * per, np.float32)
        toks = np.empty(per, np.int64)
        for b0 in range(first[g], first[g + 1], per):
            nt = min(per, first[g + 1] - b0)
            for j in range(nt):
                toks[j] = pairs[b0 + j] // k_top
            for p in range(p0, p1):
                lo = PANEL * p
                hi = min(inter, lo + PANEL)
                panel_dots(tg, gate[e], lo, hi, px, form_in, toks, nt, yg, buf, sc, mn)
                panel_dots(tu, up[e], lo, hi, px, form_in, toks, nt, yu, buf, sc, mn)
                for j in range(nt):
                    for i in range(hi - lo):
                        h[row0 + b0 + j, lo + i] = _gated(yg[PANEL * j + i], yu[PANEL * j + i], bias, act, e, lo + i)

    ph = panel_input(h, form_mid)
    per = tokens_per_block(form_mid, inter, TILE_X_BYTES)
    panels_out = (hidden + PANEL - 1) // PANEL
    for c in prange(chunks):
        p0 = c * panels_out // chunks
        p1 = (c + 1) * panels_out // chunks
        buf, sc, mn = panel_scratch()
        yd = np.empty(PANEL * per, np.float32)
        toks = np.empty(per, np.int64)
        for i_big in range(big.size):
            g = big[i_big]
            e = used[g]
            row0 = base[i_big] - first[g]
            for b0 in range(first[g], first[g + 1], per):
                nt = min(per, first[g + 1] - b0)
                for j in range(nt):
                    toks[j] = row0 + b0 + j
                for p in range(p0, p1):
                    lo = PANEL * p
                    hi = min(hidden, lo + PANEL)
                    panel_dots(td, down[e], lo, hi, ph, form_mid, toks, nt, yd, buf, sc, mn)
                    for j in range(nt):
                        pr = pairs[b0 + j]
                        n = pr // k_top
                        wk = weights[n, pr % k_top]
                        for i in range(hi - lo):
                            out[n, lo + i] += wk * (yd[PANEL * j + i] + _bias(bias[2], e, lo + i))


def panel_plan(tg, tu, td, acts):
    """(first_panel, form_in, form_mid) of `_moe_panels` for these expert types: experts with
    PANEL_MIN_TOKENS or more pairs take the panels when all three matrices have one for the
    activation forms the fused kernel would use; else first_panel is NO_PANELS."""
    mode_in = max(panel_mode.py_func(acts, tg, True), panel_mode.py_func(acts, tu, True))
    form_in = panel_form.py_func(tg, mode_in)
    form_mid = panel_form.py_func(td, panel_mode.py_func(acts, td, True))
    if NO_FORM in (form_in, panel_form.py_func(tu, mode_in), form_mid):
        return NO_PANELS, NO_FORM, NO_FORM
    return PANEL_MIN_TOKENS, form_in, form_mid


def moe_forward(qtype_gate, gate, qtype_up, up, qtype_down, down, x, topk_ids, topk_weights,
                out=None, threads=None, acts=ACT_INT16, bias=None, glu=None) -> np.ndarray:
    """Mixture-of-experts MLP with SiLU gating.

    gate, up: [E, I, H-row-bytes] GGUF blocks (logical [E, I, H]; or float [E, I, H]);
    down: [E, H, I-row-bytes] (logical [E, H, I]); x: float32 [N, H];
    topk_ids: int [N, K], -1 = skip; topk_weights: float32 [N, K]; returns float32 [N, H];
    acts: the activation form asked for (activations.ACT_*); bias: None or the biases of
    gate, up ([E, I]) and down ([E, H]); glu: None (silu(gate) * up) or (limit, alpha) of
    gpt-oss's clamped SwiGLU (`_gated`).
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
    bias, act = _bias_and_act(bias, glu, experts, inter, hidden)
    y = np.empty_like(x) if out is None else out
    with num_threads(threads):
        if x.shape[0] <= policy.MOE_FUSED_MAX_TOKENS:
            chunks = gemv_chunks(min(inter, hidden))
            first_panel, form_in, form_mid = panel_plan(tg, tu, td, acts)
            # no expert with first_panel pairs (a decode step never has one): skip the call
            if first_panel != NO_PANELS and (ids.size < first_panel
                                             or np.bincount(ids[ids >= 0], minlength=1).max() < first_panel):
                first_panel = NO_PANELS
            _moe_fused(tg, gate, tu, up, td, down, acts, x, ids, weights, y, chunks, first_panel, bias, act)
            if first_panel != NO_PANELS:
                _moe_panels(tg, gate, tu, up, td, down, form_in, form_mid, x, ids, weights, y, chunks, first_panel,
                            bias, act)
        else:
            _moe_by_expert(*weights_in, x, ids, weights, y, acts, bias, act)
    return y


def _bias_and_act(bias, glu, experts, inter, hidden):
    """`_moe_fused`'s bias and act for moe_forward's bias and glu, checked."""
    if bias is None:
        bias = NO_BIAS
    else:
        bias = tuple(np.ascontiguousarray(b, dtype=np.float32) for b in bias)
        want = ((experts, inter), (experts, inter), (experts, hidden))
        if len(bias) != 3 or any(b.shape != w for b, w in zip(bias, want)):
            raise ValueError(f"expert biases {[b.shape for b in bias]} are not gate, up, down of shapes {want}")
    if glu is None:
        return bias, SILU
    limit, alpha = (np.float32(v) for v in glu)
    if not alpha > 0:
        raise ValueError(f"the clamped SwiGLU's alpha must be positive, got {alpha}")
    return bias, (limit, alpha)


def moe_warm_up(qtype_gate, gate, qtype_up, up, qtype_down, down, threads=None, acts=ACT_INT16, bias=None, glu=None) -> None:
    """Run `_moe_panels` once, on PANEL_MIN_TOKENS zero tokens routed to expert 0, where these
    experts take it (so numba compiles it, or loads it from its cache, now)."""
    tg, _, hidden = as_blocks(qtype_gate, gate)
    td, _, inter = as_blocks(qtype_down, down)
    if panel_plan(tg, int(qtype_up), td, acts)[0] == NO_PANELS:
        return
    n = policy.PANEL_MIN_TOKENS
    moe_forward(qtype_gate, gate, qtype_up, up, qtype_down, down, np.zeros((n, hidden), np.float32),
                np.zeros((n, 1), np.int64), np.ones((n, 1), np.float32), threads=threads, acts=acts, bias=bias, glu=glu)


def _moe_by_expert(qtype_gate, gate, qtype_up, up, qtype_down, down, x, ids, weights, out, acts, bias, act):
    """Prefill: each expert's weights are read once for all of its tokens."""
    out[...] = 0
    biased = bias[0].shape[0] > 0
    limit, alpha = act
    for e in np.unique(ids[ids >= 0]):
        tok, slot = np.nonzero(ids == e)
        xe = x[tok]
        g = matmul(qtype_gate, gate[e], xe, acts=acts)
        u = matmul(qtype_up, up[e], xe, acts=acts)
        if biased:
            g, u = g + bias[0][e], u + bias[1][e]
        with np.errstate(over="ignore", invalid="ignore"):
            if alpha > 0:
                g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
                h = (u + 1) * g / (1 + np.exp(-alpha * g))
            else:
                h = g / (1 + np.exp(-g)) * u
        d = matmul(qtype_down, down[e], h, acts=acts)
        y = weights[tok, slot, None] * (d + bias[2][e] if biased else d)
        if np.unique(tok).size == tok.size:
            out[tok] += y
        else:  # a token that lists this expert twice
            np.add.at(out, tok, y)
