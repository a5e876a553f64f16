"""Mixtral: Llama attention with a sparse MoE feed-forward (`block_sparse_moe`): softmax
router, top-k experts renormalised to sum to one."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import llama
from .common import Block, CausalLM, Experts, routed_gguf_names

MODEL_TYPES = ("mixtral",)


@dataclass
class Config(llama.Config):
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True  # Mixtral always renormalises the chosen weights


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (ids [N, K], weights [N, K] float32): the k most probable experts
    under a softmax over all E, optionally renormalised to sum to one."""
    weights, ids = logits.float().softmax(-1).topk(k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights


class SparseMoe(nn.Module):
    """Router (`gate`, stays with the attention) and the stacked routed experts."""

    def __init__(self, cfg, intermediate: int):
        super().__init__()
        self.top_k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg.num_local_experts, cfg.hidden_size, intermediate)

    def forward(self, x):
        B, T, H = x.shape
        x = x.view(B * T, H)
        ids, weights = softmax_topk(self.gate(x), self.top_k, self.normalize)
        return self.experts(x, ids, weights).view(B, T, H)


class Model(CausalLM):
    def make_layer(self, cfg, i):
        return Block(cfg, SparseMoe(cfg, cfg.intermediate_size), ffn_name="block_sparse_moe")


_MOE = "model.layers.{i}.block_sparse_moe"

# Hugging Face name -> llama.cpp GGUF name (llama.cpp calls Mixtral "llama").
GGUF_NAMES = {
    **llama.GGUF_NAMES,
    **routed_gguf_names(_MOE),
}

GGUF_PERMUTED = llama.GGUF_PERMUTED

# Our stacked expert tensor -> the per-expert checkpoint tensors ({e}: expert) it is made of.
STACKED = {
    f"{_MOE}.experts.gate_proj": f"{_MOE}.experts.{{e}}.w1.weight",
    f"{_MOE}.experts.up_proj": f"{_MOE}.experts.{{e}}.w3.weight",
    f"{_MOE}.experts.down_proj": f"{_MOE}.experts.{{e}}.w2.weight",
}
