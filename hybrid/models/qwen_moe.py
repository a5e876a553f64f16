"""Qwen MoE: Qwen2-MoE (q/k/v bias, a shared expert behind a sigmoid gate) and Qwen3-MoE
(q/k RMSNorm, no shared expert). Routing is Mixtral's, renormalised only when
`norm_topk_prob`; layers in `mlp_only_layers` or off the `decoder_sparse_step` are dense."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import llama, mixtral
from .common import MLP, Block, CausalLM, routed_gguf_names

MODEL_TYPES = ("qwen2_moe", "qwen3_moe")


@dataclass
class Config(mixtral.Config):
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    o_bias: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        # transformers writes the expert count as num_experts (Qwen2) or num_local_experts (Qwen3)
        if "num_experts" in d:
            d = {**d, "num_local_experts": d["num_experts"]}
        cfg = super().from_dict(d)
        if d.get("model_type") == "qwen3_moe":
            cfg.qk_norm = True
            cfg.o_bias = cfg.attention_bias  # one flag for all four projections
        else:
            cfg.attention_bias = d.get("qkv_bias", True)  # q/k/v only
        return cfg

    def is_moe(self, i: int) -> bool:
        return i not in (self.mlp_only_layers or ()) and (i + 1) % self.decoder_sparse_step == 0


class SparseMoe(mixtral.SparseMoe):
    """Mixtral's routed experts plus, for Qwen2-MoE, a shared expert every token uses,
    scaled by its own sigmoid gate."""

    def __init__(self, cfg):
        super().__init__(cfg, cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x):
        out = mixtral.SparseMoe.forward(self, x)  # explicit: CPUDecoderLayer's MoE reuses this forward
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class Model(CausalLM):
    def make_layer(self, cfg, i):
        ffn = SparseMoe(cfg) if cfg.is_moe(i) else MLP(cfg.hidden_size, cfg.intermediate_size)
        return Block(cfg, ffn)


_MOE = "model.layers.{i}.mlp"

GGUF_NAMES = {
    **llama.GGUF_NAMES,
    **routed_gguf_names(_MOE),
    f"{_MOE}.shared_expert.gate_proj.weight": "blk.{i}.ffn_gate_shexp.weight",
    f"{_MOE}.shared_expert.up_proj.weight": "blk.{i}.ffn_up_shexp.weight",
    f"{_MOE}.shared_expert.down_proj.weight": "blk.{i}.ffn_down_shexp.weight",
    f"{_MOE}.shared_expert_gate.weight": "blk.{i}.ffn_gate_inp_shexp.weight",
}

GGUF_PERMUTED: dict[str, str] = {}  # llama.cpp's qwen2moe/qwen3moe keep Hugging Face's rotary layout

STACKED = {
    f"{_MOE}.experts.{p}": f"{_MOE}.experts.{{e}}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
}
