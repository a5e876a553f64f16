"""A whole Llama-family, Mixtral or Qwen MoE decoder layer on the CPU: a decode step is one
numba call for the layer (norms, attention, residuals, MLP or router + experts); prefill
runs the block's own code over the same operators the per-module rules would use. And the
layer list whose decode step runs consecutive such layers as one call."""

from __future__ import annotations

import numba
import torch
from torch import nn

from hybrid.models import mixtral, qwen_moe
from hybrid.models.common import MLP, Attention, Block, Layers

from .attention import CPUAttention
from .base import Operator, check_cpu, check_quant
from .experts import CPUExperts
from .kernels import decode, layer, policy
from .kernels.activations import DEFAULT_ACTIVATIONS, check_activations
from .kernels.formats import as_blocks
from .kernels.records import DenseLayer, ExpertWeights, MoeLayer, Router, SharedExpert, plain
from .linear import CPULinear
from .mlp import CPUMLP
from .norm import CPURMSNorm


class _RoutedExperts(nn.Module):
    """A sparse MoE (router `gate` + `experts`, and Qwen2-MoE's `shared_expert` behind its
    sigmoid `shared_expert_gate`) with operator children; prefill runs its family's forward."""

    forward = qwen_moe.SparseMoe.forward  # Mixtral's, plus the shared expert where there is one

    def __init__(self, moe, config, quant, activations):
        super().__init__()
        if moe.gate.bias is not None:  # the layer kernel's router has none
            raise ValueError("CPUDecoderLayer: a router with a bias is not supported")
        self.top_k, self.normalize = moe.top_k, moe.normalize
        self.gate = CPULinear(moe.gate, config, quant=quant)  # the router's kernel takes int16
        self.experts = CPUExperts(moe.experts, config, quant=quant, activations=activations)
        if hasattr(moe, "shared_expert"):
            self.shared_expert = CPUMLP(moe.shared_expert, config, quant=quant, activations=activations)
            self.shared_expert_gate = CPULinear(moe.shared_expert_gate, config, quant=quant)

    def load(self, get) -> None:
        for name, child in self.named_children():
            child.load(lambda n, p=name: get(f"{p}.{n}"))

    def decode_bytes(self, top_k: int) -> int:
        return sum(child.decode_bytes(top_k) for child in self.children())

    def records(self) -> dict:
        """The router, experts and shared expert of a `records.MoeLayer`."""
        r, ex = self.gate.prepared, self.experts
        (tg, gate), (tu, up), (td, down) = (as_blocks(*w)[:2] for w in (ex.gate, ex.up, ex.down))
        shared = None
        if hasattr(self, "shared_expert"):
            g = self.shared_expert_gate.prepared
            shared = SharedExpert(mlp=self.shared_expert.args, tg=g.t, wg=g.w)
        return dict(router=Router(tr=r.t, wr=r.w, top_k=self.top_k, normalize=bool(self.normalize)),
                    experts=ExpertWeights(tg=tg, gate=gate, tu=tu, up=up, td=td, down=down, acts=ex.acts), shared=shared)


class CPUDecoderLayer(Operator):
    """Replaces a `Block` whose attention is Llama-family `Attention` and whose feed-forward
    is a dense `MLP` or a sparse MoE (Mixtral's; Qwen MoE's, with or without its shared
    expert): forward(x [B, T, hidden], rope, step, cache).

    Children are the per-module operators (CPURMSNorm, CPUAttention, CPUMLP, or CPULinear
    router + CPUExperts [+ CPUMLP shared expert]) under the block's own names, so
    checkpoints load unchanged and prefill (T > 1) runs `Block.forward` over them. A decode
    step (T = 1) is one numba call: `kernels.layer`."""

    replaces = (Block,)

    def __init__(self, original: Block, config, *, device: str = "cpu", quant: str | None = None, kv_dtype: str = "float32",
                 activations: str = DEFAULT_ACTIVATIONS):
        super().__init__(original, config)
        self.check_kwargs(device, quant, kv_dtype, activations)
        attn, self.ffn_name = original.self_attn, original.ffn_name
        ffn = original._modules[self.ffn_name]
        if type(attn) is not Attention or type(ffn) not in (MLP, mixtral.SparseMoe, qwen_moe.SparseMoe):
            raise ValueError(
                f"CPUDecoderLayer takes Llama-family attention with a dense MLP or a Mixtral or Qwen sparse MoE; "
                f"this block has {type(attn).__module__}.{type(attn).__name__} and {type(ffn).__module__}.{type(ffn).__name__}: "
                "place its modules one by one instead (CPUAttention, CPUMLP, CPUExperts, ...)"
            )
        self.input_layernorm = CPURMSNorm(original.input_layernorm, config)
        self.self_attn = CPUAttention(attn, config, quant=quant, kv_dtype=kv_dtype, activations=activations)
        self.post_attention_layernorm = CPURMSNorm(original.post_attention_layernorm, config)
        if type(ffn) is MLP:
            ffn_op = CPUMLP(ffn, config, quant=quant, activations=activations)
        else:
            ffn_op = _RoutedExperts(ffn, config, quant, activations)
        self.add_module(self.ffn_name, ffn_op)

    @staticmethod
    def check_kwargs(device="cpu", quant=None, kv_dtype="float32", activations=DEFAULT_ACTIVATIONS):
        check_cpu("CPUDecoderLayer", device)
        check_quant(quant)
        check_activations("CPUDecoderLayer", activations)
        CPUAttention.check_kwargs(kv_dtype=kv_dtype)

    @classmethod
    def refusal(cls, module, tensor, kwargs: dict) -> str | None:
        attn = module.self_attn
        if type(attn) is Attention and attn.head_dim > decode.MAX_D:
            return f"head_dim {attn.head_dim} is above the decode kernel's limit of {decode.MAX_D}"
        return super().refusal(module, tensor, kwargs)

    @property
    def ffn(self) -> nn.Module:
        return self._modules[self.ffn_name]

    def load(self, get) -> None:
        for name, child in self.named_children():
            child.load(lambda n, p=name: get(f"{p}.{n}"))
        n1, n2, attn = self.input_layernorm, self.post_attention_layernorm, self.self_attn.args
        norms = dict(norm1=n1.w, eps1=n1.eps, norm2=n2.w, eps2=n2.eps)
        if isinstance(self.ffn, CPUMLP):
            self.record = plain(DenseLayer(**norms, attn=attn, mlp=self.ffn.args))
        else:
            self.record = plain(MoeLayer(**norms, attn=attn, **self.ffn.records()))

    def decode_bytes(self, top_k: int) -> int:
        return sum(child.decode_bytes(top_k) for child in self.children())

    @staticmethod
    def takes(x: torch.Tensor) -> bool:
        """Whether a forward of x runs the decode kernel (else the block's torch code)."""
        B, T, _ = x.shape
        return T == 1 and B <= policy.MOE_FUSED_MAX_TOKENS and x.device.type == "cpu" and x.dtype == torch.float32

    def forward(self, x: torch.Tensor, rope, step, cache) -> torch.Tensor:
        B, T, C = x.shape
        if not self.takes(x):
            return Block.forward(self, x, rope, step, cache)
        cache.check_fits(step)
        xs = x.reshape(B, C).contiguous().numpy()
        kernel = layer.dense_layer_step if isinstance(self.ffn, CPUMLP) else layer.moe_layer_step
        y = kernel(xs, self.record, *cache.arrays, *rope.arrays, *step.arrays, numba.get_num_threads())
        return torch.from_numpy(y).view(B, T, C)


class CPUDecoderStack(Layers):
    """Replaces `model.layers` (`Layers`) and keeps the layers as its children under their
    own names (`model.layers.3.mlp` stays that), so the rules place each layer themselves
    and this operator is built after them. A decode step runs each run of consecutive
    `CPUDecoderLayer`s of one kind (and the same argument types) as one numba call
    (`kernels.layer.dense_stack_step`, `moe_stack_step`): between per-layer calls a step
    spent ~20 us a layer in Python (module call, arguments, array conversions). Other
    layers, layers with forward hooks, and prefill run each layer's own forward. The runs
    are worked out once per list of caches (and again when hooks come or go)."""

    replaces = (Layers,)
    keeps_children = True  # the layers are placed, swapped and loaded by their own rules

    def __init__(self, original: Layers, config, *, device: str = "cpu"):
        super().__init__(original)
        self.check_kwargs(device)
        self._key: tuple = ()
        self._plan: list[tuple] = []

    @staticmethod
    def check_kwargs(device="cpu"):
        check_cpu("CPUDecoderStack", device)

    def _make_plan(self, caches, hooked: tuple[int, ...]) -> list[tuple]:
        """[(kernel or None, (layer records, their cache arrays), layers, caches, smallest
        cache)] in layer order: a run of layers for one kernel call, or (None) one layer for
        its own forward."""
        plan, last_type = [], None
        for i, (lay, cache) in enumerate(zip(self, caches)):
            if not isinstance(lay, CPUDecoderLayer) or i in hooked:
                plan.append((None, ([], []), [lay], [cache]))
                last_type = None
                continue
            kernel = layer.dense_stack_step if isinstance(lay.ffn, CPUMLP) else layer.moe_stack_step
            this_type = (kernel, numba.typeof(lay.record), numba.typeof(cache.arrays))
            if this_type != last_type:
                plan.append((kernel, ([], []), [], []))
                last_type = this_type
            records, arrays = plan[-1][1]
            records.append(lay.record)
            arrays.append(cache.arrays)
            plan[-1][2].append(lay)
            plan[-1][3].append(cache)
        # the smallest cache of a run stands for all of them in the check that the step fits
        return [(kernel, (tuple(records), tuple(arrays)), layers, cs, min(cs, key=lambda c: c.k.shape[2]))
                for kernel, (records, arrays), layers, cs in plan]

    def forward(self, x: torch.Tensor, rope, step, caches) -> torch.Tensor:
        B, T, C = x.shape
        if T != 1:
            return super().forward(x, rope, step, caches)
        hooked = tuple(i for i, lay in enumerate(self) if lay._forward_hooks or lay._forward_pre_hooks)
        if self._key != (caches, hooked):
            self._plan, self._key = self._make_plan(caches, hooked), (caches, hooked)
        threads, xs = numba.get_num_threads(), None  # xs: x as numpy between kernel calls
        for kernel, args, layers, cs, smallest in self._plan:
            if kernel is not None and xs is None and CPUDecoderLayer.takes(x):
                xs = x.reshape(B, C).contiguous().numpy()
            if kernel is not None and xs is not None:
                smallest.check_fits(step)
                xs = kernel(xs, *args, *rope.arrays, *step.arrays, threads)
                continue
            if xs is not None:
                x, xs = torch.from_numpy(xs).view(B, T, C), None
            for lay, cache in zip(layers, cs):
                x = lay(x, rope, step, cache)
        return x if xs is None else torch.from_numpy(xs).view(B, T, C)
