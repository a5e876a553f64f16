"""Gemma 3 (text): grouped-query attention with q/k RMSNorm, a 1/sqrt(query_pre_attn_scalar)
score scale, sliding-window layers (5 of every 6 by default) with their own RoPE base
beside full-attention ones, four norms per block (attention and feed-forward each
normed before and after), a GeGLU MLP, embeddings scaled by sqrt(hidden) and optional
final logit soft-capping.

Norm weights: Hugging Face stores w and multiplies by (1 + w); llama.cpp's converter
stores 1 + w. This family keeps llama.cpp's form, so its norms are the common RMSNorm
(and its CPU operator); `sanitize` adds the 1 to a Hugging Face checkpoint's.

`attn_logit_softcapping` is read and not applied, as in transformers' and llama.cpp's
Gemma 3 (it is Gemma 2's)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from hybrid.files.checkpoint import TensorRef
from .common import Attention as _Attention
from .common import BaseConfig, CausalLM, RMSNorm, Rotary, rope_parameters

MODEL_TYPES = ("gemma3_text",)
GGUF_ARCHITECTURES = {"gemma3": "gemma3_text"}
# GGUF metadata (after "gemma3.") -> config key, beyond the keys every family shares
GGUF_CONFIG = {"attention.sliding_window": "sliding_window", "final_logit_softcapping": "final_logit_softcapping"}

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


@dataclass
class Config(BaseConfig):
    model_type: str = "gemma3_text"
    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    layer_types: list = field(default_factory=list)
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    rope: dict = field(default_factory=dict)  # full-attention layers
    rope_local: dict = field(default_factory=dict)  # sliding-window layers
    qk_norm: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = super().from_dict(d)
        if d.get("hidden_act") and "hidden_activation" not in d:
            cfg.hidden_activation = d["hidden_act"]
        params = d.get("rope_parameters") or {}
        if "full_attention" in params:  # transformers 5: one setting per layer type
            cfg.rope = rope_parameters({"rope_parameters": params["full_attention"]})
            cfg.rope_local = rope_parameters({"rope_parameters": params.get("sliding_attention") or {"rope_theta": 10000.0}})
        else:  # transformers 4 / GGUF: rope_theta (+ rope_scaling) global, rope_local_base_freq local
            cfg.rope = rope_parameters({"rope_theta": 1_000_000.0, **d})
            cfg.rope_local = rope_parameters({"rope_theta": d.get("rope_local_base_freq", 10000.0)})
        if not cfg.layer_types:
            every = d.get("sliding_window_pattern", 6)
            cfg.layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(cfg.num_hidden_layers)]
        return cfg

    def __post_init__(self):
        if self.hidden_activation not in _GELU_TANH:
            raise ValueError(f"hidden_activation {self.hidden_activation!r} is not supported (only {_GELU_TANH[0]})")
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")

    def is_sliding(self, i: int) -> bool:
        return self.layer_types[i] == "sliding_attention"


class Attention(_Attention):
    """The common attention with Gemma's score scale and, on sliding layers, a window."""

    def __init__(self, cfg: Config, i: int):
        super().__init__(cfg)
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.sliding_window = cfg.sliding_window if cfg.is_sliding(i) else None


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config, i: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(H, eps)
        self.self_attn = Attention(cfg, i)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.mlp = MLP(H, cfg.intermediate_size)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        self.rope_index = 0 if cfg.is_sliding(i) else 1  # which of the model's (local, global) tables

    def forward(self, x, rope, step, cache):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope[self.rope_index], step, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class LocalGlobalRotary(nn.Module):
    """RoPE tables of both layer kinds: forward(positions) -> (local, global)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.local = Rotary(cfg.rope_local, cfg.head_dim, cfg.max_position_embeddings)
        self.full = Rotary(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)

    def forward(self, positions):
        return self.local(positions), self.full(positions)


class Model(CausalLM):
    def make_layer(self, cfg, i):
        return Block(cfg, i)

    def make_rotary(self, cfg):
        return LocalGlobalRotary(cfg)

    def embed(self, tokens):
        x = self.model.embed_tokens(tokens)
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)

    def head(self, x):
        logits = super().head(x)
        cap = self.config.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap


def sanitize(refs: dict[str, TensorRef]) -> None:
    """A Hugging Face checkpoint's norm weights w -> 1 + w (what llama.cpp stores)."""
    for name, ref in list(refs.items()):
        if name.endswith("norm.weight"):
            refs[name] = TensorRef(name, ref.shape, GGMLQuantizationType.F32, lambda r=ref: r.numpy() + 1.0)


def gguf_config(meta: dict, cfg: dict) -> None:
    """What llama.cpp fixes in code for Gemma 3 rather than storing: the local RoPE base,
    the 5:1 layer pattern and the score scale (1/sqrt(head_dim), 27B: 1/sqrt(hidden/heads))."""
    cfg.setdefault("rope_theta", 1_000_000.0)
    cfg["rope_local_base_freq"] = 10000.0
    cfg["sliding_window_pattern"] = 6
    heads = cfg["num_attention_heads"]
    cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // heads if cfg["num_hidden_layers"] == 62 else cfg.get("head_dim", 256)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
GGUF_PERMUTED: dict[str, str] = {}  # llama.cpp keeps Hugging Face's rotary layout for gemma3
STACKED: dict[str, str] = {}
