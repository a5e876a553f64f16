"""One layer's routed experts split between two devices: some experts in torch on `device`
(a GPU with room for part of the layer), the others in host RAM on the numba fused MoE.
Both shares compute the same tokens, each skipping the experts it does not hold, and their
outputs are summed. `hybrid fit` uses it for the layer at the edge of the GPU budget."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from hybrid.models.common import Experts, routed_sum

from . import kernels, offload
from .base import Operator, check_quant, thread_count, weight_array
from .kernels.activations import DEFAULT_ACTIVATIONS, check_activations

Q = GGMLQuantizationType
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# The CPU share of a layer whose other share is on a GPU runs here, while the calling thread
# launches the GPU share (the numba kernels release the GIL).
_cpu_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="split-experts")


def expert_ids(experts) -> list[int]:
    """`experts` kwarg (n: the first n; or a list of ids) -> sorted expert ids."""
    ok = isinstance(experts, (int, list)) and not isinstance(experts, bool)
    ids = (list(range(experts)) if isinstance(experts, int) else sorted(set(experts))) if ok else []
    if not ok or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
        raise ValueError(f"experts must be a count or a list of expert ids, not {experts!r}")
    if not ids or ids[0] < 0:
        raise ValueError(f"experts {experts!r}: give at least one expert, ids from 0")
    return ids


def chosen_experts(experts, num_experts: int) -> list[int]:
    """`expert_ids`, checked against a layer of `num_experts`: some, not all."""
    ids = expert_ids(experts) if experts != 0 else []
    if not ids or len(ids) >= num_experts or ids[-1] >= num_experts:
        raise ValueError(f"experts {experts!r}: give between 1 and {num_experts - 1} of the layer's {num_experts} "
                         f"experts (ids 0..{num_experts - 1}); for all or none use `default` or CPUExperts")
    return ids


class SplitExperts(Operator):
    """Replaces `Experts` (gate_proj/up_proj [E, I, H], down_proj [E, H, I]). `experts` (the
    first n, or a list of ids) run in torch on `device` in `dtype`, the rest on the CPU
    kernels over the stored (quantized) blocks (`quant`, `activations`, `threads`,
    `prefill_device` as for CPUExperts)."""

    replaces = (Experts,)

    def __init__(
        self, original: Experts, config, *, experts, device: str = "cuda:0", dtype: str = "bfloat16",
        quant: str | None = None, threads: int | str | None = None, activations: str = DEFAULT_ACTIVATIONS,
        prefill_device: str | None = None, prefill_min_tokens: int = offload.PREFILL_MIN_TOKENS,
    ):
        super().__init__(original, config)
        self.check_kwargs(experts, device, dtype, quant, threads, activations, prefill_device, prefill_min_tokens)
        if original.biases is not None or original.glu is not None:
            raise ValueError("SplitExperts does not take experts with biases or a clamped SwiGLU (gpt-oss): place "
                             "them with CPUExperts, or leave them in torch (replace: {class: default})")
        self.num_experts, self.hidden, self.intermediate = original.num_experts, original.hidden, original.intermediate
        self.torch_ids = chosen_experts(experts, self.num_experts)
        self.cpu_ids = [e for e in range(self.num_experts) if e not in set(self.torch_ids)]
        self.device, self.dtype = torch.device(device), _DTYPES[dtype]
        self.quant, self.acts = quant, check_activations("SplitExperts", activations)
        self.threads = thread_count("SplitExperts", threads)
        self.prefill = offload.Prefill(prefill_device, prefill_min_tokens)
        # expert id -> its index in the share that holds it (-1: the other share), per share
        self.register_buffer("torch_index", self._index(self.torch_ids), persistent=False)
        self.register_buffer("cpu_index", self._index(self.cpu_ids), persistent=False)

    def _index(self, ids: list[int]) -> torch.Tensor:
        table = torch.full((self.num_experts + 1,), -1, dtype=torch.int64, device="cpu")  # [E] is for id -1
        table[ids] = torch.arange(len(ids), device="cpu")
        return table

    @staticmethod
    def check_kwargs(experts=None, device="cuda:0", dtype="bfloat16", quant=None, threads=None,
                     activations=DEFAULT_ACTIVATIONS, prefill_device=None, prefill_min_tokens=offload.PREFILL_MIN_TOKENS):
        if experts is None:
            raise ValueError("SplitExperts needs `experts`: how many (the first n) or which expert ids run on `device`")
        if experts != 0:
            expert_ids(experts)  # the type; the range is checked against the layer when built
        try:
            torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device: {device!r} is not a device name (cpu, cuda, cuda:N)") from e
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        offload.check_devices("SplitExperts", "cpu", None, prefill_device, prefill_min_tokens)
        check_quant(quant)
        thread_count("SplitExperts", threads)
        check_activations("SplitExperts", activations)

    @classmethod
    def device_bytes(cls, module: Experts, tensor, kwargs: dict) -> dict[str, int]:
        """Bytes on each device before loading: the torch share dequantized to `dtype`, the
        CPU share as stored (or as its `quant`). tensor(local_name) -> TensorRef or None."""
        E = module.num_experts
        n = len(chosen_experts(kwargs["experts"], E))
        itemsize = _DTYPES[kwargs.get("dtype", "bfloat16")].itemsize
        quant = kwargs.get("quant")
        on_device = on_cpu = 0
        for name in _PROJECTIONS:
            ref = tensor(name)
            numel = math.prod(getattr(module, name).shape)
            on_device += numel // E * n * itemsize
            if ref is None:
                continue
            stored = ref.nbytes
            if quant and ref.qtype in (Q.F32, Q.F16, Q.BF16):
                block, size = GGML_QUANT_SIZES[Q[str(quant).upper()]]
                stored = numel // block * size
            on_cpu += stored // E * (E - n)
        return {kwargs.get("device", "cuda:0"): on_device, "cpu": on_cpu}

    def load(self, get) -> None:
        device_share, cpu_share = [], []
        for name in _PROJECTIONS:
            qtype, w = weight_array(get(name), self.quant)  # [E, rows, row bytes], memory-mapped
            cpu_share.append((qtype, _take(w, self.cpu_ids)))
            rows = w.shape[1]
            cols = self.intermediate if name == "down_proj" else self.hidden
            share = torch.empty(len(self.torch_ids), rows, cols, dtype=self.dtype, device=self.device)
            for i, e in enumerate(self.torch_ids):  # one expert at a time: no second copy of the share
                share[i] = torch.from_numpy(kernels.dequantize(qtype, w[e]))
            device_share.append(share)
        self.cpu_gate, self.cpu_up, self.cpu_down = cpu_share
        self.gate_proj, self.up_proj, self.down_proj = device_share

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ids = ids.to("cpu", torch.int64)
        ids = torch.where(ids < 0, self.num_experts, ids)  # -1 (no expert) reads the table's last entry, -1
        cpu_ids, torch_ids = self.cpu_index[ids], self.torch_index[ids]
        if self.device.type == "cpu":
            out = self._cpu_share(x, cpu_ids, weights).to(x.device) + self._torch_share(x, torch_ids, weights)
            return out.to(x.dtype)
        pending = _cpu_worker.submit(self._cpu_share, x.detach().to("cpu"), cpu_ids, weights.to("cpu"))
        out = self._torch_share(x, torch_ids, weights)
        return (out.to(x.device, torch.float32) + pending.result().to(x.device)).to(x.dtype)

    def _torch_share(self, x, ids, weights) -> torch.Tensor:
        """float32 [N, H] on x's device: the experts held in torch."""
        d = self.device
        out = routed_sum(x.to(d, self.dtype), ids.to(d), weights.to(d),
                         lambda e: (self.gate_proj[e], self.up_proj[e], self.down_proj[e]))
        return out.to(x.device, torch.float32)

    def _cpu_share(self, x, ids, weights) -> torch.Tensor:
        """float32 [N, H] on the CPU: the experts held in host RAM, on the fused kernel
        (or, for a long call with `prefill_device`, streamed to that device)."""
        if self.prefill.wants(x.shape[0]):
            d = self.prefill.device
            out = offload.experts(self.cpu_gate, self.cpu_up, self.cpu_down, x.to(d, torch.float32), ids.to(d),
                                  weights.to(d))
            return out.to("cpu", torch.float32)
        out = kernels.moe_forward(
            *self.cpu_gate, *self.cpu_up, *self.cpu_down,
            x.to("cpu", torch.float32).contiguous().numpy(), ids.contiguous().numpy(),
            weights.to("cpu", torch.float32).contiguous().numpy(), threads=self.threads, acts=self.acts,
        )
        return torch.from_numpy(out)

    def warm_up_kernels(self) -> None:
        """As `CPUExperts.warm_up_kernels`, for the experts held in host RAM."""
        if self.cpu_ids:
            kernels.moe_warm_up(*self.cpu_gate, *self.cpu_up, *self.cpu_down, threads=self.threads, acts=self.acts)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, on {self.device}: {len(self.torch_ids)}, on cpu: {len(self.cpu_ids)}, "
                f"hidden={self.hidden}, intermediate={self.intermediate}")


def _take(w, ids: list[int]):
    """The experts `ids` of stacked blocks [E, ...]: a view when they are one run (no copy
    of memory-mapped weights), else a copy."""
    if ids == list(range(ids[0], ids[-1] + 1)):
        return w[ids[0] : ids[-1] + 1]
    return w[ids]
