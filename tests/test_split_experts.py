"""SplitExperts: one layer's experts split between torch on `device` and the CPU kernels,
outputs summed, against the unsplit layer. Here both shares are on the CPU (device: cpu);
the CUDA run of the same check is in tests/test_gpu.py."""

import pytest
import torch

import hybrid
from hybrid.inject.loader import describe
from hybrid.inject.placement import RuleError, parse_rules
from hybrid.models.common import Experts
from hybrid.operators import CPUExperts, SplitExperts
from hybrid.writers.synthetic import write_moe_gguf

from .tiny import rel_err

E, H, I, K = 8, 256, 128, 2
PREFIX = "model.layers.1.block_sparse_moe.experts."


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "moe.gguf"
    return write_moe_gguf(path, layers=2, hidden=H, experts=E, expert_width=I, top_k=K, heads=4, kv_heads=2,
                          qtype="Q4_K", vocab_size=512, context=256)


@pytest.fixture(scope="module")
def refs(moe_gguf):
    return describe(moe_gguf)[2]


def routing(N: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    weights = torch.rand(N, K, generator=g)
    return x, ids, weights / weights.sum(-1, keepdim=True)


def built(op, refs, **kwargs):
    with torch.device("meta"):
        original = Experts(E, H, I)
    m = op(original, None, **kwargs)
    m.load(lambda n: refs[PREFIX + n])
    return m


@pytest.mark.parametrize("experts", [3, [1, 5, 6], 7])
@pytest.mark.parametrize("N", [1, 5, 64])
def test_split_equals_unsplit_on_two_cpu_halves(refs, experts, N):
    """float activations: both paths dequantize exactly, so the sums agree to float32
    rounding (rel 1e-5); the default int16 activations round x in the CPU share only (rel 1e-3)."""
    x, ids, weights = routing(N)
    whole = built(CPUExperts, refs, activations="float")(x, ids, weights)
    split = built(SplitExperts, refs, experts=experts, device="cpu", dtype="float32", activations="float")
    assert rel_err(split(x, ids, weights), whole) < 1e-5
    int16 = built(SplitExperts, refs, experts=experts, device="cpu", dtype="float32")(x, ids, weights)
    assert rel_err(int16, whole) < 1e-3
    reference = Experts(E, H, I)  # the torch module it replaces, on the dequantized weights
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(reference, name).copy_(refs[PREFIX + name].tensor(torch.float32))
        assert rel_err(split(x, ids, weights), reference(x, ids, weights)) < 1e-5


def test_each_share_computes_only_its_experts(refs):
    """Routed only to the torch share's experts, the CPU share adds nothing, and the other way
    round; skipped slots (-1) are skipped by both."""
    split = built(SplitExperts, refs, experts=[0, 1, 2], device="cpu", dtype="float32", activations="float")
    whole = built(CPUExperts, refs, activations="float")
    x, _, weights = routing(4)
    for ids in (torch.tensor([[0, 2], [1, 0], [2, 1], [0, -1]]), torch.tensor([[3, 7], [4, 5], [6, -1], [5, 3]])):
        assert rel_err(split(x, ids, weights), whole(x, ids, weights)) < 1e-5
    assert split.torch_ids == [0, 1, 2] and split.cpu_ids == [3, 4, 5, 6, 7]
    assert split.gate_proj.shape == (3, I, H) and split.cpu_gate[1].shape[0] == 5
    assert split.cpu_gate[1].base is not None  # one run of experts: a view of the mapped blocks, no copy


def test_cpu_share_prefill_on_another_device(refs):
    """prefill_device streams the CPU share's experts to that device for long calls (here the
    CPU itself: the path a GPU takes)."""
    split = built(SplitExperts, refs, experts=4, device="cpu", dtype="float32", prefill_device="cpu", prefill_min_tokens=8)
    x, ids, weights = routing(16)
    assert split.prefill.wants(16)
    assert rel_err(split(x, ids, weights), built(CPUExperts, refs, activations="float")(x, ids, weights)) < 1e-5


@pytest.mark.parametrize("kwargs, message", [
    ("{device: cpu}", "SplitExperts needs `experts`"),
    ("{experts: 2.5}", "experts must be a count or a list of expert ids"),
    ("{experts: 2, dtype: float8}", "dtype 'float8'"),
    ("{experts: 2, prefill_min_tokens: 0}", "prefill_min_tokens must be a positive integer"),
])
def test_bad_kwargs_name_the_rule(kwargs, message):
    with pytest.raises(RuleError) as e:
        parse_rules(f"rules:\n  - match: {{name: a}}\n    replace: {{class: SplitExperts, kwargs: {kwargs}}}\n")
    assert message in str(e.value) and "rule 1 (line 2)" in str(e.value)


@pytest.mark.parametrize("experts", [0, 8, [3, 8]])
def test_experts_out_of_range_for_the_layer(moe_gguf, experts):
    rules = ("rules:\n  - match: {name: 'model\\.layers\\.1\\.block_sparse_moe\\.experts'}\n"
             f"    replace: {{class: SplitExperts, kwargs: {{device: cpu, experts: {experts}}}}}\n")
    with pytest.raises(RuleError, match=r"rule 1 \(line 2\): model.layers.1.block_sparse_moe.experts: experts .*between 1 and 7"):
        hybrid.load(moe_gguf, rules=rules)


SPLIT_RULES = """
rules:
  - match: {name: 'model\\.layers\\.1\\.block_sparse_moe\\.experts'}
    replace: {class: SplitExperts, kwargs: {device: cpu, dtype: float32, experts: 5, activations: float}}
  - match: {name: 'model\\.layers\\.\\d+\\.block_sparse_moe\\.experts'}
    replace: {class: CPUExperts, kwargs: {activations: float}}
"""
UNSPLIT_RULES = """
rules:
  - match: {name: 'model\\.layers\\.\\d+\\.block_sparse_moe\\.experts'}
    replace: {class: CPUExperts, kwargs: {activations: float}}
"""


def test_a_model_with_a_split_layer_gives_the_same_logits(moe_gguf):
    ids = list(range(3, 23))
    want = hybrid.load(moe_gguf, rules=UNSPLIT_RULES)
    got = hybrid.load(moe_gguf, rules=SPLIT_RULES)
    assert isinstance(got.module.model.layers[1].block_sparse_moe.experts, SplitExperts)
    assert isinstance(want.module.model.layers[1].block_sparse_moe.experts, CPUExperts)
    assert rel_err(got.logits(ids), want.logits(ids)) < 1e-5


def test_cpu_share_runs_from_the_worker_thread(refs):
    """With the torch share on a GPU, the CPU share runs in `_cpu_worker` while the caller
    launches the GPU work: the kernels give the same result from that thread."""
    from hybrid.operators import split as split_module

    split = built(SplitExperts, refs, experts=2, device="cpu", dtype="float32")
    x, ids, weights = routing(3)
    cpu_ids = split.cpu_index[ids]
    here = split._cpu_share(x, cpu_ids, weights)
    there = split_module._cpu_worker.submit(split._cpu_share, x, cpu_ids, weights).result()
    assert torch.equal(here, there) and here.abs().max() > 0
