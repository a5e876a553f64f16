"""Tiny random Hugging Face models, one per supported model_type, built by transformers
(the numerical reference) and saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
)

_MLA = dict(
    num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    moe_intermediate_size=32, num_experts_per_tok=2, first_k_dense_replace=1,
)

# model_type -> (transformers config class name, model class name, extra config)
TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64, "norm_topk_prob": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 32,
        "norm_topk_prob": True}),
    # MLA heads (nope 16 + rope 8, v 16), kv_lora 32; layer 0 dense, layer 1.. MoE
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", {**_MLA,
        "q_lora_rank": None, "n_routed_experts": 8, "n_shared_experts": 2, "topk_method": "group_limited_greedy",
        "n_group": 2, "topk_group": 1}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {**_MLA,
        "num_hidden_layers": 3, "q_lora_rank": 32, "n_routed_experts": 8, "n_shared_experts": 1, "n_group": 4,
        "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}}),
    # layer 0 dense, 1-2 MoE: 8 experts in 2 groups, sigmoid router with correction bias,
    # a shared expert; RoPE on half of each 32-wide head; q/k/v bias and q/k norm
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", {
        "num_hidden_layers": 3, "head_dim": 32, "moe_intermediate_size": 32, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
        "use_qk_norm": True, "attention_bias": True, "routed_scaling_factor": 2.5, "norm_topk_prob": True}),
    # layer 0 sliding (window 8), layer 1 full; YaRN; 4 experts with biases, top 2; sinks
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {
        "head_dim": 16, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 16.0, "beta_fast": 32.0,
                            "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32}}),
    # the text model of Qwen3.5 MoE: layers 0-2 gated DeltaNet (2 key heads of 16, 4 value heads
    # of 32: llama.cpp's files tile them), layer 3 gated full attention with RoPE on 8 of its
    # 32 dims; 4 experts, top 2, and a shared expert in every layer
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", {
        "num_hidden_layers": 4, "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 16, "linear_value_head_dim": 32, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2}),
    # 6 layers: 5 sliding (window 8, shorter than the test prompts) and 1 full, llama.cpp's
    # fixed pattern; linear RoPE scaling on the full layer as Gemma 3 4B+ has
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "num_hidden_layers": 6, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
        "final_logit_softcapping": 30.0, "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}),
}


def make_tiny(name: str, directory, seed: int = 0, **overrides):
    """Build, randomise and save a tiny model (`overrides`: config values to change);
    returns the transformers model (eval)."""
    import transformers

    cfg_cls, model_cls, extra = TINY[name]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: randomise them too
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n or "bias" in n or n.endswith("sinks"):
                p.add_(torch.randn_like(p) * 0.1)
        for n, b in model.named_buffers():  # DeepSeek V3's e_score_correction_bias steers routing
            if n.endswith("bias"):
                b.add_(torch.randn_like(b) * 0.1)
    model.save_pretrained(directory)
    return model


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def mean_kl(logits: torch.Tensor, ref: torch.Tensor) -> float:
    lp, lq = ref.log_softmax(-1), logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def add_byte_tokenizer(directory) -> None:
    """Give a tiny model (vocabulary 256) a tokenizer: byte-level BPE with one token per
    byte and no merges, so that the generation engine and the server can run it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(Path(directory) / "tokenizer.json"))
