"""CPU linear layer on quantized (or float) weights, computed by the numba kernels."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels, offload
from .base import Operator, check_quant, thread_count, weight_array
from .kernels.activations import DEFAULT_ACTIVATIONS, check_activations


class CPULinear(Operator):
    """Replaces nn.Linear. Weight [out, in] stays in its stored GGUF form (raw blocks);
    `quant` quantizes float checkpoints at load (q8_0, q4_0, ...); `activations` (int8,
    int16 or float) is the form x takes in the quantized dot products (`kernels.activations`)."""

    replaces = (nn.Linear,)

    def __init__(
        self, original: nn.Linear, config, *, device: str = "cpu", quant: str | None = None, threads: int | str | None = None,
        generate_device: str | None = None, prefill_device: str | None = None, prefill_min_tokens: int = offload.PREFILL_MIN_TOKENS,
        activations: str = DEFAULT_ACTIVATIONS,
    ):
        super().__init__(original, config)
        self.check_kwargs(device, quant, threads, generate_device, prefill_device, prefill_min_tokens, activations)
        self.acts = check_activations("CPULinear", activations)
        self.in_features, self.out_features = original.in_features, original.out_features
        self.quant, self.threads = quant, thread_count("CPULinear", threads)
        self.prefill = offload.Prefill(prefill_device, prefill_min_tokens)
        self.has_bias = original.bias is not None

    @staticmethod
    def check_kwargs(device="cpu", quant=None, threads=None, generate_device=None, prefill_device=None,
                     prefill_min_tokens=offload.PREFILL_MIN_TOKENS, activations=DEFAULT_ACTIVATIONS):
        offload.check_devices("CPULinear", device, generate_device, prefill_device, prefill_min_tokens)
        check_quant(quant)
        thread_count("CPULinear", threads)
        check_activations("CPULinear", activations)

    def load(self, get) -> None:
        self.qtype, self.weight = weight_array(get("weight"), self.quant)
        self.prepared = kernels.Prepared(self.qtype, self.weight, self.acts)
        self.bias = get("bias").tensor() if self.has_bias else None

    def decode_bytes(self, top_k: int) -> int:
        return self.weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.prefill.wants(lead.numel()):
            y = offload.linear(self.qtype, self.weight, x.reshape(-1, self.in_features).to(self.prefill.device, torch.float32))
            if self.bias is not None:
                y += self.bias.to(y.device)
            return y.view(*lead, self.out_features).to(x.device, x.dtype)
        flat = x.reshape(-1, self.in_features).to("cpu", torch.float32).contiguous().numpy()
        if flat.shape[0] == 1 and self.threads is None:  # decode: the lean path
            y = torch.empty(1, self.out_features)
            self.prepared.gemv(flat[0], y.numpy()[0])
        else:
            y = torch.from_numpy(kernels.matmul(self.qtype, self.weight, flat, threads=self.threads, acts=self.acts))
        if self.bias is not None:
            y += self.bias
        return y.view(*lead, self.out_features).to(x.device, x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={getattr(self, 'qtype', None)!s}"
