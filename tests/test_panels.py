"""The integer panels (kernels/panels.py): 16 weight rows against many tokens, for matmul
and for the fused MoE's experts with many tokens."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from hybrid.operators import kernels
from hybrid.operators.kernels import moe, panels, policy
from hybrid.operators.kernels.activations import ACT_AUTO, ACT_FLOAT, ACT_INT8, ACT_INT16, DEFAULT_ACTIVATIONS, quantize_rows
from hybrid.operators.kernels.formats import as_blocks
from hybrid.operators.kernels.intrinsics import HAS_VNNI
from hybrid.operators.kernels.moe import NO_PANELS, panel_plan
from hybrid.operators.kernels.policy import TILE_X_BYTES

from .test_kernels import assert_close, make_weight, reference, run_moe, torch_moe

PANEL_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.MXFP4, Q.Q4_K, Q.Q6_K]
BLOCK32_TYPES = [t for t in PANEL_TYPES if t not in (Q.Q4_K, Q.Q6_K)]
FORMS = ([("split", panels.SPLIT)] if HAS_VNNI else []) + [("int8", panels.INT8)]


def rounded(x, form):
    """x (float64) as the panels see it: each 32-block rounded to int16 (split) or int8."""
    _, xq, xs, _, _, x8 = quantize_rows(np.ascontiguousarray(x, np.float32), True, form == panels.SPLIT,
                                         form == panels.INT8)
    q = xq if form == panels.SPLIT else x8
    return (q.reshape(x.shape[0], -1, 32) * xs[..., None].astype(np.float64)).reshape(x.shape)


def run_panels(qtype, w, x, form, chunks=2, budget=TILE_X_BYTES):
    t, wb, _ = as_blocks(qtype, w)
    y = np.full((x.shape[0], wb.shape[0]), np.nan, np.float32)
    panels.matmul_panels(t, wb, x, y, chunks, form, budget)
    return y


@pytest.mark.parametrize("form_name,form", FORMS)
@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,tokens", [(16, 4), (37, 9), (5, 13), (70, 64)])
def test_panels_are_the_dot_with_rounded_x(qtype, form_name, form, rows, tokens):
    """Every format, both forms of x; rows that end inside a panel, tokens that end inside a
    group of 4, two 256-column steps: the exact dot of the weights with x as rounded."""
    if form == panels.INT8 and qtype not in [Q(t) for t in panels.PANEL8_TYPES]:
        pytest.skip(f"{qtype.name} has no int8 panel on this CPU")
    w = make_weight(qtype, (rows, 512), seed=rows)
    x = np.random.default_rng(tokens).standard_normal((tokens, 512), dtype=np.float32)
    assert_close(run_panels(qtype, w, x, form), rounded(x, form) @ reference(qtype, w).T, rtol=2e-6)


@pytest.mark.parametrize("form_name,form", FORMS)
@pytest.mark.parametrize("qtype", BLOCK32_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("cols", [32, 288, 640])
def test_a_partial_last_step(qtype, form_name, form, cols):
    """Rows of a 32-weight format that are not whole 256-column steps (Gemma 3 270M's 640,
    one block alone): the last step's groups go one by one, the same exact dot."""
    if form == panels.INT8 and qtype not in [Q(t) for t in panels.PANEL8_TYPES]:
        pytest.skip(f"{qtype.name} has no int8 panel on this CPU")
    w = make_weight(qtype, (37, cols), seed=cols)
    x = np.random.default_rng(cols).standard_normal((11, cols), dtype=np.float32)
    assert_close(run_panels(qtype, w, x, form), rounded(x, form) @ reference(qtype, w).T, rtol=2e-6)


def test_token_blocks_and_chunks():
    """More tokens than one block of x (a small budget: 4 tokens a block), one to three chunks
    of panels: the same outputs, bitwise."""
    w = make_weight(Q.Q4_K, (50, 768))
    x = np.random.default_rng(3).standard_normal((23, 768), dtype=np.float32)
    form = FORMS[0][1]
    whole = run_panels(Q.Q4_K, w, x, form)
    for chunks, budget in [(1, TILE_X_BYTES), (3, 1), (2, 3 * 768)]:
        np.testing.assert_array_equal(run_panels(Q.Q4_K, w, x, form, chunks, budget), whole)


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda t: t.name)
def test_matmul_takes_the_panels(qtype):
    """`matmul` with PANEL_MIN_TOKENS or more tokens of a panel format is the panels' product
    (bitwise), for the activation form asked for; float activations do not take them."""
    w = make_weight(qtype, (33, 512))
    x = np.random.default_rng(5).standard_normal((policy.PANEL_MIN_TOKENS + 3, 512), dtype=np.float32)
    for acts, (form_name, form) in [(ACT_INT16, ("split", panels.SPLIT)), (ACT_INT8, ("int8", panels.INT8))]:
        if (form_name, form) not in FORMS or (form == panels.INT8 and int(qtype) not in panels.PANEL8_TYPES):
            assert panels.panel_form.py_func(int(qtype), acts) == panels.NO_FORM
            continue
        np.testing.assert_array_equal(kernels.matmul(qtype, w, x, acts=acts), run_panels(qtype, w, x, form))
    assert panels.panel_form.py_func(int(qtype), ACT_FLOAT) == panels.NO_FORM
    if qtype in BLOCK32_TYPES and int(qtype) in panels.PANEL8_TYPES:  # 2.25 steps
        assert panels.panel_form.py_func(int(qtype), ACT_INT8) == panels.INT8


def test_formats_without_panels():
    """Q5_K (no panel) and F16 go through the tiles, unrounded."""
    for qtype in (Q.Q5_K, Q.F16):
        assert panels.panel_form.py_func(int(qtype), ACT_INT16) == panels.NO_FORM
        w = make_weight(qtype, (9, 512))
        x = np.random.default_rng(2).standard_normal((20, 512), dtype=np.float32)
        assert_close(kernels.matmul(qtype, w, x), x @ reference(qtype, w).T)


MOE_PANEL_TYPES = [(Q.Q4_K, Q.Q4_K, Q.Q6_K), (Q.Q8_0, Q.Q8_0, Q.Q8_0), (Q.Q4_0, Q.Q4_0, Q.Q4_1),
                   (Q.Q5_0, Q.Q5_0, Q.Q8_0), (Q.MXFP4, Q.MXFP4, Q.MXFP4)]


@pytest.mark.parametrize("tokens,experts", [(12, 6), (40, 12)])
@pytest.mark.parametrize("types", MOE_PANEL_TYPES, ids=lambda ts: "-".join(t.name for t in ts))
def test_moe_experts_on_panels_match_torch(types, tokens, experts):
    """Experts with PANEL_MIN_TOKENS or more (token, slot) pairs take the panels beside the
    fused kernel's experts with fewer: together the module they replace."""
    y, ref, ids = run_moe(types, experts=experts, top_k=3, tokens=tokens, hidden=512, inter=256)
    count = np.bincount(ids.ravel(), minlength=experts)
    assert count.max() >= policy.PANEL_MIN_TOKENS and count.min() < policy.PANEL_MIN_TOKENS
    assert_close(y, ref)


def test_moe_experts_on_panels_with_partial_steps():
    """Experts whose hidden size and width are not whole 256-column steps (576 and 288)
    take the panels too, and match the module they replace."""
    types = (Q.Q4_0, Q.Q5_0, Q.Q4_1)
    assert panel_plan(*(int(t) for t in types), ACT_INT8)[0] == policy.PANEL_MIN_TOKENS
    y, ref, ids = run_moe(types, experts=6, top_k=3, tokens=40, hidden=576, inter=288)
    assert np.bincount(ids.ravel(), minlength=6).max() >= policy.PANEL_MIN_TOKENS
    assert_close(y, ref)


def test_moe_panels_are_each_tokens_own(monkeypatch):
    """An expert on the panels gives each pair what its token gets in a different batch on
    the panels, bitwise: tokens do not leak into each other (shuffled, duplicated,
    one expert twice per token)."""
    q = Q.Q4_K
    gate, up = (make_weight(q, (4, 256, 512), s) for s in (1, 2))
    down = make_weight(Q.Q6_K, (4, 512, 256), 3)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((30, 512), dtype=np.float32)
    ids = rng.integers(0, 4, (30, 2))
    ids[:3] = [[1, 1], [2, 2], [0, 0]]
    weights = rng.random(ids.shape, dtype=np.float32)
    args = (q, gate, q, up, Q.Q6_K, down)
    calls = []
    real = moe._moe_panels
    monkeypatch.setattr(moe, "_moe_panels", lambda *a: calls.append(a[13]) or real(*a))  # first_panel
    full = kernels.moe_forward(*args, x, ids, weights)
    assert calls == ([policy.PANEL_MIN_TOKENS] if HAS_VNNI else [])  # int8 panels only when asked
    pick = rng.permutation(30)[:25]
    part = kernels.moe_forward(*args, x[pick], ids[pick], weights[pick])
    assert np.bincount(ids[pick].ravel()).min() >= policy.PANEL_MIN_TOKENS  # every expert on the panels
    np.testing.assert_array_equal(part, full[pick])
    ref = torch_moe(*(torch.from_numpy(reference(t, w)) for t, w in [(q, gate), (q, up), (Q.Q6_K, down)]),
                    torch.from_numpy(x).double(), torch.from_numpy(ids), torch.from_numpy(weights).double())
    assert_close(full, ref.numpy(), rtol=1e-4)


def test_panel_plan():
    """All three expert types need a panel for their activation form."""
    assert panel_plan(int(Q.Q4_K), int(Q.Q4_K), int(Q.Q6_K), ACT_INT8)[0] == policy.PANEL_MIN_TOKENS
    assert panel_plan(int(Q.Q4_K), int(Q.Q5_K), int(Q.Q6_K), ACT_INT8)[0] == NO_PANELS
    assert panel_plan(int(Q.Q4_0), int(Q.Q4_0), int(Q.Q5_1), ACT_INT8)[0] == NO_PANELS
    assert panel_plan(int(Q.Q4_K), int(Q.Q4_K), int(Q.Q6_K), ACT_FLOAT)[0] == NO_PANELS
    on_vnni = panel_plan(int(Q.Q8_0), int(Q.Q8_0), int(Q.Q8_0), ACT_INT16)[0]
    assert on_vnni == (policy.PANEL_MIN_TOKENS if HAS_VNNI else NO_PANELS)


# What `auto` is on the experts' panels: int16 split in bytes where the CPU has VNNI, int8
# where it has not (the int16 panels need VNNI; without, int16 prefill took the float tiles).
AUTO_PANELS = ACT_INT16 if HAS_VNNI else ACT_INT8


@pytest.mark.parametrize("qtype", PANEL_TYPES, ids=lambda t: t.name)
def test_auto_is_the_default_and_int16_for_dense_weights(qtype):
    """`matmul` (dense weights) under `auto` is int16 on every CPU, one token, a few, or a
    prefill's many (on the panels with VNNI, the tiles without), bitwise."""
    assert DEFAULT_ACTIVATIONS == "auto"
    w = make_weight(qtype, (40, 512))
    for tokens in (1, 3, policy.PANEL_MIN_TOKENS + 3):
        x = np.random.default_rng(tokens).standard_normal((tokens, 512), dtype=np.float32)
        np.testing.assert_array_equal(kernels.matmul(qtype, w, x, acts=ACT_AUTO),
                                      kernels.matmul(qtype, w, x, acts=ACT_INT16))


def test_auto_moe_panels():
    """The fused MoE's experts with many pairs take the panels under `auto` on any CPU (Q4_K
    gate and up, Q6_K down: Q4_K_M's experts): int16 with VNNI, int8 without; the result is
    the explicit form's, bitwise."""
    plan = panel_plan(int(Q.Q4_K), int(Q.Q4_K), int(Q.Q6_K), ACT_AUTO)
    assert plan == panel_plan(int(Q.Q4_K), int(Q.Q4_K), int(Q.Q6_K), AUTO_PANELS)
    assert plan[0] == policy.PANEL_MIN_TOKENS
    gate, up = (make_weight(Q.Q4_K, (4, 256, 512), s) for s in (1, 2))
    down = make_weight(Q.Q6_K, (4, 512, 256), 3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 512), dtype=np.float32)
    ids = np.stack([rng.permutation(4)[:2] for _ in range(40)])
    weights = rng.random(ids.shape, dtype=np.float32)
    args = (Q.Q4_K, gate, Q.Q4_K, up, Q.Q6_K, down, x, ids, weights)
    np.testing.assert_array_equal(kernels.moe_forward(*args, acts=ACT_AUTO), kernels.moe_forward(*args, acts=AUTO_PANELS))
