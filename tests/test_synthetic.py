"""The synthetic MoE writer: tiny qwen3moe and gpt-oss files have llama.cpp's metadata keys,
tensor names and tensor types (llama-quantize's Q4_K_M; the MXFP4 experts and Q8_0 rest of
ggml-org's gpt-oss GGUFs), and load in hybrid (CPU kernels equal the float reference) and,
where llama-cpp-python is installed, in llama.cpp with the same logits."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

import hybrid
from hybrid.engine.generate import collect
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


def llamacpp(path):
    """llama-cpp-python's Llama over `path` with logits for every position, or a skip
    where it is not installed (a benchmark dependency, not a test one)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_default_params

    def no_extra_buffers():  # plain CPU buffers: some VMs fault on the AMX buffers' tile instructions
        p = params()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = no_extra_buffers
    try:
        return llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = params


def test_llamacpp_reads_the_file_as_hybrid_does(q4km):
    llm = llamacpp(q4km)
    llm.eval(TOKENS)
    theirs = torch.from_numpy(np.array(llm.scores[: len(TOKENS)]))
    ours = hybrid.load(q4km, rules="torch-cpu").logits(TOKENS)
    # llama.cpp rounds activations to 8 bits (Q8_K) for its dots: 0.35% measured
    assert rel_err(theirs, ours) < 1e-2


# gpt-oss: 4 layers, even ones sliding over 4 tokens (fewer than the prompts), YaRN x32
# over 4,096, sinks and biases; experts MXFP4, the other matrices Q8_0.
GPT_LAYERS = 4
GPT_TOKENS = [1, 520, 3000, 77, 12000, 5, 9, 400, 31, 2000, 17, 8000, 4444, 90, 15000, 23]


@pytest.fixture(scope="module")
def mxfp4_moe(tmp_path_factory, smollm_path):
    path = tmp_path_factory.mktemp("gpt_oss") / "tiny-mxfp4.gguf"
    return write_moe_gguf(path, arch="gpt-oss", layers=GPT_LAYERS, hidden=256, experts=4, expert_width=256, top_k=2,
                          heads=4, kv_heads=2, head_dim=64, qtype="MXFP4_MOE", context=4096, sliding_window=4,
                          yarn=(32.0, 4096), tokenizer_from=smollm_path)


def expected_gpt_oss_types() -> dict[str, Q]:
    types = {"token_embd.weight": Q.Q8_0, "output_norm.weight": Q.F32, "output.weight": Q.Q8_0}
    for i in range(GPT_LAYERS):
        b = f"blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            types[f"{b}.{name}.weight"], types[f"{b}.{name}.bias"] = Q.Q8_0, Q.F32
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            types[f"{b}.{name}.weight"], types[f"{b}.{name}.bias"] = Q.MXFP4, Q.F32
        for name in ("attn_norm.weight", "post_attention_norm.weight", "attn_sinks.weight", "ffn_gate_inp.weight",
                     "ffn_gate_inp.bias"):
            types[f"{b}.{name}"] = Q.F32
    return types


def test_gpt_oss_file_has_llamacpp_names_types_and_metadata(mxfp4_moe):
    r = GGUFReader(mxfp4_moe)
    assert {t.name: t.tensor_type for t in r.tensors} == expected_gpt_oss_types()
    shapes = {t.name: [int(n) for n in t.shape] for t in r.tensors}  # GGUF order: columns first
    assert shapes["blk.0.attn_q.weight"] == [256, 256] and shapes["blk.0.attn_k.weight"] == [256, 128]
    assert shapes["blk.0.attn_output.weight"] == [256, 256] and shapes["blk.0.attn_sinks.weight"] == [4]
    assert shapes["blk.0.ffn_gate_exps.weight"] == [256, 256, 4] and shapes["blk.0.ffn_down_exps.bias"] == [256, 4]
    assert shapes["blk.0.ffn_gate_inp.bias"] == [4]
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith(("tokenizer.", "GGUF."))}
    assert meta["general.architecture"] == "gpt-oss"
    assert meta["general.file_type"] == 38  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE
    for key, value in {"block_count": GPT_LAYERS, "context_length": 4096, "embedding_length": 256,
                       "feed_forward_length": 256, "attention.head_count": 4, "attention.head_count_kv": 2,
                       "attention.key_length": 64, "attention.value_length": 64, "rope.freq_base": 150000.0,
                       "expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 256,
                       "attention.sliding_window": 4, "rope.scaling.type": "yarn", "rope.scaling.factor": 32.0,
                       "rope.scaling.original_context_length": 4096}.items():
        assert meta[f"gpt-oss.{key}"] == value, key
    assert meta["gpt-oss.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)


def test_mxfp4_blocks_have_the_size_of_the_q8_0_weights(mxfp4_moe):
    """The random MXFP4 blocks' E8M0 exponent gives weights as large as the Q8_0 blocks'
    (both ~1/sqrt(hidden)), so random activations neither vanish nor overflow."""
    stored = {t.name: t for t in GGUFReader(mxfp4_moe).tensors}
    weights = {name: dequantize(np.asarray(stored[name].data), stored[name].tensor_type)
               for name in ("blk.1.ffn_up_exps.weight", "blk.1.attn_q.weight")}
    experts, attention = weights["blk.1.ffn_up_exps.weight"], weights["blk.1.attn_q.weight"]
    assert np.isfinite(experts).all() and np.abs(experts).max() > 0
    assert 0.5 < experts.std() / attention.std() < 2


def test_tensor_types_of_the_mxfp4_moe_file_type():
    assert tensor_type("MXFP4_MOE", "blk.3.ffn_down_exps.weight", 12, 2880) == Q.MXFP4
    assert tensor_type("MXFP4_MOE", "blk.3.attn_v.weight", 12, 2880) == Q.Q8_0
    assert tensor_type("MXFP4_MOE", "output.weight", 12, 2880) == Q.Q8_0
    assert tensor_type("MXFP4_MOE", "token_embd.weight", 12, 2880) == Q.Q8_0


def test_gpt_oss_file_loads_and_cpu_kernels_match_the_float_reference(mxfp4_moe):
    ref_model = hybrid.load(mxfp4_moe, rules="torch-cpu")
    cfg = ref_model.config
    assert (cfg.model_type, cfg.num_local_experts, cfg.num_experts_per_tok) == ("gpt_oss", 4, 2)
    assert (cfg.intermediate_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads) == (256, 64, 4, 2)
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 2 and cfg.sliding_window == 4
    assert cfg.attention_bias and cfg.o_bias
    rope = cfg.rope
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 32.0, 4096)
    ref = ref_model.logits(GPT_TOKENS)
    assert torch.isfinite(ref).all() and ref.std() > 0.1
    model = hybrid.load(mxfp4_moe, rules="gpt_oss-cpu")
    experts = model.module.model.layers[0].mlp.experts
    assert type(experts).__name__ == "CPUExperts" and Q(experts.gate[0]) == Q.MXFP4
    assert rel_err(model.logits(GPT_TOKENS), ref) < 1e-3  # 5e-5 measured


def per_position_errors(theirs: torch.Tensor, ours: torch.Tensor) -> np.ndarray:
    return np.array([rel_err(theirs[i], ours[i]) for i in range(len(ours))])


def test_llamacpp_reads_the_gpt_oss_file_as_hybrid_does(mxfp4_moe):
    """llama.cpp rounds its activations to Q8_0 blocks for every quantized dot: 1.0-1.3% of
    the largest logit measured at each position, as on llama / qwen3moe files of Q8_0 and
    these widths. A router near-tie that the rounding tips picks another expert at one
    position (11% there); each semantic difference measured moves the median position by
    6-50% (sinks, window, layer pattern, YaRN, router / expert / attention biases, SwiGLU
    clamp)."""
    llm = llamacpp(mxfp4_moe)
    llm.eval(GPT_TOKENS)
    theirs = torch.from_numpy(np.array(llm.scores[: len(GPT_TOKENS)]))
    errors = per_position_errors(theirs, hybrid.load(mxfp4_moe, rules="torch-cpu").logits(GPT_TOKENS))
    assert np.median(errors) < 2e-2, errors
    assert (errors < 2e-2).mean() >= 0.75, errors


def test_llamacpp_and_hybrid_continue_the_gpt_oss_file_alike(mxfp4_moe):
    """Greedy decoding through hybrid's CPU kernels (decode attention over the sliding
    layers' rings, with the sinks) and through llama.cpp give the same tokens."""
    prompt, no_stop = GPT_TOKENS[:6], {0: -100.0, 2: -100.0}  # SmolLM2's end tokens: keep generating

    def bias(ids, scores):
        scores[list(no_stop)] += list(no_stop.values())
        return scores

    llm = llamacpp(mxfp4_moe)
    theirs = []
    for token in llm.generate(prompt, temp=0.0, logits_processor=[bias]):
        theirs.append(token)
        if len(theirs) == 10:
            break
    model = hybrid.load(mxfp4_moe, rules="gpt_oss-cpu")
    ours = collect(model.generate(prompt, temperature=0, max_tokens=10, logit_bias=no_stop)).tokens
    assert ours == theirs
