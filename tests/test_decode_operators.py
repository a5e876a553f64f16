"""The one-call-per-layer decode operators (CPUAttention, CPUMLP, CPURMSNorm) against the
torch modules they replace: several sequences at different lengths decoded in one batch,
a float16 KV cache, NaN propagation."""

import copy
from pathlib import Path
from types import SimpleNamespace

import numba
import numpy as np
import pytest
import torch
import yaml
from gguf import GGMLQuantizationType as Q
from torch import nn

import hybrid
from hybrid.cli.measure import decode_bytes_per_token
from hybrid.models import gpt_oss
from hybrid.models.common import MLP, Attention, KVCache, Layers, RMSNorm, Rotary, SlidingKVCache, Step
from hybrid.inject.placement import RuleError, parse_rules
from hybrid.operators import CPUAttention, CPUDecoderLayer, CPUMLP, CPURMSNorm
from hybrid.operators.kernels import decode
from hybrid.operators.kernels import layer as layer_kernels
from hybrid.operators.layer import CPUDecoderStack
from hybrid.operators.kernels.activations import ACT_INT16
from hybrid.operators.kernels.formats import as_blocks
from hybrid.operators.kernels.linear import dequantize
from hybrid.operators.kernels.records import MlpWeights, plain

from .test_kernels import make_weight
from .tiny import make_tiny, rel_err

# Llama-family attention: plain, q/k/v bias (qwen2), q/k norm (qwen3), in dense and MoE models.
FAMILIES = ["llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]
LENGTHS = [3, 29, 11]  # prompt lengths of the sequences decoded together

# hybrid.load without rules must pick the family's CPU file, also on a machine with CUDA.
pytestmark = pytest.mark.usefixtures("cpu_machine")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_tiny(request.param, directory)
    return directory


def decode_logits(model, steps: int = 3, follow: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Prefill LENGTHS into slots 0..2 (slot order shuffled against the batch order), then
    decode `steps` batched steps and one step of sequence 1 alone; logits of every decode call.
    Each step feeds the argmax of the last one's logits, or of `follow`'s (another model's
    decode_logits) so that a less exact model gets the same tokens as its reference."""
    g = torch.Generator().manual_seed(0)
    slots = [2, 0, 1]
    cache = model.new_cache(3, 64)
    for slot, n in zip(slots, LENGTHS):
        model.forward(torch.randint(0, 256, (1, n), generator=g), [0], [slot], cache)
    out, tokens = [], torch.randint(0, 256, (3, 1), generator=g)
    for i in range(steps):
        out.append(model.forward(tokens, [n + i for n in LENGTHS], slots, cache))
        tokens = (out if follow is None else follow)[i][:, -1].argmax(-1, keepdim=True).cpu()
    out.append(model.forward(tokens[1:2], [LENGTHS[1] + steps], slots[1:2], cache))
    return out


def test_default_cpu_rules_use_the_decode_operators(tiny_dir):
    model = hybrid.load(tiny_dir)
    assert {CPUAttention, CPURMSNorm} <= {type(m) for m in model.module.modules()}
    assert all(isinstance(layer, CPUDecoderLayer) for layer in model.module.model.layers)


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


# (heads, kv heads, head_dim, cache dtype): a group of 3 (padded to 4 in the kernel), a group
# of 6 (two passes), no grouping, head sizes with and without a specialized copy.
@pytest.mark.parametrize("H, Hkv, D, dtype", [
    (9, 3, 64, torch.float32), (12, 2, 32, torch.float32), (4, 4, 128, torch.float16), (6, 1, 48, torch.float16),
])
def test_long_context_attention_matches_torch(H, Hkv, D, dtype):
    """Contexts of several key blocks, one long enough to be split between threads."""
    torch.manual_seed(0)
    cfg = SimpleNamespace(num_attention_heads=H, num_key_value_heads=Hkv, head_dim=D, hidden_size=96,
                          attention_bias=False, qk_norm=False, rms_norm_eps=1e-6)
    ref = Attention(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    holder = _Holder(attn=copy.deepcopy(ref))
    hybrid.inject(holder, [{"match": {"class": "Attention"}, "replace": {"class": "CPUAttention", "kwargs": {"kv_dtype": str(dtype).removeprefix("torch.")}}}])
    rotary = Rotary({"rope_theta": 10000.0, "rope_type": "default"}, D, 1024)
    lengths, slots = [600, 70], [1, 0]
    caches = [KVCache(2, 640, Hkv, D, D, torch.float32, "cpu"), KVCache(2, 640, Hkv, D, D, dtype, "cpu")]
    with torch.inference_mode():
        for slot, n in zip(slots, lengths):
            x, step = torch.randn(1, n, 96), Step.make([slot], [0], n, "cpu")
            for attn, cache in zip((ref, holder.attn), caches):
                attn(x, rotary(step.positions), step, cache)
        x, step = torch.randn(2, 1, 96), Step.make(slots, lengths, 1, "cpu")
        want, got = (attn(x, rotary(step.positions), step, cache) for attn, cache in zip((ref, holder.attn), caches))
    assert rel_err(got, want) < (1e-4 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("sinks", [False, True], ids=["window", "window+sinks"])
def test_sliding_window_and_sinks_match_torch(sinks):
    """A sliding layer (window 600) on its ring cache (1,112 rows of 1,200 positions): a
    token at position 1,150 sees 551..1,150, rows 551..1,111 then 0..38 (the wrap), split
    between two parts; one at 70 sees all its keys. With gpt-oss's sink logits and biases
    too: the decode kernel against the module's own torch attention."""
    torch.manual_seed(0)
    H, Hkv, D, W = 8, 2, 64, 600
    cfg = SimpleNamespace(num_attention_heads=H, num_key_value_heads=Hkv, head_dim=D, hidden_size=96,
                          attention_bias=sinks, o_bias=sinks, qk_norm=False, rms_norm_eps=1e-6,
                          sliding_window=W, layer_types=["sliding_attention"])
    if sinks:
        ref = gpt_oss.Attention(cfg, 0)
    else:
        ref = Attention(cfg)
        ref.sliding_window = W
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    holder = _Holder(attn=copy.deepcopy(ref))
    hybrid.inject(holder, [{"match": {"class": "Attention"}, "replace": {"class": "CPUAttention"}}])
    assert isinstance(holder.attn, CPUAttention) and holder.attn.sliding_window == W
    rotary = Rotary({"rope_theta": 10000.0, "rope_type": "default"}, D, 2048)
    lengths, slots = [1150, 70], [1, 0]
    caches = [SlidingKVCache(2, 1200, W, Hkv, D, D, torch.float32, "cpu") for _ in range(2)]
    assert caches[0].k.shape[2] == 1112
    with torch.inference_mode():
        for slot, n in zip(slots, lengths):
            x, step = torch.randn(1, n, 96), Step.make([slot], [0], n, "cpu")
            for attn, cache in zip((ref, holder.attn), caches):
                attn(x, rotary(step.positions), step, cache)
        for _ in range(2):
            x, step = torch.randn(2, 1, 96), Step.make(slots, lengths, 1, "cpu")
            want, got = (attn(x, rotary(step.positions), step, cache) for attn, cache in zip((ref, holder.attn), caches))
            assert rel_err(got, want) < 1e-4
            lengths = [n + 1 for n in lengths]


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1"])
def test_quantized_projections_match_their_float_weights(quant):
    """Integer-path formats (int16 activations) and a float-path one, against torch modules
    holding the dequantized weights."""
    torch.manual_seed(0)
    cfg = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256,
                          attention_bias=False, qk_norm=False, rms_norm_eps=1e-6)
    ref = _Holder(attn=Attention(cfg), mlp=MLP(256, 512))
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    holder = copy.deepcopy(ref)
    hybrid.inject(holder, [
        {"match": {"class": "Attention"}, "replace": {"class": "CPUAttention", "kwargs": {"quant": quant}}},
        {"match": {"class": "MLP"}, "replace": {"class": "CPUMLP", "kwargs": {"quant": quant}}},
    ])
    with torch.no_grad():  # the reference gets the weights the kernels read
        for name, module in holder.named_modules():
            if hasattr(module, "prepared"):
                ref.get_submodule(name).weight.copy_(torch.from_numpy(dequantize(module.qtype, module.weight)))
    rotary = Rotary({"rope_theta": 10000.0, "rope_type": "default"}, 64, 64)
    caches = [KVCache(2, 16, 2, 64, 64, torch.float32, "cpu") for _ in range(2)]
    x = torch.randn(2, 1, 256)
    step = Step.make([0, 1], [0, 0], 1, "cpu")
    with torch.inference_mode():
        want, got = ((h.attn(x, rotary(step.positions), step, c), h.mlp(x)) for h, c in zip((ref, holder), caches))
    assert rel_err(got[0], want[0]) < 1e-4
    assert rel_err(got[1], want[1]) < 1e-4


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0])
def test_mlp_step_on_k_quants(qtype):
    """The fused MLP kernel on formats no rule quantizes to (random K-quant blocks)."""
    weights = [make_weight(qtype, shape, seed) for seed, shape in enumerate([(512, 256), (512, 256), (256, 512)])]
    x = np.random.default_rng(0).standard_normal((3, 256), dtype=np.float32)
    (tg, wg), (tu, wu), (td, wd) = (as_blocks(qtype, w)[:2] for w in weights)
    mlp = plain(MlpWeights(tg=tg, wg=wg, tu=tu, wu=wu, td=td, wd=wd, acts=ACT_INT16))
    y = decode.mlp_step(x, mlp, numba.get_num_threads())
    g, u, d = (torch.from_numpy(dequantize(qtype, w)) for w in weights)
    xt = torch.from_numpy(x)
    want = (torch.nn.functional.silu(xt @ g.T) * (xt @ u.T)) @ d.T
    # x and the activations are each rounded to int16 (~2e-5); random K-quant rows (large
    # mins against large sums) cancel more than real ones: measured 1.0e-4 for Q4_K.
    assert rel_err(torch.from_numpy(y), want) < 3e-4


def test_whole_layer_operator_refuses_a_block_it_cannot_run(tmp_path):
    """DeepSeek's attention (MLA) is not one the layer kernel computes: the rule that chose
    the operator is named before any weight is read."""
    make_tiny("deepseek_v2", tmp_path)
    rules = "rules:\n  - match: {class: Block}\n    replace: {class: CPUDecoderLayer}\n"
    with pytest.raises(RuleError, match=r"rule 1 \(line 2\): model\.layers\.0: CPUDecoderLayer takes .*deepseek\.MLA"):
        hybrid.load(tmp_path, rules=rules)


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_whole_layers_read_what_the_modules_read(family, tmp_path):
    """The fused layer against the per-module operators: the same bytes per token (the
    roofline's numerator), and the same logits after a prefill and batched decode steps."""
    make_tiny(family, tmp_path)
    per_module = parse_rules(
        "rules:\n"
        "  - match: {class: Attention}\n    replace: {class: CPUAttention}\n"
        "  - match: {class: MLP}\n    replace: {class: CPUMLP}\n"
        "  - match: {class: Experts}\n    replace: {class: CPUExperts}\n"
        "  - match: {class: RMSNorm}\n    replace: {class: CPURMSNorm}\n"
        "  - match: {class: Linear}\n    replace: {class: CPULinear}\n"
    )
    fused, modules = hybrid.load(tmp_path), hybrid.load(tmp_path, rules=per_module)
    assert all(isinstance(layer, CPUDecoderLayer) for layer in fused.module.model.layers)
    assert decode_bytes_per_token(fused) == decode_bytes_per_token(modules)
    for a, b in zip(decode_logits(fused), decode_logits(modules)):
        assert rel_err(a, b) < 1e-5


def _count_calls(monkeypatch, owner, name: str) -> list:
    """Wraps owner.name to record the shape of its first argument per call."""
    calls, real = [], getattr(owner, name)

    def counted(*args, **kw):
        calls.append(tuple(getattr(args[1] if owner is CPUDecoderLayer else args[0], "shape", ())))
        return real(*args, **kw)
    monkeypatch.setattr(owner, name, counted)
    return calls


def _without_stack(model) -> dict:
    """The rule file `model` was loaded with, less its rule placing `CPUDecoderStack`."""
    data = yaml.safe_load(Path(model.ruleset.source).read_text())
    kept = [r for r in data["rules"] if r["replace"]["class"] != "CPUDecoderStack"]
    assert len(kept) == len(data["rules"]) - 1
    return {**data, "rules": kept}


def test_decode_steps_run_the_layers_as_one_call(tiny_dir, monkeypatch):
    """With the family's CPU file a decode step goes through `CPUDecoderStack`: one kernel
    call for all the layers, no per-layer forward, and bitwise the logits of the same file
    without the stack rule (a call per layer)."""
    model = hybrid.load(tiny_dir)
    assert isinstance(model.module.model.layers, CPUDecoderStack)
    per_layer_model = hybrid.load(tiny_dir, rules=_without_stack(model))
    assert type(per_layer_model.module.model.layers) is Layers
    assert all(isinstance(layer, CPUDecoderLayer) for layer in per_layer_model.module.model.layers)
    per_layer = decode_logits(per_layer_model)
    kernels = _count_calls(monkeypatch, layer_kernels, "dense_stack_step")
    moe_kernels = _count_calls(monkeypatch, layer_kernels, "moe_stack_step")
    forwards = _count_calls(monkeypatch, CPUDecoderLayer, "forward")
    fused = decode_logits(model)
    assert all(torch.equal(a, b) for a, b in zip(fused, per_layer))
    assert len(kernels) + len(moe_kernels) == len(fused)  # one call a step: the layers are one run
    assert all(shape[1] > 1 for shape in forwards)  # only prefills


def test_layers_with_hooks_or_of_another_kind_split_the_runs(tmp_path, monkeypatch):
    """A Qwen3-MoE with a dense layer between sparse ones, a hook on the last: runs of MoE,
    dense, then the hooked layer through its own forward (the hook fires at every step);
    the logits stay those of per-layer calls."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[2])
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).eval().save_pretrained(tmp_path)
    model = hybrid.load(tmp_path)
    per_layer = decode_logits(hybrid.load(tmp_path, rules=_without_stack(model)))
    stack = model.module.model.layers
    fired = []
    model.module.model.layers[3].register_forward_hook(lambda mod, args, out: fired.append(args[0].shape))
    dense, sparse = (_count_calls(monkeypatch, layer_kernels, k) for k in ("dense_stack_step", "moe_stack_step"))
    fused = decode_logits(model)
    assert all(torch.equal(a, b) for a, b in zip(fused, per_layer))
    steps = len(fused)
    assert len(sparse) == len(dense) == steps  # layers 0-1 and layer 2; layer 3 alone
    assert [(kernel is not None, len(layers)) for kernel, _, layers, _, _ in stack._plan] == [(True, 2), (True, 1), (False, 1)]
    assert sum(shape[1] == 1 for shape in fired) == steps


def _rules_with_activations(activations: str) -> str:
    kwargs = f"{{quant: Q8_0, activations: {activations}}}"
    return (
        "rules:\n"
        "  - match: {name: 'model\\.layers\\.\\d+', class: Block}\n"
        f"    replace: {{class: CPUDecoderLayer, kwargs: {kwargs}}}\n"
        "  - match: {name: 'model\\.embed_tokens'}\n"
        "    replace: {class: CPUEmbedding}\n"
        "  - match: {class: RMSNorm}\n"
        "    replace: {class: CPURMSNorm}\n"
        "  - match: {class: Linear}\n"
        f"    replace: {{class: CPULinear, kwargs: {kwargs}}}\n"
    )


def test_activation_forms_against_float_activations(tiny_dir):
    """`activations` on the decode operators: int16 stays within 1e-4 of float activations
    over the same Q8_0 weights, int8 within the error its rounding allows (and does differ,
    so the path is taken), in batched decode steps of sequences at different lengths."""
    ref = decode_logits(hybrid.load(tiny_dir, rules=_rules_with_activations("float")))
    for activations, tol in (("int16", 1e-4), ("auto", 1e-4), ("int8", 3e-2)):
        model = hybrid.load(tiny_dir, rules=_rules_with_activations(activations))
        got = decode_logits(model, follow=ref)
        errors = [rel_err(g, r) for g, r in zip(got, ref)]
        assert max(errors) < tol, (activations, errors)
        if activations == "int8":
            assert max(errors) > 1e-6


def test_bad_activations_kwarg_is_refused_when_the_rules_are_read():
    with pytest.raises(RuleError, match="activations .int4. is not one of auto, int16, int8, float"):
        parse_rules("rules:\n  - match: {class: Linear}\n    replace: {class: CPULinear, kwargs: {activations: int4}}\n")
