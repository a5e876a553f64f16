"""GLM-4.5 / 4.6 MoE (`glm4_moe`, GGUF arch `glm4moe`): grouped-query attention with q/k/v
bias, optional q/k RMSNorm and RoPE on the first `partial_rotary_factor` of each head; the
first `first_k_dense_replace` layers dense, the rest DeepSeek V3's MoE (sigmoid router
with a correction bias that steers the choice, expert groups, renormalised and scaled
weights, shared experts). The multi-token-prediction layers some checkpoints carry after
the last layer (`num_nextn_predict_layers`) are not used for decoding and are dropped."""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import deepseek, llama
from .common import MLP, Attention, Block, CausalLM, Rotary

MODEL_TYPES = ("glm4_moe",)
GGUF_ARCHITECTURES = {"glm4moe": "glm4_moe"}


@dataclass
class Config(llama.Config):
    moe_intermediate_size: int = 1408
    num_local_experts: int = 128
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    partial_rotary_factor: float = 0.5
    scoring_func: str = "sigmoid"  # what deepseek.Router reads
    topk_method: str = "noaux_tc"

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = {k: v for k, v in d.items() if v is not None}
        if "n_routed_experts" in d:
            d["num_local_experts"] = d["n_routed_experts"]
        rope = d.get("rope_parameters") or {}
        d.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
        if "rope_dimension_count" in d:  # GGUF stores the rotary width itself
            d["partial_rotary_factor"] = d["rope_dimension_count"] / d.get("head_dim", d["hidden_size"] // d["num_attention_heads"])
        cfg = super().from_dict(d)
        cfg.qk_norm = bool(d.get("use_qk_norm", False))
        return cfg

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


class GLMAttention(Attention):
    """The common attention; the model's RoPE tables cover `rotary_dim` of each head."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.rotary_dim = cfg.rotary_dim


class Model(CausalLM):
    def make_rotary(self, cfg):
        return Rotary(cfg.rope, cfg.rotary_dim, cfg.max_position_embeddings)

    def make_layer(self, cfg, i):
        ffn = MLP(cfg.hidden_size, cfg.intermediate_size) if i < cfg.first_k_dense_replace else deepseek.MoE(cfg)
        return Block(cfg, ffn, GLMAttention(cfg))


def gguf_config(meta: dict, cfg: dict) -> None:
    """llama.cpp counts the multi-token-prediction layers in block_count."""
    cfg["num_hidden_layers"] -= meta.get("glm4moe.nextn_predict_layers", 0)


def _layer(name: str) -> str | None:
    m = re.search(r"(?:layers|blk)\.(\d+)\.", name)
    return m.group(1) if m else None


def _drop_layers_with(refs: dict, marker: str) -> None:
    layers = {_layer(n) for n in refs if marker in n} - {None}
    for name in [n for n in refs if _layer(n) in layers]:
        del refs[name]


def sanitize(refs: dict) -> None:
    """Drop the multi-token-prediction layers (their `eh_proj` marks them)."""
    _drop_layers_with(refs, ".eh_proj.")


def merge_gguf(refs: dict, cfg: dict) -> None:
    """Drop the multi-token-prediction layers; GGUF metadata has no q/k-norm or q/k/v-bias
    flag, the tensors say."""
    _drop_layers_with(refs, ".nextn.")
    cfg["use_qk_norm"] = any(n.endswith("self_attn.q_norm.weight") for n in refs)
    cfg["attention_bias"] = any(n.endswith("self_attn.q_proj.bias") for n in refs)


_MLP = "model.layers.{i}.mlp"

GGUF_NAMES = {
    **{k: v for k, v in llama.GGUF_NAMES.items() if "post_attention_layernorm" not in k},
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    **{k: v for k, v in deepseek.GGUF_NAMES.items() if k.startswith(_MLP)},
}
GGUF_PERMUTED: dict[str, str] = {}  # llama.cpp keeps Hugging Face's rotary layout for glm4moe
STACKED = deepseek.STACKED
