"""From GGUF metadata to a family's config: the metadata keys every family shares, the
architectures llama.cpp names, and what it fixes in code rather than storing (each family's
own `GGUF_CONFIG` and `gguf_config`)."""

from __future__ import annotations

from hybrid.files.checkpoint import CheckpointError
from hybrid.models import family, gguf_architectures, supported_families

# GGUF metadata key (after "{arch}.") -> Hugging Face config key.
COMMON_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "expert_count": "num_local_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    "expert_shared_count": "n_shared_experts",
    "expert_weights_scale": "routed_scaling_factor",
    "expert_weights_norm": "norm_topk_prob",
    "expert_group_count": "n_group",
    "expert_group_used_count": "topk_group",
    "leading_dense_block_count": "first_k_dense_replace",
    "attention.q_lora_rank": "q_lora_rank",
    "attention.kv_lora_rank": "kv_lora_rank",
    "attention.value_length": "v_head_dim",
    "rope.dimension_count": "rope_dimension_count",
    "vocab_size": "vocab_size",
}

# GGUF general.architecture -> Hugging Face model_type (MoE variants chosen by metadata).
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "deepseek2": "deepseek_v2",
}


def gguf_config(meta: dict) -> dict:
    """A Hugging Face-style config dict from GGUF metadata: the keys every family shares
    (`COMMON_KEYS`), then the family's own (its `GGUF_CONFIG` and `gguf_config`)."""
    arch = meta.get("general.architecture")
    arches = {**ARCHITECTURES, **gguf_architectures()}
    if arch not in arches:
        raise CheckpointError(
            f"GGUF architecture {arch!r} is not supported; supported GGUF architectures: "
            f"{', '.join(sorted(arches))} (model types: {', '.join(supported_families())})"
        )
    cfg = {"model_type": arches[arch], "gguf_architecture": arch}
    fam = family(cfg["model_type"])
    for key, hf in {**COMMON_KEYS, **getattr(fam, "GGUF_CONFIG", {})}.items():
        if f"{arch}.{key}" in meta:
            cfg[hf] = meta[f"{arch}.{key}"]
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in meta:
        cfg["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    if arch == "llama" and cfg.get("num_local_experts"):
        cfg["model_type"] = "mixtral"
    if arch == "deepseek2" and meta.get(f"{arch}.expert_gating_func") == 2:
        cfg["model_type"] = "deepseek_v3"
        cfg["scoring_func"] = "sigmoid"
    if arch == "qwen3moe":  # llama.cpp always renormalises Qwen3-MoE's top-k weights
        cfg.setdefault("norm_topk_prob", True)
    if cfg["model_type"] in ("deepseek_v2", "deepseek_v3"):
        # key/value_length are the q/k head (nope+rope) and v head; newer llama.cpp files store
        # its MQA view of MLA there and the real heads under *_mla. The family splits the
        # q/k head with rope_dimension_count.
        cfg["qk_head_dim"] = meta.get(f"{arch}.attention.key_length_mla", cfg.pop("head_dim", None))
        cfg["v_head_dim"] = meta.get(f"{arch}.attention.value_length_mla", cfg.get("v_head_dim"))
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {
            "rope_type": scaling,
            "factor": meta.get(f"{arch}.rope.scaling.factor"),
            "original_max_position_embeddings": meta.get(f"{arch}.rope.scaling.original_context_length"),
        }
        if f"{arch}.rope.scaling.yarn_log_multiplier" in meta:
            mult = meta[f"{arch}.rope.scaling.yarn_log_multiplier"]
            cfg["rope_scaling"].update(mscale=mult / 0.1, mscale_all_dim=mult / 0.1)
    if hasattr(fam, "gguf_config"):
        fam.gguf_config(meta, cfg)
    return cfg
