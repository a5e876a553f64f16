"""CPU attention for the Llama family (GQA, optional q/k/v bias, q/k RMSNorm) and the
families built on it (Gemma 3's sliding windows, gpt-oss's windows and sinks): a decode
step is one numba call per layer; prefill runs the module's own torch code with the
projections on the numba kernels."""

from __future__ import annotations

import numba
import torch

from hybrid.models.common import Attention, KVCache, Step
from hybrid.models import gpt_oss

from .base import Operator, check_cpu, check_quant
from .kernels import decode
from .kernels.activations import DEFAULT_ACTIVATIONS, check_activations
from .kernels.records import AttentionWeights, plain
from .linear import CPULinear
from .norm import CPURMSNorm

KV_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_NONE = torch.empty(0)  # "no bias" / "no norm" for the kernel


class CPUAttention(Operator):
    """Replaces `Attention`: forward(x [B, T, hidden], rope, step, cache) -> [B, T, hidden].

    With T = 1 (decode, any number of sequences at their own slots and lengths) one numba
    call computes q/k/v from the stored weights, adds bias, normalises q/k, rotates, writes
    k/v into the cache, attends over each sequence's keys in place (no gather) and applies
    o_proj. `kv_dtype: float16` halves the KV cache and the bytes long-context decode reads.
    """

    replaces = (Attention,)

    def attend(self, q, k, v, mask):
        """Prefill's attention (Attention.forward runs over this operator): with sinks, as
        gpt-oss computes it."""
        if self.has_sinks:
            return gpt_oss.attend_with_sinks(q, k, v, mask, self.scale, self.sinks)
        return Attention.attend(self, q, k, v, mask)

    def __init__(self, original: Attention, config, *, device: str = "cpu", quant: str | None = None, kv_dtype: str = "float32",
                 activations: str = DEFAULT_ACTIVATIONS):
        super().__init__(original, config)
        self.check_kwargs(device, quant, kv_dtype, activations)
        self.acts = check_activations("CPUAttention", activations)
        if getattr(original, "rotary_dim", original.head_dim) != original.head_dim:
            raise ValueError(
                f"partial rotary ({original.rotary_dim} of {original.head_dim} dimensions) is not in the decode "
                "kernel: leave this layer's attention in torch (replace: {class: default})"
            )
        # The kernel computes the common softmax attention, and gpt-oss's with its sinks.
        self.has_sinks = type(original).attend is gpt_oss.Attention.attend
        if type(original).attend is not Attention.attend and not self.has_sinks:
            raise ValueError(f"{type(original).__name__} attends its own way, which the decode kernel does not: "
                             "leave this layer's attention in torch (replace: {class: default})")
        self.sliding_window = original.sliding_window  # the cache the model makes for it is a ring of its window
        self.n_heads, self.n_kv_heads, self.head_dim = original.n_heads, original.n_kv_heads, original.head_dim
        self.scale, self.kv_dtype = original.scale, KV_DTYPES[kv_dtype]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, CPULinear(getattr(original, name), config, quant=quant, activations=activations))
        self.eps = 0.0
        if hasattr(original, "q_norm"):  # prefill's q/k norms on the kernel too
            self.eps = original.q_norm.eps
            self.q_norm, self.k_norm = CPURMSNorm(original.q_norm, config), CPURMSNorm(original.k_norm, config)

    @staticmethod
    def check_kwargs(device="cpu", quant=None, kv_dtype="float32", activations=DEFAULT_ACTIVATIONS):
        check_cpu("CPUAttention", device)
        check_quant(quant)
        check_activations("CPUAttention", activations)
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype {kv_dtype!r} is not one of {sorted(KV_DTYPES)}")

    @classmethod
    def refusal(cls, module, tensor, kwargs: dict) -> str | None:
        if module.head_dim > decode.MAX_D:
            return f"head_dim {module.head_dim} is above the decode kernel's limit of {decode.MAX_D}"
        return super().refusal(module, tensor, kwargs)

    def load(self, get) -> None:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(self, name).load(lambda n, p=name: get(f"{p}.{n}"))
        if hasattr(self, "q_norm"):
            self.q_norm.load(lambda n: get(f"q_norm.{n}"))
            self.k_norm.load(lambda n: get(f"k_norm.{n}"))
        self.sinks = get("sinks").tensor().to(torch.float32) if self.has_sinks else _NONE
        projections = (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        q, k, v, o = (p.prepared for p in projections)
        bq, bk, bv, bo = ((p.bias if p.bias is not None else _NONE).numpy() for p in projections)
        qn, kn = (self.q_norm.w, self.k_norm.w) if hasattr(self, "q_norm") else (_NONE.numpy(), _NONE.numpy())
        self.args = plain(AttentionWeights(
            tq=q.t, wq=q.w, tk=k.t, wk=k.w, tv=v.t, wv=v.w, to=o.t, wo=o.w, bq=bq, bk=bk, bv=bv, bo=bo, qn=qn, kn=kn,
            eps=self.eps, scale=self.scale, acts=self.acts, window=self.sliding_window or 0, sinks=self.sinks.numpy(),
        ))

    def decode_bytes(self, top_k: int) -> int:
        return sum(p.decode_bytes(top_k) for p in (self.q_proj, self.k_proj, self.v_proj, self.o_proj))

    def cache_shape(self) -> tuple[int, int, int]:
        return self.n_kv_heads, self.head_dim, self.head_dim

    def forward(self, x: torch.Tensor, rope, step: Step, cache: KVCache) -> torch.Tensor:
        B, T, C = x.shape
        if T > 1:  # prefill: compute-bound; torch's attention, projections on the kernels
            return Attention.forward(self, x, rope, step, cache)
        cache.check_fits(step)
        y = decode.attention_step(x.reshape(B, C).to(torch.float32).numpy(), self.args, *cache.arrays, *rope.arrays,
                                  *step.arrays, numba.get_num_threads())
        return torch.from_numpy(y).view(B, T, -1).to(x.dtype)

    def extra_repr(self) -> str:
        window = f", window={self.sliding_window}" if self.sliding_window else ""
        sinks = ", sinks" if self.has_sinks else ""
        return f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, kv_dtype={self.kv_dtype}{window}{sinks}"
