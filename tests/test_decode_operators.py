"""The one-call-per-layer decode operators (CPUAttention, CPUMLP, CPURMSNorm) against the
torch modules they replace: several sequences at different lengths decoded in one batch,
a float16 KV cache, NaN propagation."""

import pytest
import torch
from torch import nn

import hybrid
from hybrid.models.common import MLP, RMSNorm, Step
from hybrid.rules import RuleError, parse_rules
from operators import CPUAttention, CPUMLP, CPURMSNorm

from .tiny import make_tiny, rel_err

# Llama-family attention: plain, q/k/v bias (qwen2), q/k norm (qwen3), in dense and MoE models.
FAMILIES = ["llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]
LENGTHS = [3, 29, 11]  # prompt lengths of the sequences decoded together


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_tiny(request.param, directory)
    return directory


def decode_logits(model, steps: int = 3) -> list[torch.Tensor]:
    """Prefill LENGTHS into slots 0..2 (slot order shuffled against the batch order), then
    decode `steps` batched steps and one step of sequence 1 alone; logits of every decode call."""
    g = torch.Generator().manual_seed(0)
    slots = [2, 0, 1]
    cache = model.new_cache(3, 64)
    for slot, n in zip(slots, LENGTHS):
        model.forward(torch.randint(0, 256, (1, n), generator=g), [0], [slot], cache)
    out, tokens = [], torch.randint(0, 256, (3, 1), generator=g)
    for i in range(steps):
        out.append(model.forward(tokens, [n + i for n in LENGTHS], slots, cache))
        tokens = out[-1][:, -1].argmax(-1, keepdim=True)
    out.append(model.forward(tokens[1:2], [LENGTHS[1] + steps], slots[1:2], cache))
    return out


def test_default_cpu_rules_use_the_decode_operators(tiny_dir):
    model = hybrid.load(tiny_dir)
    ops = {type(p.module) for p in model.placements}
    assert {CPUAttention, CPURMSNorm} <= ops


def test_batched_decode_matches_torch(tiny_dir):
    ref = decode_logits(hybrid.load(tiny_dir, rules="torch-cpu"))
    got = decode_logits(hybrid.load(tiny_dir))
    for r, g in zip(ref, got):
        assert rel_err(g, r) < 1e-4


def test_float16_kv_cache_is_close(tiny_dir):
    rules = parse_rules(
        "rules:\n"
        "  - match: {class: Attention}\n"
        "    replace: {class: CPUAttention, kwargs: {kv_dtype: float16}}\n"
        "  - match: {class: Linear}\n"
        "    replace: {class: CPULinear}\n"
    )
    model = hybrid.load(tiny_dir, rules=rules)
    assert model.new_cache(1, 8)[0].k.dtype == torch.float16
    ref = decode_logits(hybrid.load(tiny_dir, rules="torch-cpu"))
    for r, g in zip(ref, decode_logits(model)):
        assert rel_err(g, r) < 5e-3  # float16 keeps 11 bits: about 5e-4 per key and value


def test_nan_in_one_sequence_stays_in_it(tmp_path):
    make_tiny("qwen3", tmp_path)
    model = hybrid.load(tmp_path)
    attn = model.module.model.layers[0].self_attn
    cache = model.new_cache(2, 16)
    x = torch.randn(2, 5, 64)
    step = Step.make([0, 1], [0, 0], 5, "cpu")
    with torch.inference_mode():
        attn(x, model.module.rotary(step.positions), step, cache[0])  # prefill both
    x = torch.randn(2, 1, 64)
    x[0, 0, 7] = float("nan")
    step = Step.make([0, 1], [5, 5], 1, "cpu")
    with torch.inference_mode():
        y = attn(x, model.module.rotary(step.positions), step, cache[0])
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


def test_cache_overflow_is_an_error(tmp_path):
    make_tiny("llama", tmp_path)
    model = hybrid.load(tmp_path)
    cache = model.new_cache(1, 4)
    model.forward(torch.zeros(1, 4, dtype=torch.long), [0], [0], cache)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        model.forward(torch.zeros(1, 1, dtype=torch.long), [4], [0], cache)


class _Holder(nn.Module):
    def __init__(self, **modules):
        super().__init__()
        for name, m in modules.items():
            self.add_module(name, m)


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_mlp_and_norm_match_the_modules(tokens):
    torch.manual_seed(0)
    mlp, norm = MLP(64, 96), RMSNorm(64, 1e-5)
    with torch.no_grad():
        for p in [*mlp.parameters(), *norm.parameters()]:
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, tokens, 64)
    with torch.no_grad():
        ref_mlp, ref_norm = mlp(x), norm(x)
    holder = _Holder(mlp=mlp, norm=norm)
    hybrid.inject(holder, [
        {"match": {"class": "MLP"}, "replace": {"class": "CPUMLP"}},
        {"match": {"class": "RMSNorm"}, "replace": {"class": "CPURMSNorm"}},
    ])
    assert isinstance(holder.mlp, CPUMLP) and isinstance(holder.norm, CPURMSNorm)
    assert rel_err(holder.mlp(x), ref_mlp) < 1e-5
    assert rel_err(holder.norm(x), ref_norm) < 1e-6
    x[0, 0, 3] = float("nan")
    assert torch.isnan(holder.mlp(x)[0, 0]).all() and torch.isfinite(holder.mlp(x)[1]).all()
    assert torch.isnan(holder.norm(x)[0, 0]).all() and torch.isfinite(holder.norm(x)[0, 1:]).all()


def test_kv_dtype_is_validated():
    with pytest.raises(RuleError, match="kv_dtype 'int4'"):
        parse_rules(
            "rules:\n  - match: {class: Attention}\n    replace: {class: CPUAttention, kwargs: {kv_dtype: int4}}\n"
        )
