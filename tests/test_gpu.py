"""GPU placement (needs CUDA; skipped without it): the hybrid rule files really run with
attention on the GPU and routed experts on the CPU."""

import pytest
import torch

import hybrid

from .tiny import make_tiny, reference_logits, rel_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

IDS = list(range(3, 40))

FP32_HYBRID = """
default_device: cuda:0
dtype: float32
rules:
  - match: {name: 'model\\.layers\\.\\d+\\.(block_sparse_moe|mlp)\\.experts'}
    replace: {class: CPUExperts}
"""


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "deepseek_v3"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    family = {"mixtral": "mixtral", "qwen2_moe": "qwen_moe", "deepseek_v3": "deepseek"}[request.param]
    return d, reference_logits(make_tiny(request.param, d), IDS), family


def test_fp32_hybrid_matches_reference_and_places_modules(tiny):
    d, ref, _ = tiny
    m = hybrid.load(d, rules=FP32_HYBRID)
    experts = [mod for name, mod in m.module.named_modules() if name.endswith(".experts")]
    assert experts and all(type(e).__name__ == "CPUExperts" for e in experts)
    assert m.module.model.layers[0].self_attn.o_proj.weight.device.type == "cuda"
    assert rel_err(m.logits(IDS), ref) < 1e-3


def test_builtin_gpu_rules_bf16(tiny):
    d, ref, family = tiny
    logits = hybrid.load(d, rules=f"{family}-gpu").logits(IDS)
    assert rel_err(logits, ref) < 5e-2


def test_gpu_experts_rule_puts_first_layers_on_gpu(tiny):
    d, _, family = tiny
    m = hybrid.load(d, rules=f"{family}-gpu-experts")
    kinds = {name: type(mod).__name__ for name, mod in m.module.named_modules() if name.endswith(".experts")}
    assert any(k == "Experts" for k in kinds.values())  # torch experts on the GPU for layers 0-3


PREFILL_ON_GPU = """
default_device: cuda:0
dtype: float32
rules:
  - match: {name: 'model\\.layers\\.\\d+\\.(block_sparse_moe|mlp)\\.experts'}
    replace: {class: CPUExperts, kwargs: {prefill_device: 'cuda:0', prefill_min_tokens: 8}}
"""


def test_experts_prefill_on_gpu_decode_on_cpu(tiny, monkeypatch):
    from operators import offload

    d, ref, _ = tiny
    m = hybrid.load(d, rules=PREFILL_ON_GPU)
    devices = []
    real = offload._weights
    monkeypatch.setattr(offload, "_weights", lambda q, w, dev: devices.append(torch.device(dev).type) or real(q, w, dev))
    cache = m.new_cache(1, len(IDS))
    prefill = m.forward(torch.tensor([IDS[:20]]), [0], [0], cache)[0]
    assert devices and set(devices) == {"cuda"}
    devices.clear()
    decode = [m.forward(torch.tensor([[t]]), [20 + i], [0], cache)[0, -1] for i, t in enumerate(IDS[20:])]
    assert devices == []
    assert rel_err(torch.cat([prefill, torch.stack(decode)]).cpu(), ref) < 1e-3
