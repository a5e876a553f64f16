"""Batched kernels (hybrid/operators/kernels/batch.py and the fused MoE over it) against gguf's
dequantize, and the engine's batched prefill."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from hybrid.engine.scheduler import prefill_groups
from hybrid.operators import kernels
from hybrid.operators.kernels import activations, batch, formats, moe, policy
from hybrid.operators.kernels.formats import as_blocks
from hybrid.operators.kernels.intrinsics import HAS_VNNI

from .test_kernels import FORMATS, MOE_TYPES, assert_close, cols_for, make_weight, on_panels, reference, run_moe, seen


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_decode_row_matches_gguf(qtype):
    w = make_weight(qtype, (3, cols_for(qtype, 5)))
    t, wb, cols = as_blocks(qtype, w)
    ref = reference(qtype, w).astype(np.float32)
    for r in range(3):
        out = np.full(cols, np.nan, np.float32)
        batch.decode_row(t, wb[r], out)
        np.testing.assert_array_equal(out, ref[r])


@pytest.mark.parametrize("tokens", [2, 3, 5, 8, 13, 16])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_small_batch_matches_gguf(qtype, tokens):
    """Through `matmul`'s dispatch: 37 rows (a short last group of 4) over 2 threads' chunks."""
    w = make_weight(qtype, (37, cols_for(qtype, 3)))
    x = np.random.default_rng(tokens).standard_normal((tokens, cols_for(qtype, 3)), dtype=np.float32)
    # with VNNI, up to GEMM_TOKENS tokens of MULTI_TYPES take the integer rows (x rounded),
    # the other formats on the integer path a GEMV per token (rounded), more tokens the
    # integer panels where they take the format (rounded too)
    panel = on_panels(qtype, x.shape[1], tokens)
    few = tokens <= policy.GEMM_TOKENS and int(qtype) in formats.MULTI_TYPES
    each = tokens <= policy.GEMV_EACH_TOKENS and int(qtype) in formats.INT_TYPES  # a GEMV per token
    rounded = few or each or panel
    assert_close(kernels.matmul(qtype, w, x), (seen(qtype, x, panel) if rounded else x) @ reference(qtype, w).T)


@pytest.mark.parametrize("rows,chunks", [(1, 1), (2, 2), (5, 3), (9, 2)])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q6_K, Q.BF16], ids=lambda t: t.name)
def test_small_batch_odd_shapes(qtype, rows, chunks):
    """Fewer rows than a tile, chunks that end inside a tile; one block per row."""
    cols = cols_for(qtype, 1)
    w = make_weight(qtype, (rows, cols))
    t, wb, _ = as_blocks(qtype, w)
    x = np.random.default_rng(rows).standard_normal((3, cols), dtype=np.float32)
    y = np.full((3, rows), np.nan, np.float32)
    batch.matmul_small(t, wb, x, y, chunks)
    assert_close(y, x @ reference(qtype, w).T)


def test_token_blocks():
    """More tokens than one L2 block of x (4096 columns: 32 tokens a block on the tiles, 64
    on the panels)."""
    w = make_weight(Q.Q4_0, (9, 4096))
    x = np.random.default_rng(6).standard_normal((70, 4096), dtype=np.float32)
    assert_close(kernels.matmul(Q.Q4_0, w, x), (seen(Q.Q4_0, x) if on_panels(Q.Q4_0, 4096, 70) else x) @ reference(Q.Q4_0, w).T)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q4_1], ids=lambda t: t.name)
def test_rows_do_not_depend_on_the_batch(qtype):
    """A token's outputs are bitwise the same whatever else is in a batch on the same path
    (2..GEMM_TOKENS tokens: tiles, gemm_rows or GEMVs; PANEL_MIN_TOKENS or more: panels where they
    take the format, else tiles), so a request batched with others computes what it
    computes with any other company of that size."""
    w = make_weight(qtype, (21, 512))
    x = np.random.default_rng(7).standard_normal((30, 512), dtype=np.float32)
    small = kernels.matmul(qtype, w, x[:policy.GEMM_TOKENS])
    np.testing.assert_array_equal(kernels.matmul(qtype, w, x[[4, 1, 7]]), small[[4, 1, 7]])
    np.testing.assert_array_equal(kernels.matmul(qtype, w, x[[2, 2]]), small[[2, 2]])
    full = kernels.matmul(qtype, w, x)
    pick = [29, 3, 3, 17, 0, 8, 12, 21, 5, 9, 1]
    np.testing.assert_array_equal(kernels.matmul(qtype, w, x[pick]), full[pick])
    np.testing.assert_array_equal(kernels.matmul(qtype, w, x[10:10 + policy.PANEL_MIN_TOKENS]),
                                  full[10:10 + policy.PANEL_MIN_TOKENS])


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.MXFP4, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_gemv_per_token_over_slices(qtype):
    """2..GEMV_EACH_TOKENS tokens of a format with an integer row path but no `gemm_rows`
    (Q4_K and Q6_K; without VNNI also Q8_0, Q4_0, MXFP4) take a GEMV per token over slices
    of rows: each token gets bitwise its GEMV alone, over rows that span several slices
    and end inside one, and within tolerance of gguf's dequantization."""
    if int(qtype) in formats.MULTI_TYPES or int(qtype) not in formats.INT_TYPES:
        pytest.skip(f"{qtype.name} takes gemm_rows or no integer rows on this CPU")
    cols = 2048
    rows = policy.GEMV_SLICE_BYTES // as_blocks(qtype, make_weight(qtype, (1, cols)))[1].shape[1] * 2 + 37
    w = make_weight(qtype, (rows, cols))
    x = np.random.default_rng(21).standard_normal((policy.GEMV_EACH_TOKENS, cols), dtype=np.float32)
    alone = np.stack([kernels.gemv(qtype, w, v) for v in x])
    for pick in ([0, 1], [5, 2, 2], list(range(policy.GEMV_EACH_TOKENS))):
        np.testing.assert_array_equal(kernels.matmul(qtype, w, x[pick]), alone[pick])
    assert_close(alone, seen(qtype, x, False) @ reference(qtype, w).T)


@pytest.mark.parametrize("acts", ["int16", "int8"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_integer_rows_are_the_gemv_in_any_company(qtype, acts):
    """On the int8 path (any CPU), and on the int16 one with VNNI, a batch of up to
    GEMM_TOKENS tokens (a batched decode step) gives each token bitwise what its GEMV alone
    gives, for a matmul and for the fused MoE: a request decodes the same whatever other
    requests share its steps."""
    if acts == "int16" and not HAS_VNNI:
        pytest.skip("this CPU has no VNNI")
    a = activations.ACTIVATIONS[acts]
    w = make_weight(qtype, (37, 224))
    x = np.random.default_rng(11).standard_normal((policy.GEMM_TOKENS, 224), dtype=np.float32)
    alone = np.stack([kernels.gemv(qtype, w, v, acts=a) for v in x])
    for pick in ([0, 1], [5, 2, 2], [3, 0, 6, 1, 4], list(range(policy.GEMM_TOKENS))):
        np.testing.assert_array_equal(kernels.matmul(qtype, w, x[pick], acts=a), alone[pick])
    gate, up = (make_weight(qtype, (3, 64, 224), seed) for seed in (1, 2))
    down = make_weight(qtype, (3, 224, 64), 3)
    ids = np.random.default_rng(12).integers(0, 3, (policy.GEMM_TOKENS, 2))
    ids[:, 1] = (ids[:, 0] + 1) % 3  # two different experts per token: 2-8 tokens an expert
    weights = np.random.default_rng(13).random(ids.shape, dtype=np.float32)
    batched = kernels.moe_forward(qtype, gate, qtype, up, qtype, down, x, ids, weights, acts=a)
    for n in range(policy.GEMM_TOKENS):
        one = kernels.moe_forward(qtype, gate, qtype, up, qtype, down, x[n:n + 1], ids[n:n + 1], weights[n:n + 1], acts=a)
        np.testing.assert_array_equal(batched[n], one[0])


@pytest.mark.parametrize("qtype,cols,tokens", [(Q.Q8_0, 64, 5), (Q.Q4_K, 512, 12)], ids=["small", "panels"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_small_batch_nan_inf(bad, qtype, cols, tokens):
    """A bad activation spoils its own token only; a bad weight scale its own row only (a
    few tokens, and enough for the integer panels where the CPU has them)."""
    w = make_weight(qtype, (6, cols))
    x = np.random.default_rng(8).standard_normal((tokens, cols), dtype=np.float32)
    x[3, 40] = bad
    y = kernels.matmul(qtype, w, x)
    assert not np.isfinite(y[3]).any() and np.isfinite(np.delete(y, 3, 0)).all()
    w[4, :2] = np.array([bad], np.float16).view(np.uint8)  # fp16 scale of row 4's first block
    x[3, 40] = 0
    y = kernels.matmul(qtype, w, x)
    assert not np.isfinite(y[:, 4]).any() and np.isfinite(np.delete(y, 4, 1)).all()


@pytest.mark.parametrize("tokens", [2, 8, 16, 40])
@pytest.mark.parametrize("types", MOE_TYPES, ids=lambda ts: "-".join(t.name for t in ts))
def test_fused_moe_shared_experts(types, tokens):
    """Few experts for many tokens: every expert has several tokens (the tile path),
    an odd number of them included."""
    y, ref, _ = run_moe(types, experts=3, top_k=2, tokens=tokens, hidden=256, inter=256)
    assert_close(y, ref)


def test_moe_by_expert_path(monkeypatch):
    """Inputs above MOE_FUSED_MAX_TOKENS go expert by expert through BLAS."""
    monkeypatch.setattr(policy, "MOE_FUSED_MAX_TOKENS", 16)
    calls = []
    by_expert = moe._moe_by_expert
    monkeypatch.setattr(moe, "_moe_by_expert", lambda *a: calls.append(1) or by_expert(*a))
    y, ref, _ = run_moe(MOE_TYPES[0], experts=8, top_k=3, tokens=40)
    assert calls == [1]  # the threshold is read at each call
    assert_close(y, ref)


def test_matmul_blas_path(monkeypatch):
    """Inputs above TILE_MAX_TOKENS tokens go through dequantized tiles and BLAS."""
    monkeypatch.setattr(policy, "TILE_MAX_TOKENS", 16)
    calls = []
    blas = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda *a, **k: calls.append(1) or blas(*a, **k))
    w = make_weight(Q.Q4_K, (37, 512))
    x = np.random.default_rng(9).standard_normal((40, 512), dtype=np.float32)
    assert_close(kernels.matmul(Q.Q4_K, w, x), x @ reference(Q.Q4_K, w).T)
    assert calls  # the threshold is read at each call


def test_prefill_groups():
    def seq(n_prompt, prefilled=0):
        return SimpleNamespace(prompt=[0] * n_prompt, prefilled=prefilled)

    short = [seq(n) for n in (38, 40, 36, 39)]
    assert prefill_groups(short, 512, 1024) == [[short[1], short[3], short[0], short[2]]]
    # a 10-token chunk is not padded to 400; at most `chunk` padded tokens in one forward
    long_, tiny = seq(400), seq(10)
    assert prefill_groups([tiny, long_], 512, 1024) == [[long_], [tiny]]
    many = [seq(300) for _ in range(3)]
    assert [len(g) for g in prefill_groups(many, 512, 1024)] == [1, 1, 1]
    # a chunk padded past the context is left for a forward of its own
    late, early = seq(100, prefilled=80), seq(30)
    assert prefill_groups([late, early], 512, 100) == [[early], [late]]
    assert prefill_groups([], 512, 100) == []
