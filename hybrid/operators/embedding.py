"""Token embedding that keeps its table in the stored (quantized) form and dequantizes
only the rows looked up."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .base import Operator, check_cpu, check_quant, weight_array


class CPUEmbedding(Operator):
    replaces = (nn.Embedding,)

    def __init__(self, original: nn.Embedding, config, *, device: str = "cpu", quant: str | None = None):
        super().__init__(original, config)
        check_quant(quant)
        self.num_embeddings, self.embedding_dim, self.quant = original.num_embeddings, original.embedding_dim, quant

    @staticmethod
    def check_kwargs(device="cpu", quant=None):
        check_cpu("CPUEmbedding", device)
        check_quant(quant)

    def load(self, get) -> None:
        self.qtype, self.weight = weight_array(get("weight"), self.quant)

    def decode_bytes(self, top_k: int) -> int:
        return self.weight[0].nbytes  # one row per token

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.reshape(-1).cpu().numpy()
        out = torch.from_numpy(kernels.dequantize(self.qtype, self.weight[rows]))
        return out.view(*ids.shape, self.embedding_dim)
