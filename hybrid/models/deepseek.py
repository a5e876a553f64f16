"""DeepSeek V2 / V3: multi-head latent attention (MLA) and a MoE with shared experts.

V2 routes by softmax (optionally group-limited: best expert per group); V3 by sigmoid,
choosing with a learnt per-expert bias among the best groups (sum of each group's top
two), then renormalising. Both scale the routed output by `routed_scaling_factor`. The
first `first_k_dense_replace` layers are dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    MLP, BaseConfig, Block, CausalLM, Experts, RMSNorm, Rotary, _yarn_mscale, apply_rope, attend, rope_parameters,
    routed_gguf_names,
)

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass
class Config(BaseConfig):
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True
    num_local_experts: int = 64
    num_experts_per_tok: int = 6
    n_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = dict(d)
        if "n_routed_experts" in d:  # transformers' name; GGUF metadata gives num_local_experts
            d["num_local_experts"] = d["n_routed_experts"]
        if "qk_head_dim" in d and "rope_dimension_count" in d:  # GGUF: the full head and its rotary part
            d["qk_rope_head_dim"] = d["rope_dimension_count"]
            d["qk_nope_head_dim"] = d["qk_head_dim"] - d["rope_dimension_count"]
        if d.get("model_type") == "deepseek_v3":
            d.update(scoring_func="sigmoid", topk_method="noaux_tc")
        elif d.get("topk_method") is None:  # GGUF: group-limited when there are groups
            d["topk_method"] = "group_limited_greedy" if (d.get("n_group") or 1) > 1 else "greedy"
        d = {k: v for k, v in d.items() if v is not None}  # transformers writes nulls for unset groups
        cfg = super().from_dict(d)
        cfg.rope = rope_parameters(d)
        return cfg

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        if self.num_local_experts % self.n_group:
            raise ValueError(f"{self.num_local_experts} experts do not split into {self.n_group} groups")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class MLA(nn.Module):
    """Multi-head latent attention. Queries come straight from x (`q_proj`) or through a
    low-rank bottleneck (`q_a_proj` -> norm -> `q_b_proj`); keys and values come from one
    shared latent per token (`kv_a_proj_with_mqa` -> norm -> `kv_b_proj`), plus a rotary
    key part shared by all heads. The cache holds the per-head keys and values."""

    def __init__(self, cfg: Config):
        super().__init__()
        H, hidden = cfg.num_attention_heads, cfg.hidden_size
        self.n_heads, self.nope, self.rope_dim = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank, self.interleaved = cfg.kv_lora_rank, cfg.rope_interleave
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, cfg.kv_lora_rank + self.rope_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, hidden, bias=cfg.attention_bias)
        self.scale = cfg.qk_head_dim**-0.5
        rope = cfg.rope
        if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):  # YaRN's attention temperature
            self.scale *= _yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2

    def cache_shape(self) -> tuple[int, int, int]:
        return self.n_heads, self.nope + self.rope_dim, self.v_dim

    def forward(self, x, rope, step, cache):
        B, T, _ = x.shape
        H, R = self.n_heads, self.rope_dim
        if hasattr(self, "q_a_proj"):
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_rot = q.view(B, T, H, self.nope + R).transpose(1, 2).split([self.nope, R], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, R], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [B, H, T, nope], [B, H, T, v]
        cos, sin = rope
        q_rot = apply_rope(q_rot, cos, sin, self.interleaved)
        k_rot = apply_rope(k_rot.view(B, 1, T, R), cos, sin, self.interleaved)  # one rotary key for all heads
        q = torch.cat((q_nope, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(B, H, T, R)), dim=-1)
        k, v = cache.update(step, k, v)
        return self.o_proj(attend(q, k, v, cache.mask(step), self.scale))


class Router(nn.Module):
    """x [N, hidden] -> (ids [N, K], weights [N, K] float32), computed in float32."""

    def __init__(self, cfg: Config):
        super().__init__()
        E = cfg.num_local_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        self.sigmoid = cfg.scoring_func == "sigmoid"
        if self.sigmoid:  # V3: shifts which experts are chosen, not their weights
            self.e_score_correction_bias = nn.Parameter(torch.zeros(E))
        self.groups = cfg.n_group if cfg.topk_method in ("group_limited_greedy", "noaux_tc") else 1
        self.top_k, self.topk_group = cfg.num_experts_per_tok, cfg.topk_group
        self.normalize, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def forward(self, x):
        N, E, G = x.shape[0], self.weight.shape[0], self.groups
        logits = F.linear(x.float(), self.weight.float())
        if self.sigmoid:
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
        else:
            scores = choice = logits.softmax(-1)
        if G > 1:  # keep only the experts of the topk_group best groups
            grouped = choice.view(N, G, E // G)
            group_score = grouped.topk(2, dim=-1).values.sum(-1) if self.sigmoid else grouped.max(-1).values
            best = group_score.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros(N, G, dtype=torch.bool, device=x.device).scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


class MoE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x):
        B, T, H = x.shape
        flat = x.view(B * T, H)
        ids, weights = self.gate(flat)
        out = self.experts(flat, ids, weights).view(B, T, H)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out


class Model(CausalLM):
    def make_rotary(self, cfg):
        return Rotary(cfg.rope, cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_interleave)

    def make_layer(self, cfg, i):
        dense = i < cfg.first_k_dense_replace
        return Block(cfg, MLP(cfg.hidden_size, cfg.intermediate_size) if dense else MoE(cfg), MLA(cfg))


_L, _MLP = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"

GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    f"{_L}.q_proj.weight": "blk.{i}.attn_q.weight",
    f"{_L}.q_a_proj.weight": "blk.{i}.attn_q_a.weight",
    f"{_L}.q_a_proj.bias": "blk.{i}.attn_q_a.bias",
    f"{_L}.q_a_layernorm.weight": "blk.{i}.attn_q_a_norm.weight",
    f"{_L}.q_b_proj.weight": "blk.{i}.attn_q_b.weight",
    f"{_L}.kv_a_proj_with_mqa.weight": "blk.{i}.attn_kv_a_mqa.weight",
    f"{_L}.kv_a_proj_with_mqa.bias": "blk.{i}.attn_kv_a_mqa.bias",
    f"{_L}.kv_a_layernorm.weight": "blk.{i}.attn_kv_a_norm.weight",
    f"{_L}.kv_b_proj.weight": "blk.{i}.attn_kv_b.weight",
    f"{_L}.k_b": "blk.{i}.attn_k_b.weight",  # newer llama.cpp files: kv_b split, see merge_gguf
    f"{_L}.v_b": "blk.{i}.attn_v_b.weight",
    f"{_L}.o_proj.weight": "blk.{i}.attn_output.weight",
    f"{_L}.o_proj.bias": "blk.{i}.attn_output.bias",
    f"{_MLP}.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    f"{_MLP}.up_proj.weight": "blk.{i}.ffn_up.weight",
    f"{_MLP}.down_proj.weight": "blk.{i}.ffn_down.weight",
    **routed_gguf_names(_MLP),
    f"{_MLP}.gate.e_score_correction_bias": "blk.{i}.exp_probs_b.bias",
    f"{_MLP}.shared_experts.gate_proj.weight": "blk.{i}.ffn_gate_shexp.weight",
    f"{_MLP}.shared_experts.up_proj.weight": "blk.{i}.ffn_up_shexp.weight",
    f"{_MLP}.shared_experts.down_proj.weight": "blk.{i}.ffn_down_shexp.weight",
}

GGUF_PERMUTED: dict[str, str] = {}

STACKED = {
    f"{_MLP}.experts.{p}": f"{_MLP}.experts.{{e}}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
}


def merge_gguf(refs: dict, cfg: dict) -> None:
    """Newer llama.cpp files store kv_b_proj per head as k_b [H, kv_lora, nope] (transposed)
    and v_b [H, v, kv_lora]; rebuild kv_b_proj [H * (nope + v), kv_lora] from them."""
    from hybrid.files.checkpoint import Q, TensorRef

    for k_name in [n for n in refs if n.endswith(".self_attn.k_b")]:
        prefix = k_name[: -len("k_b")]
        k_b, v_b = refs.pop(k_name), refs.pop(prefix + "v_b")
        H, lora, nope = k_b.shape
        shape = (H * (nope + v_b.shape[1]), lora)

        def raw(k_b=k_b, v_b=v_b, shape=shape):
            k = k_b.numpy().reshape(H, lora, nope).transpose(0, 2, 1)
            return np.ascontiguousarray(np.concatenate([k, v_b.numpy().reshape(H, -1, lora)], axis=1).reshape(shape))

        refs[prefix + "kv_b_proj.weight"] = TensorRef(prefix + "kv_b_proj.weight", shape, Q.F32, raw)
