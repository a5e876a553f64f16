"""The synthetic MoE writer: a tiny qwen3moe file has llama.cpp's metadata keys, tensor names
and llama-quantize's Q4_K_M types, and loads in hybrid (CPU kernels equal the float
reference) and, where llama-cpp-python is installed, in llama.cpp with the same logits."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

import hybrid
from hybrid.writers.synthetic import tensor_type, write_moe_gguf

from .tiny import rel_err

LAYERS = 8
# llama-quantize's Q4_K_M gives attn_v and ffn_down Q6_K in the first and last eighth of
# the layers and every third layer between: of 8 layers, 0, 3, 6 and 7.
MORE_BITS = {0, 3, 6, 7}
TOKENS = [1, 520, 3000, 77, 12000, 5, 9, 400]


@pytest.fixture(scope="module")
def q4km(tmp_path_factory, smollm_path):
    path = tmp_path_factory.mktemp("qwen3moe") / "tiny-q4km.gguf"
    return write_moe_gguf(path, arch="qwen3moe", layers=LAYERS, hidden=256, experts=4, expert_width=256, top_k=2,
                          heads=2, kv_heads=1, head_dim=128, qtype="Q4_K_M", context=512, tokenizer_from=smollm_path)


def expected_q4km_types() -> dict[str, Q]:
    types = {"token_embd.weight": Q.Q4_K, "output_norm.weight": Q.F32, "output.weight": Q.Q6_K}
    for i in range(LAYERS):
        b = f"blk.{i}"
        for norm in ("attn_norm", "attn_q_norm", "attn_k_norm", "ffn_norm", "ffn_gate_inp"):
            types[f"{b}.{norm}.weight"] = Q.F32
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate_exps", "ffn_up_exps"):
            types[f"{b}.{name}.weight"] = Q.Q4_K
        for name in ("attn_v", "ffn_down_exps"):
            types[f"{b}.{name}.weight"] = Q.Q6_K if i in MORE_BITS else Q.Q4_K
    return types


def test_qwen3moe_file_has_llamacpp_names_types_and_metadata(q4km):
    r = GGUFReader(q4km)
    assert {t.name: t.tensor_type for t in r.tensors} == expected_q4km_types()
    shapes = {t.name: [int(n) for n in t.shape] for t in r.tensors}  # GGUF order: columns first
    assert shapes["blk.0.attn_q.weight"] == [256, 256]  # 2 heads x 128
    assert shapes["blk.0.attn_k_norm.weight"] == [128]
    assert shapes["blk.0.ffn_gate_exps.weight"] == [256, 256, 4]
    assert shapes["blk.0.ffn_down_exps.weight"] == [256, 256, 4]
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith(("tokenizer.", "GGUF."))}
    assert meta["general.architecture"] == "qwen3moe"
    assert meta["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    for key, value in {"block_count": LAYERS, "embedding_length": 256, "attention.head_count": 2,
                       "attention.head_count_kv": 1, "attention.key_length": 128, "attention.value_length": 128,
                       "expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 256}.items():
        assert meta[f"qwen3moe.{key}"] == value, key


def test_tensor_types_of_other_file_types():
    # block types alone: every matrix; llama-quantize's Q8_0 / Q4_0 mixes change the output only
    assert tensor_type("Q4_0", "output.weight", 16, 2048) == Q.Q4_0
    assert tensor_type("Q4_0", "output.weight", 16, 2048, mix=True) == Q.Q6_K
    assert tensor_type("Q8_0", "output.weight", 16, 2048, mix=True) == Q.Q8_0
    assert tensor_type("Q4_0", "blk.0.attn_v.weight", 16, 2048, mix=True) == Q.Q4_0
    assert tensor_type("Q4_K_M", "blk.2.ffn_down_exps.weight", 16, 768) == Q.Q4_K
    assert tensor_type("Q4_K_M", "blk.4.ffn_down_exps.weight", 16, 768) == Q.Q6_K
    # rows that are not whole 256-weight blocks fall back as llama.cpp's do
    assert tensor_type("Q4_K_M", "blk.1.attn_q.weight", 16, 96) == Q.Q5_0
    assert tensor_type("Q4_K_M", "blk.0.attn_v.weight", 16, 96) == Q.Q8_0
    with pytest.raises(ValueError, match="Q4_K_X"):
        tensor_type("Q4_K_X", "output.weight", 16, 256)


def test_qwen3moe_file_loads_and_cpu_kernels_match_the_float_reference(q4km):
    ref_model = hybrid.load(q4km, rules="torch-cpu")
    cfg = ref_model.config
    assert (cfg.model_type, cfg.num_local_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == ("qwen3_moe", 4, 2, 256)
    assert cfg.head_dim == 128 and cfg.qk_norm and cfg.norm_topk_prob
    ref = ref_model.logits(TOKENS)
    assert torch.isfinite(ref).all()
    cpu = hybrid.load(q4km, rules="qwen_moe-cpu").logits(TOKENS)
    assert rel_err(cpu, ref) < 2e-3  # the CPU kernels' integer dots against float32 weights


def test_llamacpp_reads_the_file_as_hybrid_does(q4km):
    llama_cpp = pytest.importorskip("llama_cpp")  # a benchmark dependency, not a test one
    params = llama_cpp.llama_model_default_params

    def no_extra_buffers():  # plain CPU buffers: some VMs fault on the AMX buffers' tile instructions
        p = params()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = no_extra_buffers
    try:
        llm = llama_cpp.Llama(str(q4km), n_ctx=64, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = params
    llm.eval(TOKENS)
    theirs = torch.from_numpy(np.array(llm.scores[: len(TOKENS)]))
    ours = hybrid.load(q4km, rules="torch-cpu").logits(TOKENS)
    # llama.cpp rounds activations to 8 bits (Q8_K) for its dots: 0.35% measured
    assert rel_err(theirs, ours) < 1e-2
