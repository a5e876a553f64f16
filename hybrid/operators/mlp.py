"""CPU gated MLP: a decode step is one numba call (gate, up, SiLU, down)."""

from __future__ import annotations

import numba
import torch

from hybrid.models.common import MLP

from .base import Operator, check_cpu, check_quant
from .kernels import decode, policy
from .kernels.activations import DEFAULT_ACTIVATIONS, check_activations
from .kernels.records import MlpWeights, plain
from .linear import CPULinear


class CPUMLP(Operator):
    """Replaces `MLP`: forward(x [..., hidden]) -> [..., hidden]. Calls of up to
    policy.MLP_FUSED_MAX_TOKENS tokens are one numba call for gate, up, SiLU and down; longer calls
    run the module's own code with the projections on the numba kernels."""

    replaces = (MLP,)

    def __init__(self, original: MLP, config, *, device: str = "cpu", quant: str | None = None,
                 activations: str = DEFAULT_ACTIVATIONS):
        super().__init__(original, config)
        self.check_kwargs(device, quant, activations)
        self.acts = check_activations("CPUMLP", activations)
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, CPULinear(getattr(original, name), config, quant=quant, activations=activations))

    @staticmethod
    def check_kwargs(device="cpu", quant=None, activations=DEFAULT_ACTIVATIONS):
        check_cpu("CPUMLP", device)
        check_quant(quant)
        check_activations("CPUMLP", activations)

    def load(self, get) -> None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self, name).load(lambda n, p=name: get(f"{p}.{n}"))
        g, u, d = (p.prepared for p in (self.gate_proj, self.up_proj, self.down_proj))
        self.args = plain(MlpWeights(tg=g.t, wg=g.w, tu=u.t, wu=u.w, td=d.t, wd=d.w, acts=self.acts))

    def decode_bytes(self, top_k: int) -> int:
        return sum(p.decode_bytes(top_k) for p in (self.gate_proj, self.up_proj, self.down_proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, C = x.shape[:-1], x.shape[-1]
        if lead.numel() > policy.MLP_FUSED_MAX_TOKENS or x.device.type != "cpu" or x.dtype != torch.float32:
            return MLP.forward(self, x)
        y = decode.mlp_step(x.reshape(-1, C).contiguous().numpy(), self.args, numba.get_num_threads())
        return torch.from_numpy(y).view(*lead, C)
