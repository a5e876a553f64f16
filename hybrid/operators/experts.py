"""Routed experts on the CPU: one fused numba call per MoE layer over the stored
(quantized) stacked expert weights."""

from __future__ import annotations

import torch

from hybrid.models.common import Experts

from . import kernels, offload
from .base import Operator, check_quant, thread_count, weight_array
from .kernels.activations import DEFAULT_ACTIVATIONS, check_activations


class CPUExperts(Operator):
    """Replaces `Experts` (gate_proj/up_proj [E, I, H], down_proj [E, H, I], and their
    biases where the family has them, as gpt-oss with its clamped SwiGLU). Hidden states
    come from whatever device the router ran on and go back there."""

    replaces = (Experts,)

    def __init__(
        self, original: Experts, config, *, device: str = "cpu", quant: str | None = None, threads: int | str | None = None,
        generate_device: str | None = None, prefill_device: str | None = None, prefill_min_tokens: int = offload.PREFILL_MIN_TOKENS,
        activations: str = DEFAULT_ACTIVATIONS,
    ):
        super().__init__(original, config)
        self.check_kwargs(device, quant, threads, generate_device, prefill_device, prefill_min_tokens, activations)
        self.acts = check_activations("CPUExperts", activations)
        self.num_experts, self.hidden, self.intermediate = original.num_experts, original.hidden, original.intermediate
        self.quant, self.threads = quant, thread_count("CPUExperts", threads)
        self.glu, self.has_bias = original.glu, original.biases is not None
        self.bias = None
        self.prefill = offload.Prefill(prefill_device, prefill_min_tokens)

    @staticmethod
    def check_kwargs(device="cpu", quant=None, threads=None, generate_device=None, prefill_device=None,
                     prefill_min_tokens=offload.PREFILL_MIN_TOKENS, activations=DEFAULT_ACTIVATIONS):
        offload.check_devices("CPUExperts", device, generate_device, prefill_device, prefill_min_tokens)
        check_quant(quant)
        thread_count("CPUExperts", threads)
        check_activations("CPUExperts", activations)

    def load(self, get) -> None:
        self.gate = weight_array(get("gate_proj"), self.quant)
        self.up = weight_array(get("up_proj"), self.quant)
        self.down = weight_array(get("down_proj"), self.quant)
        if self.has_bias:
            self.bias = tuple(get(f"{p}_proj_bias").tensor().to(torch.float32).contiguous() for p in ("gate", "up", "down"))

    def decode_bytes(self, top_k: int) -> int:
        """A token reads top_k of the experts."""
        return sum(w.nbytes for _, w in (self.gate, self.up, self.down)) * top_k // self.num_experts

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.prefill.wants(x.shape[0]):
            d = self.prefill.device
            out = offload.experts(self.gate, self.up, self.down, x.to(d, torch.float32), ids.to(d), weights.to(d),
                                  self.bias, self.glu)
            return out.to(x.device, x.dtype)
        xs = x.to("cpu", torch.float32).contiguous().numpy()
        out = kernels.moe_forward(
            *self.gate, *self.up, *self.down, xs,
            ids.to("cpu", torch.int64).contiguous().numpy(),
            weights.to("cpu", torch.float32).contiguous().numpy(),
            threads=self.threads,
            acts=self.acts,
            bias=None if self.bias is None else tuple(b.numpy() for b in self.bias),
            glu=self.glu,
        )
        return torch.from_numpy(out).to(x.device, x.dtype)

    def warm_up_kernels(self) -> None:
        """Compile (or load) the experts' panel kernel, which only prompts with many tokens
        per expert reach."""
        kernels.moe_warm_up(*self.gate, *self.up, *self.down, threads=self.threads, acts=self.acts,
                            bias=None if self.bias is None else tuple(b.numpy() for b in self.bias), glu=self.glu)

    def extra_repr(self) -> str:
        glu = "" if self.glu is None else f", clamped SwiGLU (limit, alpha)={self.glu}"
        return f"experts={self.num_experts}, hidden={self.hidden}, intermediate={self.intermediate}, bias={self.has_bias}{glu}"
