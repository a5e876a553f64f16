"""Every family with dimensions the kernels' 32-value vectors do not divide (hidden 80,
head_dim 20, intermediate 136, vocab 200, expert width 72), and with a mix where some
modules fit and some do not, against transformers: from safetensors and from GGUF, under
the family's CPU rule file, prefill and decode steps. Operators that cannot take a shape
decline it at planning time and torch runs the module (`Operator.refusal`); the plan
names every such module and why."""

import pytest
import torch

import hybrid
from hybrid.writers.convert import write_gguf
from hybrid.inject.loader import build
from hybrid.operators import CPUDecoderLayer, CPULinear
from hybrid.inject.plan import format_plan, summarize

from .tiny import TINY, make_tiny, mean_kl, reference_logits, rel_err

pytestmark = pytest.mark.usefixtures("cpu_machine")  # rules=None: the family's CPU file

IDS = [int(i) for i in torch.randint(0, 200, (23,), generator=torch.Generator().manual_seed(2))]
DECODE_STEPS = 3

_MLA_ODD = {"num_key_value_heads": 4, "qk_nope_head_dim": 20, "qk_rope_head_dim": 12, "v_head_dim": 20, "kv_lora_rank": 36, "moe_intermediate_size": 72}
# Nothing divides by 32: every kernel operator declines, torch runs the whole model.
ODD = {"vocab_size": 200, "hidden_size": 80, "intermediate_size": 136, "num_attention_heads": 4, "num_key_value_heads": 2}
ODD_FAMILY = {
    "qwen3": {"head_dim": 20},
    "mixtral": {"intermediate_size": 72},
    "qwen2_moe": {"moe_intermediate_size": 72, "shared_expert_intermediate_size": 136},
    "qwen3_moe": {"head_dim": 20, "moe_intermediate_size": 72},
    "deepseek_v2": _MLA_ODD,
    "deepseek_v3": {**_MLA_ODD, "q_lora_rank": 40},
    "qwen3_5_moe": {"head_dim": 20, "linear_key_head_dim": 20, "linear_value_head_dim": 20,
                    "moe_intermediate_size": 72, "shared_expert_intermediate_size": 136},
}
# Hidden size and heads fit, the feed-forward widths do not: kernels and torch side by side.
MIXED = {"vocab_size": 200, "hidden_size": 64, "intermediate_size": 136}
MIXED_FAMILY = {
    "qwen3": {"head_dim": 16},
    "mixtral": {"intermediate_size": 72},
    "qwen2_moe": {"moe_intermediate_size": 72, "shared_expert_intermediate_size": 136},
    "qwen3_moe": {"head_dim": 16, "moe_intermediate_size": 72},
    "deepseek_v2": {"moe_intermediate_size": 72},
    "deepseek_v3": {"moe_intermediate_size": 72},
    "qwen3_5_moe": {"head_dim": 16, "moe_intermediate_size": 72, "shared_expert_intermediate_size": 136},
}
SHAPES = {"odd": (ODD, ODD_FAMILY), "mixed": (MIXED, MIXED_FAMILY)}


@pytest.fixture(scope="module", params=[(n, s) for s in SHAPES for n in sorted(TINY)], ids=lambda p: f"{p[0]}-{p[1]}")
def odd_model(request, tmp_path_factory):
    name, shape = request.param
    common, per_family = SHAPES[shape]
    directory = tmp_path_factory.mktemp(f"{name}-{shape}")
    model = make_tiny(name, directory, **{**common, **per_family.get(name, {})})
    return name, shape, directory, reference_logits(model, IDS)


def prefill_and_decode(model) -> torch.Tensor:
    """Logits of IDS: a prefill of all but the last DECODE_STEPS tokens, then one decode
    step per token (the decode kernels' path where an operator took the module)."""
    cache = model.new_cache(1, len(IDS))
    n = len(IDS) - DECODE_STEPS
    out = [model.forward(torch.tensor([IDS[:n]]), [0], [0], cache)[0]]
    for pos in range(n, len(IDS)):
        out.append(model.forward(torch.tensor([[IDS[pos]]]), [pos], [0], cache)[0])
    return torch.cat(out).float().cpu()


def test_safetensors_loads_and_matches_transformers(odd_model):
    name, shape, directory, ref = odd_model
    model = hybrid.load(directory)
    assert rel_err(model.logits(IDS, chunk=8), ref) < 1e-4
    assert rel_err(prefill_and_decode(model), ref) < 1e-4
    for p in model.placements:  # a linear kept on the kernels has a width they take
        if p.operator is not None and p.operator.__name__ == "CPULinear":
            assert model.module.get_submodule(p.path).in_features % 32 == 0, p.path
    if name in {"gemma3_text", "glm4_moe", "gpt_oss"}:
        return  # their CPU rule files keep attention (gpt-oss: the experts too) in torch
    assert [p for p in model.placements if p.fallback], "every shape here has a width the kernels cannot take"
    kernels = {p.operator.__name__ for p in model.placements if p.operator is not None and not p.keeps_children}
    if shape == "odd":  # only the norms (1-D weights) stay on their operator
        assert kernels <= {"CPURMSNorm"}
    else:
        assert "CPULinear" in kernels


def test_gguf_f32_loads_and_matches_transformers(odd_model, tmp_path):
    name, shape, directory, ref = odd_model
    model = hybrid.load(write_gguf(directory, tmp_path / "m.gguf", "F32"))
    assert rel_err(prefill_and_decode(model), ref) < 1e-4


def test_gguf_q8_0_mixes_blocks_and_float_rows(odd_model, tmp_path):
    """Widths that are whole blocks are quantized, the rest stay F32 (as llama.cpp does)."""
    name, shape, directory, ref = odd_model
    model = hybrid.load(write_gguf(directory, tmp_path / "m.gguf", "Q8_0"))
    logits = prefill_and_decode(model)
    assert mean_kl(logits, ref) < 1e-3


def test_mixed_shapes_keep_the_kernels_where_they_fit(tmp_path):
    """Hidden 64 fits, intermediate 136 does not: the decoder layer and down_proj decline,
    q/k/v/o, gate and up stay on CPULinear; the plan says which and why."""
    make_tiny("llama", tmp_path, **MIXED)
    config, module, placements, counts, refs, ruleset, src, meta = build(tmp_path)
    ops = {p.path: p for p in placements}
    assert ops["model.layers.0"].operator is None
    assert "CPUDecoderLayer" in ops["model.layers.0"].fallback[0]
    assert "mlp.down_proj.weight" in ops["model.layers.0"].fallback[0]
    assert ops["model.layers.0.mlp.down_proj"].operator is None
    assert "136 columns" in ops["model.layers.0.mlp.down_proj"].fallback[0]
    for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert ops[f"model.layers.0.{proj}"].operator is CPULinear
    text = format_plan(summarize(placements, counts, refs, ruleset))
    assert "model.layers.1.mlp.down_proj -> torch on cpu" in text
    assert "the kernels need a multiple of 32" in text


def test_fitting_shapes_decline_nothing(tmp_path):
    make_tiny("llama", tmp_path)
    placements = build(tmp_path)[2]
    assert not [p.path for p in placements if p.fallback]
    assert next(p for p in placements if p.path == "model.layers.0").operator is CPUDecoderLayer


def test_quant_rule_on_widths_that_are_not_whole_blocks_falls_back(tmp_path):
    """`quant: q8_0` on a float checkpoint whose down_proj is 136 wide: that one module
    declines (Q8_0 blocks are 32 wide), the rest are quantized."""
    make_tiny("llama", tmp_path, **MIXED)
    rules = "rules:\n  - match: {class: Linear}\n    replace: {class: CPULinear, kwargs: {quant: q8_0}}\n"
    model = hybrid.load(tmp_path, rules=rules)
    declined = [p.path for p in model.placements if p.fallback]
    assert declined == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "F32 as Q8_0" in model.placements[[p.path for p in model.placements].index(declined[0])].fallback[0]
    gate = model.module.get_submodule("model.layers.0.mlp.gate_proj")
    assert isinstance(gate, CPULinear) and gate.qtype.name == "Q8_0"
