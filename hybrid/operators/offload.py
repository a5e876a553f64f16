"""Prefill on another device for weights that live in host RAM (the `prefill_device` kwarg).

Decode reads each weight once per token and is bound by memory bandwidth, so the CPU
kernels are right for it. A long prompt is bound by arithmetic instead, where a GPU is far
ahead even after copying the weights over PCIe. With `prefill_device: cuda:0`, a CPU
operator that gets at least `prefill_min_tokens` tokens in one call dequantizes its weights
tile by tile (one expert at a time for the experts), copies each tile to that device and
computes there; the weights stay in host RAM and the device keeps no copy between calls.
"""

from __future__ import annotations

import numpy as np
import torch

from hybrid.models.common import routed_sum

from . import kernels
from .kernels import policy

# llama.cpp's threshold for the same trade: below it the copy costs more than it saves.
PREFILL_MIN_TOKENS = 32


def check_devices(op: str, device, generate_device, prefill_device, prefill_min_tokens) -> None:
    """Host-RAM operators decode on the CPU; only prefill may go elsewhere."""
    for key, value in (("device", device), ("generate_device", generate_device), ("prefill_device", prefill_device)):
        try:
            torch.device(value) if value is not None else None
        except RuntimeError as e:
            raise ValueError(f"{key}: {value!r} is not a device name (cpu, cuda, cuda:N)") from e
    for key, value in (("device", device), ("generate_device", generate_device)):
        if value is not None and torch.device(value).type != "cpu":
            raise ValueError(
                f"{op} keeps its weights in host RAM and decodes on the CPU; {key} {value!r} is not possible "
                f"(use prefill_device to compute long prompts on a GPU, or 'default' to keep the torch module on it)"
            )
    if not isinstance(prefill_min_tokens, int) or prefill_min_tokens < 1:
        raise ValueError(f"prefill_min_tokens must be a positive integer, not {prefill_min_tokens!r}")


class Prefill:
    """Where an operator computes calls of many tokens: `device` None keeps them on the CPU kernels."""

    def __init__(self, device, min_tokens: int = PREFILL_MIN_TOKENS):
        self.device = None if device is None else torch.device(device)
        self.min_tokens = min_tokens

    def wants(self, tokens: int) -> bool:
        return self.device is not None and tokens >= self.min_tokens

    def __repr__(self) -> str:
        return f"prefill_device={self.device}, prefill_min_tokens={self.min_tokens}"


def _weights(qtype, w: np.ndarray, device) -> torch.Tensor:
    """float32 [rows, cols] of host blocks `w`, on `device`."""
    return torch.from_numpy(kernels.dequantize(qtype, w)).to(device)


def linear(qtype, w: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """x [N, cols] float32 on the prefill device -> x @ W.T [N, rows] there; W [rows, row
    bytes] stays in host RAM and crosses over one tile of rows at a time."""
    rows, cols = w.shape[0], x.shape[1]
    tile = max(1, policy.OFFLOAD_TILE_BYTES // (4 * cols))
    out = torch.empty(x.shape[0], rows, dtype=torch.float32, device=x.device)
    for r0 in range(0, rows, tile):
        r1 = min(rows, r0 + tile)
        torch.matmul(x, _weights(qtype, w[r0:r1], x.device).T, out=out[:, r0:r1])
    return out


def experts(gate, up, down, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, biases=None, glu=None) -> torch.Tensor:
    """The routed-experts sum on x's device. gate/up/down: (qtype, host blocks [E, rows,
    row bytes]); x [N, H] float32, ids [N, K], weights [N, K], all on that device; biases,
    glu as `routed_sum` takes them."""
    return routed_sum(x, ids, weights, lambda e: tuple(_weights(q, w[e], x.device) for q, w in (gate, up, down)),
                      biases, glu)
