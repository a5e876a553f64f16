"""A whole Llama or Mixtral decoder layer on the CPU: a decode step is one numba call for
the layer (norms, attention, residuals, MLP or router + experts); prefill runs the block's
own code over the same operators the per-module rules would use."""

from __future__ import annotations

import numba
import torch
from torch import nn

from hybrid.models import mixtral
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
    """Mixtral's sparse MoE (router `gate` + `experts`) with operator children."""

    forward = mixtral.SparseMoe.forward

    def __init__(self, gate: CPULinear, experts: CPUExperts, top_k: int, normalize: bool):
        super().__init__()
        self.gate, self.experts, self.top_k, self.normalize = gate, experts, top_k, normalize


class CPUDecoderLayer(Operator):
    """Replaces a `Block` whose attention is Llama-family `Attention` and whose feed-forward
    is a dense `MLP` or Mixtral's `SparseMoe`: forward(x [B, T, hidden], rope, step, cache).

    Children are the per-module operators (CPURMSNorm, CPUAttention, CPUMLP, or CPULinear
    router + CPUExperts) under the block's own names, so checkpoints load unchanged and
    prefill (T > 1) runs `Block.forward` over them. A decode step (T = 1) is one numba
    call: `kernels.layer`."""

    replaces = (Block,)

    def __init__(self, original: Block, config, *, device: str = "cpu", quant: str | None = None, kv_dtype: str = "float32"):
        super().__init__(original, config)
        self.check_kwargs(device, quant, kv_dtype)
        attn, self.ffn_name = original.self_attn, original.ffn_name
        ffn = original._modules[self.ffn_name]
        if type(attn) is not Attention or type(ffn) not in (MLP, mixtral.SparseMoe):
            raise ValueError(
                f"CPUDecoderLayer takes Llama-family attention with a dense MLP or Mixtral's sparse MoE; "
                f"this block has {type(attn).__name__} and {type(ffn).__module__}.{type(ffn).__name__}: "
                "place its modules one by one instead (CPUAttention, CPUMLP, CPUExperts, ...)"
            )
        self.input_layernorm = CPURMSNorm(original.input_layernorm, config)
        self.self_attn = CPUAttention(attn, config, quant=quant, kv_dtype=kv_dtype)
        self.post_attention_layernorm = CPURMSNorm(original.post_attention_layernorm, config)
        if type(ffn) is MLP:
            self.add_module(self.ffn_name, CPUMLP(ffn, config, quant=quant))
        else:
            gate, experts = CPULinear(ffn.gate, config, quant=quant), CPUExperts(ffn.experts, config, quant=quant)
            self.add_module(self.ffn_name, _RoutedExperts(gate, experts, ffn.top_k, ffn.normalize))

    @staticmethod
    def check_kwargs(device="cpu", quant=None, kv_dtype="float32"):
        check_cpu("CPUDecoderLayer", device)
        check_quant(quant)
        CPUAttention.check_kwargs(kv_dtype=kv_dtype)

    @property
    def ffn(self) -> nn.Module:
        return self._modules[self.ffn_name]

    def load(self, get) -> None:
        def under(prefix):
            return lambda name: get(f"{prefix}.{name}")
        self.input_layernorm.load(under("input_layernorm"))
        self.self_attn.load(under("self_attn"))
        self.post_attention_layernorm.load(under("post_attention_layernorm"))
        a = self.self_attn
        self.attn_args = (*a.weights, *a.biases, *a.norms, a.eps)
        if isinstance(self.ffn, CPUMLP):
            self.ffn.load(under(self.ffn_name))
            self.ffn_args = self.ffn.weights
            return
        self.ffn.gate.load(under(f"{self.ffn_name}.gate"))
        self.ffn.experts.load(under(f"{self.ffn_name}.experts"))
        router = self.ffn.gate.prepared
        self.ffn_args = (router.t, router.w, self.ffn.top_k, bool(self.ffn.normalize))
        ex = self.ffn.experts
        self.experts_args = tuple(a for w in (ex.gate, ex.up, ex.down) for a in as_blocks(*w)[:2])
        if self.ffn.gate.bias is not None:
            raise ValueError("CPUDecoderLayer: a router with a bias is not supported")

    def decode_bytes(self, top_k: int) -> int:
        ffn = self.ffn
        parts = [self.input_layernorm, self.self_attn, self.post_attention_layernorm]
        parts += [ffn] if isinstance(ffn, CPUMLP) else [ffn.gate, ffn.experts]
        return sum(p.decode_bytes(top_k) for p in parts)

    def forward(self, x: torch.Tensor, rope, step, cache) -> torch.Tensor:
        B, T, C = x.shape
        if T > 1 or B > moe.FUSED_MAX_TOKENS or x.device.type != "cpu" or x.dtype != torch.float32:
            return Block.forward(self, x, rope, step, cache)
        cache.check_fits(step)
        cos, sin = rope  # [B, 1, D] at each sequence's position
        k, v = cache.arrays
        step_args = (cos.reshape(B, -1).numpy(), sin.reshape(B, -1).numpy(), k, v, *step.arrays, self.self_attn.scale)
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        xs, threads = x.reshape(B, C).contiguous().numpy(), numba.get_num_threads()
        if isinstance(self.ffn, CPUMLP):
            y = layer.dense_layer_step(xs, n1.w, n1.eps, n2.w, n2.eps, self.attn_args, step_args, self.ffn_args, threads)
        else:
            ex = self.ffn.experts
            chunks = gemv_chunks(min(ex.hidden, ex.intermediate))
            y = layer.moe_layer_step(xs, n1.w, n1.eps, n2.w, n2.eps, self.attn_args, step_args, self.ffn_args,
                                     self.experts_args, chunks, threads)
        return torch.from_numpy(y).view(B, T, C)
