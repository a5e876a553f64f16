"""16-row panels in 8-bit dot products (kernels/panels.py): the exact dot of the weights with
x as the integer paths round it, for every format and x form the CPU has, on odd shapes;
and `matmul` and the fused MoE taking them for many tokens."""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from hybrid.operators import kernels
from hybrid.operators.kernels import formats
from hybrid.operators.kernels.activations import ACT_FLOAT, ACT_INT8, ACT_INT16, quantize_rows
from hybrid.operators.kernels.intrinsics import HAS_VNNI
from hybrid.operators.kernels.panels import PANEL, panel_form, panel_rows, panel_takes
from tests.test_kernels import as_int8, cols_for, make_weight, reference, seen

PANEL_FORMATS = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]


@numba.njit(cache=True)
def _panel_rows(t, w, xa, ix, iy, count, lo, hi, y):
    panel_rows(t, w, xa, ix, iy, count, lo, hi, y)


def _form(x, form):
    return quantize_rows(x, True, form == "split", form == "int8")


def _rounded(qtype, x, form):
    """x as the panel sees it (float64): int8 per 32-block, or int16."""
    return as_int8(x) if form == "int8" else seen(qtype, x)


def _skip_without(qtype, form):
    if form == "split" and not HAS_VNNI:
        pytest.skip("this CPU has no VNNI: split x takes no panels")
    if form == "int8" and int(qtype) not in formats.PANEL8_TYPES:
        pytest.skip(f"{qtype.name} takes int8 panels only with VNNI")


@pytest.mark.parametrize("form", ["split", "int8"])
@pytest.mark.parametrize("blocks", [1, 3, 9, 18])
@pytest.mark.parametrize("qtype", PANEL_FORMATS, ids=lambda t: t.name)
def test_panel_rows_is_the_dot_with_rounded_x(qtype, blocks, form):
    """Every token, picked by ix (repeats, any order) into row iy of y, gets the dot of the
    weights with its rounded x to float rounding, for steps cut short (blocks not a multiple
    of 8), rows not a multiple of 16 and a range that starts inside a panel; rows outside
    lo..hi and unlisted rows of y stay as they were; a NaN token spoils only itself."""
    _skip_without(qtype, form)
    if qtype in (Q.Q4_K, Q.Q6_K) and blocks > 3:
        blocks //= 3
    cols, rows = cols_for(qtype, blocks), 37
    w = make_weight(qtype, (rows, cols), seed=blocks)
    if qtype == Q.Q8_0:  # the extremes of the signed weights
        w = w.reshape(rows, -1, 34)
        w[0, :, 2:] = 0x80
        w[1, :, 2:] = 0x7F
        w = w.reshape(rows, -1)
    t, blk, _ = formats.as_blocks(qtype, w)
    x = np.random.default_rng(blocks).standard_normal((7, cols), dtype=np.float32)
    x[2, 5] = -40
    x[4, 3] = np.nan
    xa = _form(x, form)
    assert panel_takes(xa, t)
    want = _rounded(qtype, x, form) @ reference(qtype, w).T
    top = np.abs(want[np.isfinite(want)]).max()
    for count in (1, 3, 4, 9, 23):
        ix = np.random.default_rng(count).integers(0, 7, count)
        iy = np.random.default_rng(count).permutation(30)[:count]
        y = np.full((30, rows), 7.0, np.float32)
        _panel_rows(t, blk, xa, ix, iy, count, 3, rows - 2, y)
        got = y[iy, 3:rows - 2]
        ok = ix != 4
        np.testing.assert_allclose(got[ok], want[ix[ok], 3:rows - 2], rtol=2e-5, atol=2e-5 * top)
        assert np.isnan(got[~ok]).all()
        assert (y[iy][:, [0, 1, 2, rows - 2, rows - 1]] == 7).all() and (np.delete(y, iy, axis=0) == 7).all()


@pytest.mark.parametrize("form", ["split", "int8"])
def test_a_token_gets_the_same_bits_whatever_comes_with_it(form):
    """A token's panel result does not depend on how many tokens share the call or where it
    stands among them (groups of four, the 1-3 left over)."""
    _skip_without(Q.Q4_K, form)
    t, w, _ = formats.as_blocks(Q.Q4_K, make_weight(Q.Q4_K, (40, 512), seed=5))
    x = np.random.default_rng(6).standard_normal((11, 512), dtype=np.float32)
    xa = _form(x, form)
    alone = np.zeros((11, 40), np.float32)
    for n in range(11):
        _panel_rows(t, w, xa, np.array([n]), np.array([n]), 1, 0, 40, alone)
    for count in (2, 5, 11):
        ix = np.random.default_rng(count).permutation(11)[:count]
        y = np.zeros((count, 40), np.float32)
        _panel_rows(t, w, xa, ix, np.arange(count), count, 0, 40, y)
        np.testing.assert_array_equal(y, alone[ix])


@pytest.mark.parametrize("acts", [ACT_INT16, ACT_INT8], ids=["int16", "int8"])
@pytest.mark.parametrize("qtype", PANEL_FORMATS, ids=lambda t: t.name)
def test_matmul_takes_panels_for_many_tokens(qtype, acts):
    """matmul of more than GEMM_TOKENS tokens goes through panels where the format and x's
    form have them (else the float tiles) and stays the dot with the rounded x; threads
    split the rows in whole panels."""
    cols = cols_for(qtype, 2 if qtype == Q.Q4_K else 10)
    w = make_weight(qtype, (2 * PANEL + 5, cols), seed=2)
    x = np.random.default_rng(3).standard_normal((40, cols), dtype=np.float32)
    form = "int8" if acts == ACT_INT8 and int(qtype) in formats.INT8_TYPES else "split"
    taken = panel_form(int(qtype), acts)
    assert taken == (int(qtype) in (formats.PANEL8_TYPES if form == "int8" else formats.PANEL_TYPES))
    ref = reference(qtype, w)
    want = (_rounded(qtype, x, form) if taken else x.astype(np.float64)) @ ref.T
    for threads in (1, 2):
        got = kernels.matmul(qtype, w, x, threads=threads, acts=acts)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    exact = kernels.matmul(qtype, w, x, acts=ACT_FLOAT)
    np.testing.assert_allclose(exact, x.astype(np.float64) @ ref.T, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_quantize_rows_zeroes_blocks_of_subnormal_values():
    """A block whose largest value is subnormal (h = silu(g) * u of a very negative g) rounds
    to zeros with a finite scale and sum: its inverse scale overflowed to Inf once, and Inf *
    0 made the block's sum NaN, which spoiled every dot of that token."""
    x = np.random.default_rng(1).standard_normal((2, 96), dtype=np.float32)
    x[0, 32:64] = np.float32(1e-39) * np.arange(32, dtype=np.float32)
    x[1, :32] = np.float32(1e-31)
    for args in ((True, True), (True, False, True)):
        _, xq, xs, xsum, xb, x8 = quantize_rows(x, *args)
        assert np.isfinite(xs).all() and np.isfinite(xsum).all()
        q = xq if xq.shape[1] else x8
        assert not q[0, 32:64].any() and not q[1, :32].any()
        assert xsum[0, 1] == 0 and xsum[1, 0] == 0


@pytest.mark.parametrize("acts", [ACT_INT16, ACT_INT8], ids=["int16", "int8"])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q4_0], ids=lambda t: t.name)
def test_moe_experts_with_many_tokens(qtype, acts):
    """The fused MoE with 6-40 tokens per expert (panels for the formats that have them)
    against the same MoE on float activations, within the rounding of x; tokens whose
    intermediate values underflow to subnormals stay finite."""
    E, H, I, K, N = 8, cols_for(qtype, 2), cols_for(qtype, 1), 2, 150
    gate, up, down = (make_weight(qtype, s, seed=i) for i, s in enumerate(((E, I, H), (E, I, H), (E, H, I))))
    rng = np.random.default_rng(7)
    x = rng.standard_normal((N, H), dtype=np.float32)
    x[5] *= 1e-36  # h = silu(g) * u ~ 1e-72: zeros, and subnormal blocks on the way
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(N)])
    ids[:40, 0] = 3  # one expert with many tokens, one with few
    ids[40:46, 0] = 5
    ids[:46, 1] = np.where(ids[:46, 1] == ids[:46, 0], (ids[:46, 0] + 1) % E, ids[:46, 1])
    wts = rng.random((N, K), dtype=np.float32)
    want = kernels.moe_forward(qtype, gate, qtype, up, qtype, down, x, ids, wts, acts=ACT_FLOAT)
    got = kernels.moe_forward(qtype, gate, qtype, up, qtype, down, x, ids, wts, acts=acts)
    assert np.isfinite(got).all()
    tol = 1e-4 if acts == ACT_INT16 else 3e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
