"""gpt-oss (`gpt_oss`, GGUF arch `gpt-oss`): grouped-query attention with biases on all four
projections and a learned per-head sink logit that takes part in the softmax (and drops
out of the output); sliding-window and full layers alternating (even layers sliding);
YaRN RoPE; a MoE in every layer: router with bias, top-k of its logits then a softmax
over those k, experts with biases and a clamped SwiGLU ((up + 1) * gate * sigmoid(alpha *
gate), gate <= limit, |up| <= limit).

Experts are stored per projection ([E, I, H] gate and up, [E, H, I] down, with their
biases), as llama.cpp's GGUF holds them; `sanitize` splits a Hugging Face checkpoint's
interleaved `gate_up_proj` [E, H, 2I] into that form. CPUExperts computes MXFP4 expert blocks
as they are stored (the numba kernels' MXFP4 format); the torch experts dequantize them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from hybrid.files.checkpoint import TensorRef
from . import llama
from .common import Attention as _Attention
from .common import Block, CausalLM
from .common import Experts as _Experts

MODEL_TYPES = ("gpt_oss",)
GGUF_ARCHITECTURES = {"gpt-oss": "gpt_oss"}
GGUF_CONFIG = {"attention.sliding_window": "sliding_window"}


@dataclass
class Config(llama.Config):
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: list = field(default_factory=list)
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    attention_bias: bool = True
    o_bias: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        cfg = super().from_dict(d)
        cfg.o_bias = cfg.attention_bias
        if not cfg.layer_types:
            cfg.layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(cfg.num_hidden_layers)]
        return cfg


def attend_with_sinks(q, k, v, mask, scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, L, D], mask [B, 1, T, L] or None, sinks [H] -> [B, T, H*D]:
    softmax over the L scores and the head's sink logit, the sink's share dropped."""
    B, H, T, _ = q.shape
    groups = H // k.shape[1]
    k, v = k.to(q.dtype).repeat_interleave(groups, 1), v.to(q.dtype).repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [B, H, T, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, H, 1, 1).expand(B, H, T, 1)
    probs = torch.cat((scores, sink), dim=-1).softmax(-1)[..., :-1]
    return (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, -1)


class Attention(_Attention):
    def __init__(self, cfg: Config, i: int):
        super().__init__(cfg)
        self.sinks = nn.Parameter(torch.empty(cfg.num_attention_heads))
        self.sliding_window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else None

    def attend(self, q, k, v, mask):
        return attend_with_sinks(q, k, v, mask, self.scale, self.sinks)


class Experts(_Experts):
    """E experts with biases and the clamped SwiGLU, stacked: gate_proj/up_proj [E, I, H],
    down_proj [E, H, I] and their biases; forward(x [N, H], ids [N, K], weights [N, K]) -> [N, H]."""

    def __init__(self, cfg: Config):
        super().__init__(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, bias=True,
                         glu=(cfg.swiglu_limit, cfg.swiglu_alpha))


class MoE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=True)
        self.experts = Experts(cfg)

    def forward(self, x):
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        top, ids = self.router(flat).topk(self.top_k, dim=-1)
        return self.experts(flat, ids, top.float().softmax(-1)).view(B, T, H)


class Model(CausalLM):
    def make_layer(self, cfg, i):
        return Block(cfg, MoE(cfg), Attention(cfg, i))


def gguf_config(meta: dict, cfg: dict) -> None:
    """What llama.cpp fixes in code: YaRN without rounding its ramp (transformers'
    `truncate: false` for gpt-oss); the expert width is the feed-forward width."""
    if "rope_scaling" in cfg:
        cfg["rope_scaling"]["truncate"] = False
    if "moe_intermediate_size" in cfg:
        cfg["intermediate_size"] = cfg.pop("moe_intermediate_size")


def sanitize(refs: dict[str, TensorRef]) -> None:
    """Hugging Face's interleaved gate_up_proj [E, H, 2I] (gate: even columns) and
    down_proj [E, I, H] -> gate_proj/up_proj [E, I, H], down_proj [E, H, I] and biases."""
    F32 = GGMLQuantizationType.F32
    for name in [n for n in refs if n.endswith(".experts.gate_up_proj")]:
        prefix = name[: -len("gate_up_proj")]
        gate_up, gate_up_bias = refs.pop(name), refs.pop(prefix + "gate_up_proj_bias")
        down, down_bias = refs.pop(prefix + "down_proj"), refs.pop(prefix + "down_proj_bias")
        E, H, I2 = gate_up.shape
        for proj, half in (("gate_proj", 0), ("up_proj", 1)):
            refs[prefix + proj] = TensorRef(prefix + proj, (E, I2 // 2, H), F32,
                                            lambda r=gate_up, h=half: np.ascontiguousarray(r.numpy()[:, :, h::2].transpose(0, 2, 1)))
            refs[prefix + proj + "_bias"] = TensorRef(prefix + proj + "_bias", (E, I2 // 2), F32,
                                                      lambda r=gate_up_bias, h=half: np.ascontiguousarray(r.numpy()[:, h::2]))
        refs[prefix + "down_proj"] = TensorRef(prefix + "down_proj", (E, H, I2 // 2), F32,
                                               lambda r=down: np.ascontiguousarray(r.numpy().transpose(0, 2, 1)))
        refs[prefix + "down_proj_bias"] = down_bias


_A, _MLP = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"

GGUF_NAMES = {
    **{k: v for k, v in llama.GGUF_NAMES.items() if "post_attention_layernorm" not in k},
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    f"{_A}.o_proj.bias": "blk.{i}.attn_output.bias",
    f"{_A}.sinks": "blk.{i}.attn_sinks.weight",
    f"{_MLP}.router.weight": "blk.{i}.ffn_gate_inp.weight",
    f"{_MLP}.router.bias": "blk.{i}.ffn_gate_inp.bias",
    **{f"{_MLP}.experts.{p}_proj": f"blk.{{i}}.ffn_{p}_exps.weight" for p in ("gate", "up", "down")},
    **{f"{_MLP}.experts.{p}_proj_bias": f"blk.{{i}}.ffn_{p}_exps.bias" for p in ("gate", "up", "down")},
}
GGUF_PERMUTED: dict[str, str] = {}
STACKED: dict[str, str] = {}  # Hugging Face stores these experts stacked already
