"""What every operator shares: it replaces one module kind, builds itself from the
module it replaces plus config plus its rule's kwargs, and loads its own tensors."""

from __future__ import annotations

import logging

import numba
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

Q = GGMLQuantizationType
log = logging.getLogger(__name__)
_FLOAT_TYPES = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}


class Operator(nn.Module):
    replaces: tuple[type, ...] = ()

    def __init__(self, original: nn.Module, config):
        super().__init__()
        # The checkpoint tensors this operator takes are the replaced module's parameters.
        self.original_shapes = {n: tuple(p.shape) for n, p in original.named_parameters()}

    @classmethod
    def refusal(cls, module: nn.Module, tensor, kwargs: dict) -> str | None:
        """Why this operator cannot take `module` with these tensors (None: it can), decided
        before any weight is read; the rules then go on to the next matching rule, or leave
        the module to torch. tensor(local_name) -> (GGML type, shape) or None.

        Every weight of 2 or more dimensions goes through the kernels, which read float rows
        in 32-value vectors and quantized ones (and `quant:`) in whole blocks."""
        from .kernels import SUPPORTED_TYPES

        quant = kwargs.get("quant")
        for name, param in module.named_parameters():
            info = tensor(name) if param.dim() >= 2 else None
            if info is None:
                continue
            qtype, shape = info
            cols = shape[-1]
            if qtype in (Q.F32, Q.F16, Q.BF16) or qtype not in SUPPORTED_TYPES:
                target = Q[str(quant).upper()] if quant and qtype in (Q.F32, Q.F16, Q.BF16) else qtype
                if qtype not in SUPPORTED_TYPES:
                    target = Q.Q8_0  # requantized at load (weight_array)
                need = max(32, GGML_QUANT_SIZES[target][0])
                if cols % need:
                    what = f"{qtype.name} as {target.name}" if target != qtype else qtype.name
                    return f"{name} ({what}, {list(shape)}) has {cols} columns, the kernels need a multiple of {need}"
        return None

    def load(self, get) -> None:
        """get(local_name) -> TensorRef (shape already checked)."""
        raise NotImplementedError

    def load_from_module(self, original: nn.Module) -> None:
        """Take weights from an in-memory module (used by `hybrid.inject`)."""
        from hybrid.files.checkpoint import TensorRef

        params = dict(original.named_parameters())

        def get(name):
            t = params[name].detach().cpu()
            raw = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            return TensorRef(name, tuple(t.shape), _FLOAT_TYPES[t.dtype], lambda r=raw: r)

        self.load(get)


def tensor_info(t: torch.Tensor) -> tuple[GGMLQuantizationType, tuple[int, ...]] | None:
    """(GGML type, shape) of an in-memory float tensor, as `Operator.refusal` takes it."""
    return (_FLOAT_TYPES[t.dtype], tuple(t.shape)) if t.dtype in _FLOAT_TYPES else None


def check_cpu(op: str, device) -> None:
    """Operators whose kernels run on the CPU accept no other device."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"{op} runs on the CPU; device {device!r} is not possible")


def thread_count(op: str, threads) -> int | None:
    """A rule's `threads` for the numba calls of `op`: a count, `half` (half of numba's
    threads: next to a GPU, the thread that launches the GPU work keeps cores of its own),
    or None (all of them)."""
    if threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        return threads
    if threads == "half":
        return max(1, numba.config.NUMBA_NUM_THREADS // 2)
    raise ValueError(f"{op}: threads must be a positive integer or 'half', not {threads!r}")


def check_quant(quant) -> None:
    from .quantize import QUANTIZABLE

    if quant is not None and str(quant).upper() not in QUANTIZABLE:
        raise ValueError(f"quant {quant!r} is not supported; choose one of {sorted(QUANTIZABLE)} or leave it out")


def weight_array(ref, quant) -> tuple[GGMLQuantizationType, np.ndarray]:
    """The stored form of a weight for the kernels: quantized GGUF blocks as they are;
    float weights quantized to `quant` when the rule asks for it, else kept as stored."""
    from .kernels import SUPPORTED_TYPES
    from .quantize import quantize

    data = ref.raw_rows() if hasattr(ref, "raw_rows") else ref.raw()
    if ref.qtype not in SUPPORTED_TYPES:  # e.g. Q2_K/Q3_K: no kernel yet, requantize once at load
        log.warning("%s: no kernel for %s; requantized to Q8_0 at load", ref.name, ref.qtype.name)
        quant = "Q8_0"
    elif quant is None or ref.qtype not in (Q.F32, Q.F16, Q.BF16):
        return ref.qtype, data
    target = Q[str(quant).upper()]
    full = ref.numpy().reshape(-1, ref.shape[-1])
    blocks = quantize(target, np.ascontiguousarray(full, dtype=np.float32))
    return target, blocks.reshape(*ref.shape[:-1], -1)
