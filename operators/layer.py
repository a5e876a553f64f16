"""A whole Llama-family, Mixtral or Qwen MoE decoder layer on the CPU: a decode step is one
numba call for the layer (norms, attention, residuals, MLP or router + experts); prefill
runs the block's own code over the same operators the per-module rules would use."""

from __future__ import annotations

import numba
import torch
from torch import nn

from hybrid.models import mixtral, qwen_moe
from hybrid.models.common import MLP, Attention, Block

from .attention import CPUAttention
from .base import Operator, check_cpu, check_quant
from .experts import CPUExperts
from .kernels import layer, moe
from .kernels.formats import as_blocks
from .kernels.linear import gemv_chunks
from .linear import CPULinear
from .mlp import CPUMLP
from .norm import CPURMSNorm


class _RoutedExperts(nn.Module):
    """A sparse MoE (router `gate` + `experts`, and Qwen2-MoE's `shared_expert` behind its
    sigmoid `shared_expert_gate`) with operator children; prefill runs its family's forward."""

    forward = qwen_moe.SparseMoe.forward  # Mixtral's, plus the shared expert where there is one

    def __init__(self, moe, config, quant):
        super().__init__()
        if moe.gate.bias is not None:  # the layer kernel's router has none
            raise ValueError("CPUDecoderLayer: a router with a bias is not supported")
        self.top_k, self.normalize = moe.top_k, moe.normalize
        self.gate, self.experts = CPULinear(moe.gate, config, quant=quant), CPUExperts(moe.experts, config, quant=quant)
        if hasattr(moe, "shared_expert"):
            self.shared_expert = CPUMLP(moe.shared_expert, config, quant=quant)
            self.shared_expert_gate = CPULinear(moe.shared_expert_gate, config, quant=quant)

    def load(self, get) -> None:
        for name, child in self.named_children():
            child.load(lambda n, p=name: get(f"{p}.{n}"))

    def decode_bytes(self, top_k: int) -> int:
        return sum(child.decode_bytes(top_k) for child in self.children())

    def kernel_args(self) -> tuple:
        """(router, experts, shared) as `kernels.layer.moe_layer_step` takes them."""
        router = (self.gate.prepared.t, self.gate.prepared.w, self.top_k, bool(self.normalize))
        ex = self.experts
        experts = tuple(a for w in (ex.gate, ex.up, ex.down) for a in as_blocks(*w)[:2])
        shared = None
        if hasattr(self, "shared_expert"):
            g = self.shared_expert_gate.prepared
            shared = (*self.shared_expert.weights, g.t, g.w)
        return router, experts, shared


class CPUDecoderLayer(Operator):
    """Replaces a `Block` whose attention is Llama-family `Attention` and whose feed-forward
    is a dense `MLP` or a sparse MoE (Mixtral's; Qwen MoE's, with or without its shared
    expert): forward(x [B, T, hidden], rope, step, cache).

    Children are the per-module operators (CPURMSNorm, CPUAttention, CPUMLP, or CPULinear
    router + CPUExperts [+ CPUMLP shared expert]) under the block's own names, so
    checkpoints load unchanged and prefill (T > 1) runs `Block.forward` over them. A decode
    step (T = 1) is one numba call: `kernels.layer`."""

    replaces = (Block,)

    def __init__(self, original: Block, config, *, device: str = "cpu", quant: str | None = None, kv_dtype: str = "float32"):
        super().__init__(original, config)
        self.check_kwargs(device, quant, kv_dtype)
        attn, self.ffn_name = original.self_attn, original.ffn_name
        ffn = original._modules[self.ffn_name]
        if type(attn) is not Attention or type(ffn) not in (MLP, mixtral.SparseMoe, qwen_moe.SparseMoe):
            raise ValueError(
                f"CPUDecoderLayer takes Llama-family attention with a dense MLP or a Mixtral or Qwen sparse MoE; "
                f"this block has {type(attn).__module__}.{type(attn).__name__} and {type(ffn).__module__}.{type(ffn).__name__}: "
                "place its modules one by one instead (CPUAttention, CPUMLP, CPUExperts, ...)"
            )
        self.input_layernorm = CPURMSNorm(original.input_layernorm, config)
        self.self_attn = CPUAttention(attn, config, quant=quant, kv_dtype=kv_dtype)
        self.post_attention_layernorm = CPURMSNorm(original.post_attention_layernorm, config)
        ffn_op = CPUMLP(ffn, config, quant=quant) if type(ffn) is MLP else _RoutedExperts(ffn, config, quant)
        self.add_module(self.ffn_name, ffn_op)

    @staticmethod
    def check_kwargs(device="cpu", quant=None, kv_dtype="float32"):
        check_cpu("CPUDecoderLayer", device)
        check_quant(quant)
        CPUAttention.check_kwargs(kv_dtype=kv_dtype)

    @property
    def ffn(self) -> nn.Module:
        return self._modules[self.ffn_name]

    def load(self, get) -> None:
        for name, child in self.named_children():
            child.load(lambda n, p=name: get(f"{p}.{n}"))
        self.ffn_args = self.ffn.weights if isinstance(self.ffn, CPUMLP) else self.ffn.kernel_args()

    def decode_bytes(self, top_k: int) -> int:
        return sum(child.decode_bytes(top_k) for child in self.children())

    def forward(self, x: torch.Tensor, rope, step, cache) -> torch.Tensor:
        B, T, C = x.shape
        if T > 1 or B > moe.FUSED_MAX_TOKENS or x.device.type != "cpu" or x.dtype != torch.float32:
            return Block.forward(self, x, rope, step, cache)
        attn, step_args = self.self_attn.args, self.self_attn.step_args(rope, step, cache)
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        xs, threads = x.reshape(B, C).contiguous().numpy(), numba.get_num_threads()
        if isinstance(self.ffn, CPUMLP):
            y = layer.dense_layer_step(xs, n1.w, n1.eps, n2.w, n2.eps, attn, step_args, self.ffn_args, threads)
        else:
            ex = self.ffn.experts
            chunks = gemv_chunks(min(ex.hidden, ex.intermediate))
            y = layer.moe_layer_step(xs, n1.w, n1.eps, n2.w, n2.eps, attn, step_args, *self.ffn_args, chunks, threads)
        return torch.from_numpy(y).view(B, T, C)
