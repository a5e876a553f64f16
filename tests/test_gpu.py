"""GPU placement (needs CUDA; skipped without it): the hybrid rule files really run with
attention on the GPU and routed experts on the CPU."""

import pytest
import torch

import hybrid

from .test_decode_operators import decode_logits
from .tiny import add_byte_tokenizer, make_tiny, reference_logits, rel_err

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
    from hybrid.operators import offload

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


def test_default_rules_on_a_cuda_machine_are_the_gpu_file(tiny):
    d, _, family = tiny
    m = hybrid.load(d)
    assert m.ruleset.source.endswith(f"{family}-gpu.yaml")
    assert m.module.model.layers[0].self_attn.o_proj.weight.device.type == "cuda"
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # it plans anew at every decode step


def test_batched_decode_on_the_gpu_file_matches_torch(tiny):
    """Sequences of different lengths in shuffled slots, decoded together (the server's
    path) under the GPU default (bfloat16 on the GPU, experts on the CPU)."""
    d, _, _ = tiny
    ref = decode_logits(hybrid.load(d, rules="torch-cpu"))
    got = decode_logits(hybrid.load(d), follow=ref)
    for r, g in zip(ref, got):
        assert rel_err(g.float().cpu(), r) < 5e-2


def test_engine_on_the_gpu_batches_like_alone(tiny):
    """Continuous batching with attention on the GPU and experts on the CPU: greedy
    requests run together give what each gives alone."""
    from hybrid.engine.scheduler import Engine
    from hybrid.engine.sampling import SamplingParams

    d, _, _ = tiny
    add_byte_tokenizer(d)
    m = hybrid.load(d, rules=FP32_HYBRID)
    eng = Engine(m, slots=4, ctx=128).start()
    try:
        prompts = [m.tokenizer.encode(p) for p in ["The quick brown fox", "1, 2, 3,", "h\u00e9llo", "Once upon a time there"]]
        params = lambda: SamplingParams(temperature=0, max_tokens=12)  # noqa: E731
        alone = [[e.token for e in eng.submit(p, params()) if e.token is not None] for p in prompts]
        streams = [eng.submit(p, params()) for p in prompts]
        together = [[e.token for e in s if e.token is not None] for s in streams]
    finally:
        eng.stop()
    assert all(len(t) == 12 for t in alone)
    assert together == alone


def test_cpu_experts_beside_a_gpu_leave_cores_to_it(tiny):
    import numba

    d, _, family = tiny
    experts = lambda m: [mod for name, mod in m.module.named_modules() if name.endswith(".experts")]  # noqa: E731
    assert {e.threads for e in experts(hybrid.load(d))} == {max(1, numba.config.NUMBA_NUM_THREADS // 2)}
    assert {e.threads for e in experts(hybrid.load(d, rules=FP32_HYBRID.replace("{class: CPUExperts}", "{class: CPUExperts, kwargs: {threads: 3}}")))} == {3}
    assert {e.threads for e in experts(hybrid.load(d, rules=f"{family}-cpu"))} == {None}


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_split_experts_on_the_gpu_match_the_unsplit_layer(tmp_path, dtype, tolerance):
    """The two-CPU-halves check of tests/test_split_experts.py with the torch share on cuda:0."""
    from .test_split_experts import PREFIX, built, routing
    from hybrid.inject.loader import describe
    from hybrid.operators import CPUExperts, SplitExperts
    from hybrid.writers.synthetic import write_moe_gguf

    path = write_moe_gguf(tmp_path / "moe.gguf", layers=2, hidden=256, experts=8, expert_width=128, top_k=2, heads=4,
                          kv_heads=2, qtype="Q4_K", vocab_size=512, context=256)
    refs = describe(path)[2]
    for N in (1, 5, 64):
        x, ids, weights = routing(N)
        whole = built(CPUExperts, refs, activations="float")(x, ids, weights)
        split = built(SplitExperts, refs, experts=[0, 3, 4], device="cuda:0", dtype=dtype, activations="float")
        assert split.gate_proj.device.type == "cuda"
        got = split(x.cuda(), ids.cuda(), weights.cuda())
        assert got.device.type == "cuda" and rel_err(got.cpu(), whole) < tolerance


def test_fitted_file_runs_on_the_gpu(tiny):
    """`hybrid fit` for the free memory of cuda:0 less all but one and a half layers' experts:
    whole layers on the GPU, one split, the rest on the CPU; logits as the reference's."""
    from hybrid.inject.fit import fit

    d, ref, _ = tiny
    everything = fit(d, 1 << 40, slots=1, ctx=64)
    layer = (next(x for x in everything.plan["devices"] if x["device"] == "cuda:0")["bytes"] - everything.minimum) // len(
        everything.whole_layers)
    f = fit(d, everything.minimum + layer * 3 // 2, slots=1, ctx=64)
    assert f.whole_layers and (f.split or f.cpu_layers)
    m = hybrid.load(d, rules=f.rules_yaml)
    assert rel_err(m.logits(IDS), ref) < 5e-2
