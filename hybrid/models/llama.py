"""Llama family: Llama 2/3/3.1, Mistral, SmolLM2, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .common import MLP, BaseConfig, Block, CausalLM, rope_parameters

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class Config(BaseConfig):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    rope: dict = field(default_factory=dict)
    qk_norm: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = super().from_dict(d)
        cfg.rope = rope_parameters(d)
        cfg.qk_norm = d.get("model_type") == "qwen3"
        if d.get("model_type") == "qwen2":
            cfg.attention_bias = True
        return cfg

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.rope = self.rope or rope_parameters({})
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")


class Model(CausalLM):
    def make_layer(self, cfg, i):
        return Block(cfg, MLP(cfg.hidden_size, cfg.intermediate_size))


# Hugging Face name -> llama.cpp GGUF name; {i} is the layer.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}

# llama.cpp's converter interleaves the rows of q/k for its rotary kernel on the "llama"
# architecture; these tensors are permuted back on load (value: the config field holding
# the head count of that projection).
GGUF_PERMUTED = {
    "model.layers.{i}.self_attn.q_proj.weight": "num_attention_heads",
    "model.layers.{i}.self_attn.k_proj.weight": "num_key_value_heads",
}

# Checkpoint names that differ from the module tree's (none for dense Llama).
STACKED: dict[str, str] = {}
