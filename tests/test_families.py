"""Every family against transformers: tiny random models loaded from safetensors and
from GGUF (F32 and Q8_0), under the plain torch rules and the family's CPU rule file."""

import pytest
import torch

import hybrid
from hybrid.writers.convert import write_gguf

from .tiny import TINY, make_tiny, mean_kl, reference_logits, rel_err

pytestmark = pytest.mark.usefixtures("cpu_machine")  # rules=None: the family's CPU file

IDS = [int(i) for i in torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(1))]


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = make_tiny(request.param, directory)
    return request.param, directory, reference_logits(model, IDS)


@pytest.mark.parametrize("rules", ["torch-cpu", None])
def test_safetensors_logits_match_transformers(tiny, rules):
    name, directory, ref = tiny
    model = hybrid.load(directory, rules=rules)
    assert rel_err(model.logits(IDS, chunk=16), ref) < 1e-4


def test_gguf_f32_matches_transformers(tiny, tmp_path):
    name, directory, ref = tiny
    path = write_gguf(directory, tmp_path / "m.gguf", "F32")
    model = hybrid.load(path, rules="torch-cpu")
    assert rel_err(model.logits(IDS), ref) < 1e-4


@pytest.mark.parametrize("rules", ["torch-cpu", None])
def test_gguf_q8_0_keeps_argmax_and_low_kl(tiny, tmp_path, rules):
    name, directory, ref = tiny
    path = write_gguf(directory, tmp_path / "m.gguf", "Q8_0")
    logits = hybrid.load(path, rules=rules).logits(IDS)
    # Random tiny models have near-ties that any 8-bit rounding may flip; every position
    # where the reference is decisive (top-2 margin >= 1% of the largest logit) must agree.
    top2 = ref.topk(2, -1).values
    decisive = (top2[:, 0] - top2[:, 1]) >= 0.01 * ref.abs().max()
    assert decisive.sum() >= len(IDS) // 2
    assert torch.equal(logits.argmax(-1)[decisive], ref.argmax(-1)[decisive])
    assert mean_kl(logits, ref) < 1e-3


def test_deepseek_gguf_with_split_kv_b_matches_transformers(tmp_path_factory):
    """Newer llama.cpp DeepSeek files store kv_b_proj as attn_k_b (transposed) + attn_v_b."""
    for name in ("deepseek_v2", "deepseek_v3"):
        directory = tmp_path_factory.mktemp(name)
        ref = reference_logits(make_tiny(name, directory), IDS)
        path = write_gguf(directory, directory / "split.gguf", "F32", split_kv_b=True)
        assert rel_err(hybrid.load(path, rules="torch-cpu").logits(IDS), ref) < 1e-4
