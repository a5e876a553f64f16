"""Building blocks shared by every family: config base, RMSNorm, RoPE, KV cache,
attention, the gated MLP and the stacked experts.

Shapes are named once: B batch, T new tokens, L keys attended, H query heads,
Hkv key/value heads, D head dim, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BaseConfig:
    """Family configs subclass this; `from_dict` drops the keys a family does not use."""

    model_type: str = "llama"

    @classmethod
    def from_dict(cls, d: dict) -> "BaseConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def rope_parameters(d: dict) -> dict:
    """Normalise the two spellings of RoPE settings (transformers 4 `rope_theta` +
    `rope_scaling`, transformers 5 `rope_parameters`) into one dict with `rope_type`."""
    params = dict(d.get("rope_parameters") or {})
    params.update(d.get("rope_scaling") or {})
    params.setdefault("rope_theta", d.get("rope_theta", params.get("rope_theta", 10000.0)))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(params: dict, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale for one RoPE setting
    (default, linear, llama3, yarn), computed as transformers does."""
    base = params["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = params["rope_type"]
    if "freq_factors" in params:  # llama.cpp stores llama3 scaling as per-frequency divisors
        return inv_freq / torch.tensor(params["freq_factors"], dtype=torch.float32), 1.0
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old_len = params.get("original_max_position_embeddings") or max_positions
        factor = params.get("factor") or max_positions / old_len
        scale = params.get("attention_factor")
        if scale is None:
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            scale = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all else _yarn_mscale(factor)

        def correction_dim(rotations):
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
        if params.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        extrapolate = 1 - ramp
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
        return inv, float(scale)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: default, linear, llama3, yarn")


class Rotary(nn.Module):
    """cos/sin tables for absolute positions; `interleaved` pairs (x0, x1), (x2, x3)...
    as DeepSeek does, otherwise the two halves of the head as Llama does."""

    def __init__(self, params: dict, dim: int, max_positions: int, interleaved: bool = False):
        super().__init__()
        with torch.device("cpu"):  # a plain attribute computed on the CPU: survives building on meta
            self.inv_freq, self.scale = rope_frequencies(params, dim, max_positions)
        self.interleaved = interleaved

    def forward(self, positions: torch.Tensor) -> "RopeTables":
        inv = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return RopeTables((emb.cos() * self.scale, emb.sin() * self.scale))


class RopeTables(tuple):
    """(cos, sin) [B, T, D] of one step, shared by every layer."""

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin as float32 [B, T * D] numpy arrays for the CPU kernels (T = 1 in decode),
        made once per step, not once per layer."""
        cos, sin = self
        B = cos.shape[0]
        return cos.reshape(B, -1).numpy(), sin.reshape(B, -1).numpy()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, R]: with R < D (GLM's partial rotary) only the first
    R dimensions of each head turn."""
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :R], cos, sin, interleaved), x[..., R:]), dim=-1)
    if interleaved:  # reorder (x0, x1, x2, x3...) to (x0, x2, ..., x1, x3, ...) first
        B, H, T, D = x.shape
        x = x.view(B, H, T, D // 2, 2).transpose(3, 4).reshape(B, H, T, D)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass
class Step:
    """Where the tokens of one forward call sit: sequence b writes its T new tokens into
    cache slot `slots[b]` at positions starts[b] .. starts[b]+T-1 and attends to keys
    0 .. starts[b]+T-1 of that slot. Only the first lengths[b] tokens of row b are its
    own; the rest pad a batched prefill's row to T: attention caches take them at positions
    the row's next step overwrites, a recurrent state (`RecurrentState`) leaves them out."""

    slots: list[int]
    starts: list[int]
    positions: torch.Tensor  # [B, T] absolute positions
    mask: torch.Tensor | None  # [B, 1, T, L] bool, None when every key is visible
    lengths: list[int]

    @classmethod
    def make(cls, slots: list[int], starts: list[int], T: int, device, lengths: list[int] | None = None) -> "Step":
        starts_t = torch.tensor(starts, device=device)
        positions = starts_t[:, None] + torch.arange(T, device=device)
        L = max(starts) + T
        mask = None
        if T > 1 or len(set(starts)) > 1:
            keys = torch.arange(L, device=device)
            mask = (keys[None, None, :] <= positions[:, :, None])[:, None]
        lengths = [T] * len(slots) if lengths is None else list(lengths)
        if len(lengths) != len(slots) or not all(1 <= n <= T for n in lengths):
            raise ValueError(f"lengths {lengths} must give 1..{T} tokens for each of the {len(slots)} rows")
        return cls(slots, starts, positions, mask, lengths)

    @property
    def length(self) -> int:
        return max(self.starts) + self.positions.shape[1]

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, starts) as int64 arrays for the CPU kernels, made once per step."""
        return np.asarray(self.slots, np.int64), np.asarray(self.starts, np.int64)

    def to(self, device) -> "Step":
        if self.positions.device == torch.device(device):
            return self
        mask = None if self.mask is None else self.mask.to(device)
        return Step(self.slots, self.starts, self.positions.to(device), mask, self.lengths)


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer: [slots, Hkv, max_len, D]."""

    copies_rows = True  # the prefix cache may copy positions out and back in (read_rows, write_rows)

    def __init__(self, slots: int, max_len: int, kv_heads: int, k_dim: int, v_dim: int, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(slots, kv_heads, max_len, k_dim, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(slots, kv_heads, max_len, v_dim, dtype=dtype, device=device))

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """k and v as numpy views for the CPU kernels (float16 as its uint16 bits)."""
        k, v = self.k.numpy(), self.v.numpy()
        return (k.view(np.uint16), v.view(np.uint16)) if k.dtype == np.float16 else (k, v)

    def check_fits(self, step: Step) -> None:
        if step.length > self.k.shape[2]:
            raise ValueError(f"sequence of {step.length} tokens does not fit the KV cache of {self.k.shape[2]}")

    def update(self, step: Step, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] and return all keys/values visible to the batch [B, Hkv, L, D]."""
        T, L = k.shape[2], step.length
        self.check_fits(step)
        for b, (slot, start) in enumerate(zip(step.slots, step.starts)):
            self.k[slot, :, start : start + T] = k[b]
            self.v[slot, :, start : start + T] = v[b]
        if len(step.slots) == 1:  # a view, no copy: keeps long-context decode cheap
            slot = step.slots[0]
            return self.k[slot : slot + 1, :, :L], self.v[slot : slot + 1, :, :L]
        index = torch.tensor(step.slots, device=self.k.device)
        return self.k[index, :, :L], self.v[index, :, :L]

    def mask(self, step: Step) -> torch.Tensor | None:
        """Which of the keys `update` returned each query sees: [B, 1, T, L] bool or None."""
        return step.mask

    # The prefix cache (hybrid.engine.prefix_cache) copies positions out of a slot and back in.

    def rows_of(self, start: int, n: int) -> slice | torch.Tensor:
        return slice(start, start + n)

    def keeps(self, position: int, written: int) -> bool:
        """Whether `position` is still stored once positions up to `written` were written."""
        return True

    def read_rows(self, slot: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values of positions start..start+n-1: [Hkv, n, D] each."""
        rows = self.rows_of(start, n)
        return self.k[slot][:, rows].clone(), self.v[slot][:, rows].clone()

    def write_rows(self, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put k/v [Hkv, n, D] at positions start..start+n-1 of `slot`."""
        rows = self.rows_of(start, k.shape[1])
        self.k[slot][:, rows], self.v[slot][:, rows] = k, v


class SlidingKVCache(KVCache):
    """Keys and values of a sliding-window layer, which attends to the last `window`
    positions only: each slot keeps a ring of `rows(window, max_len)` rows, position p at
    row p % rows, so its memory does not grow with the context.

    The ring is PAD_ROOM rows longer than the window because a batched prefill pads short
    rows at their end (hybrid.engine.scheduler.prefill, by less than half its chunk): the padding's
    writes then land on positions older than any key the row still needs."""

    PAD_ROOM = 512

    def __init__(self, slots: int, max_len: int, window: int, kv_heads: int, k_dim: int, v_dim: int, dtype, device):
        super().__init__(slots, self.rows(window, max_len), kv_heads, k_dim, v_dim, dtype, device)
        self.window, self.max_len = window, max_len

    @classmethod
    def rows(cls, window: int, max_len: int) -> int:
        return min(window + cls.PAD_ROOM, max_len)

    def check_fits(self, step: Step) -> None:
        if step.length > self.max_len:
            raise ValueError(f"sequence of {step.length} tokens does not fit the KV cache of {self.max_len}")

    def update(self, step: Step, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D]; return, per sequence, the up to window-1 cached keys
        before its new tokens followed by the T new ones, right-aligned [B, Hkv, n + T, D]
        (n: the most cached keys any sequence has); `mask(step)` says which each query sees."""
        self.check_fits(step)
        B, T, W, rows = k.shape[0], k.shape[2], self.window, self.k.shape[2]
        n = max(min(s, W - 1) for s in step.starts)
        keys = self.k.new_zeros(B, self.k.shape[1], n + T, self.k.shape[3])
        vals = self.v.new_zeros(B, self.v.shape[1], n + T, self.v.shape[3])
        for b, (slot, start) in enumerate(zip(step.slots, step.starts)):
            old = torch.arange(start - min(start, W - 1), start, device=self.k.device)
            # read the cached keys before writing: a new position may take an old one's row
            keys[b, :, n - len(old) : n], vals[b, :, n - len(old) : n] = self.k[slot][:, old % rows], self.v[slot][:, old % rows]
            keys[b, :, n:], vals[b, :, n:] = k[b], v[b]
            new = torch.arange(start + max(0, T - rows), start + T, device=self.k.device)
            self.k[slot][:, new % rows], self.v[slot][:, new % rows] = k[b, :, T - len(new) :], v[b, :, T - len(new) :]
        return keys, vals

    def rows_of(self, start: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n, device=self.k.device) % self.k.shape[2]

    def keeps(self, position: int, written: int) -> bool:
        return position >= written - self.k.shape[2]

    def mask(self, step: Step) -> torch.Tensor | None:
        """[B, 1, T, n + T] bool for the keys `update` returned: key j of sequence b is at
        position starts[b] - n + j; a query at q sees positions q - window < p <= q, p >= 0."""
        n = max(min(s, self.window - 1) for s in step.starts)
        T = step.positions.shape[1]
        keys = step.positions[:, :1, None] - n + torch.arange(n + T, device=step.positions.device)  # [B, 1, n+T]
        q = step.positions[:, :, None]  # [B, T, 1]
        visible = (keys >= 0) & (keys <= q) & (keys > q - self.window)
        return None if bool(visible.all()) else visible[:, None]


class RecurrentState(nn.Module):
    """What a linear-attention layer (a gated DeltaNet) keeps per slot in place of a KV
    cache: the last K-1 inputs of its short convolution, `conv` [slots, C, K-1], and the
    delta rule's state, `ssm` [slots, H, Dk, Dv], both float32 whatever the layer's dtype.

    Every position is folded into the state, so a slot only moves forward: a step starts
    at the position the slot's state has reached (`length`), or at 0, which starts the
    slot afresh. There are no rows to copy out and back in, so the prefix cache cannot
    serve a model that has one (`copies_rows`)."""

    copies_rows = False

    def __init__(self, slots: int, conv_dim: int, kernel: int, heads: int, k_dim: int, v_dim: int, device):
        super().__init__()
        self.register_buffer("conv", torch.zeros(slots, conv_dim, kernel - 1, device=device))
        self.register_buffer("ssm", torch.zeros(slots, heads, k_dim, v_dim, device=device))
        self.length = [0] * slots  # positions folded into each slot's state

    @staticmethod
    def nbytes(conv_dim: int, kernel: int, heads: int, k_dim: int, v_dim: int) -> int:
        """Bytes of one slot's state."""
        return 4 * (conv_dim * (kernel - 1) + heads * k_dim * v_dim)

    def read(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv [B, C, K-1], ssm [B, H, Dk, Dv]) of the step's rows; zeros for a row that starts at 0."""
        for slot, start in zip(step.slots, step.starts):
            if start not in (0, self.length[slot]):
                raise ValueError(f"slot {slot}'s recurrent state holds positions 0..{self.length[slot] - 1}; a step "
                                 f"cannot start at {start} (the state only goes forward, or starts afresh at 0)")
        index = torch.tensor(step.slots, device=self.conv.device)
        kept = torch.tensor([s > 0 for s in step.starts], device=self.conv.device)
        return (torch.where(kept[:, None, None], self.conv[index], 0.0),
                torch.where(kept[:, None, None, None], self.ssm[index], 0.0))

    def write(self, step: Step, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        """Store the states after each row's own `step.lengths[b]` tokens."""
        index = torch.tensor(step.slots, device=self.conv.device)
        self.conv[index], self.ssm[index] = conv.to(self.conv.dtype), ssm.to(self.ssm.dtype)
        for slot, start, n in zip(step.slots, step.starts, step.lengths):
            self.length[slot] = start + n


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, L, D], mask [B, 1, T, L] bool or None -> [B, T, H*Dv]."""
    B, H, T, _ = q.shape
    k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may keep a narrower type
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != H
    )
    return out.transpose(1, 2).reshape(B, T, -1)


class Attention(nn.Module):
    """Grouped-query attention with optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3).
    A family with sliding-window layers sets `sliding_window` on them (their cache is then
    a SlidingKVCache)."""

    sliding_window: int | None = None

    def __init__(self, cfg):
        super().__init__()
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, D
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=bias)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=getattr(cfg, "o_bias", False))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.scale = D**-0.5

    def cache_shape(self) -> tuple[int, int, int]:
        return self.n_kv_heads, self.head_dim, self.head_dim

    def forward(self, x, rope, step: Step, cache: KVCache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        k, v = cache.update(step, k, v.transpose(1, 2))
        return self.o_proj(self.attend(q, k, v, cache.mask(step)))

    def attend(self, q, k, v, mask):
        """The attention itself (a family with sinks overrides it): see `attend`."""
        return attend(q, k, v, mask, self.scale)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E gated MLPs stored stacked, so a kernel takes one array per projection:
    gate_proj/up_proj [E, I, H], down_proj [E, H, I], with `bias` also gate_proj_bias /
    up_proj_bias [E, I] and down_proj_bias [E, H]. `glu`: None for silu(gate) * up, or
    (limit, alpha) of gpt-oss's clamped SwiGLU (`gated`). Operators replacing it keep
    forward(x [N, H], ids [N, K], weights [N, K]) -> [N, H]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, bias: bool = False, glu=None):
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.glu = glu
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        if bias:
            self.gate_proj_bias = nn.Parameter(torch.empty(num_experts, intermediate))
            self.up_proj_bias = nn.Parameter(torch.empty(num_experts, intermediate))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden))

    @property
    def biases(self) -> tuple | None:
        """(gate, up, down) biases, or None."""
        b = getattr(self, "gate_proj_bias", None)
        return None if b is None else (b, self.up_proj_bias, self.down_proj_bias)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return routed_sum(x, ids, weights, lambda e: (self.gate_proj[e], self.up_proj[e], self.down_proj[e]),
                          self.biases, self.glu)


def gated(g: torch.Tensor, u: torch.Tensor, glu=None) -> torch.Tensor:
    """silu(g) * u; with glu = (limit, alpha), gpt-oss's clamped SwiGLU:
    (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'), g' = min(g, limit)."""
    if glu is None:
        return F.silu(g) * u
    limit, alpha = glu
    g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return (u + 1) * g * torch.sigmoid(g * alpha)


def routed_sum(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert, biases=None, glu=None) -> torch.Tensor:
    """out[n] = sum_k weights[n, k] * MLP_e(x[n]) for e = ids[n, k] (ids < 0 skipped), expert
    by expert; expert(e) -> its (gate [I, H], up [I, H], down [H, I]) on x's device; biases:
    None or (gate [E, I], up [E, I], down [E, H]); glu as `gated`'s."""
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        if e < 0:
            continue
        token, slot = torch.where(ids == e)
        gate, up, down = expert(e)
        h = x[token]
        g, u = h @ gate.T, h @ up.T
        if biases is not None:
            bg, bu, bd = (b[e].to(x.device, x.dtype) for b in biases)
            g, u = g + bg, u + bu
        y = gated(g, u, glu) @ down.T
        if biases is not None:
            y = y + bd
        out.index_add_(0, token, y * weights[token, slot, None].to(x.dtype))
    return out


class Layers(nn.ModuleList):
    """`model.layers`: the decoder layers, each run on its own cache. A rule may put an
    operator in its place that keeps the layers as its children (`CPUDecoderStack`) and
    runs them its own way."""

    def forward(self, x: torch.Tensor, rope, step: Step, caches: list[KVCache]) -> torch.Tensor:
        for layer, cache in zip(self, caches):
            x = layer(x, rope, step, cache)
        return x


class CausalLM(nn.Module):
    """model.embed_tokens -> model.layers -> model.norm -> lm_head, with Hugging Face names.
    Families provide `make_layer(cfg, i)` and, if they differ, `make_rotary(cfg)`."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = Layers(self.make_layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = self.make_rotary(cfg)

    def make_rotary(self, cfg) -> Rotary:
        return Rotary(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)

    def make_layer(self, cfg, i: int) -> nn.Module:
        raise NotImplementedError

    def make_cache(self, slots: int, max_len: int, placement) -> list[KVCache]:
        """One KVCache per layer (a SlidingKVCache of its window for a sliding-window
        layer); placement(path) -> (device, dtype) of that layer's attention; an attention
        operator with a `kv_dtype` of its own keeps its cache in that type."""
        caches = []
        for i, layer in enumerate(self.model.layers):
            device, dtype = placement(f"model.layers.{i}.self_attn")
            dtype = getattr(layer.self_attn, "kv_dtype", dtype)
            shape = (*layer.self_attn.cache_shape(), dtype, device)
            window = getattr(layer.self_attn, "sliding_window", None)
            caches.append(SlidingKVCache(slots, max_len, window, *shape) if window else KVCache(slots, max_len, *shape))
        return caches

    def layer_cache_bytes(self, max_len: int, placement) -> list[int]:
        """Bytes of each layer's KV cache for one slot of `max_len` tokens, without allocating it."""
        out = []
        for i, layer in enumerate(self.model.layers):
            _, dtype = placement(f"model.layers.{i}.self_attn")
            dtype = getattr(layer.self_attn, "kv_dtype", dtype)
            kv_heads, k_dim, v_dim = layer.self_attn.cache_shape()
            window = getattr(layer.self_attn, "sliding_window", None)
            rows = SlidingKVCache.rows(window, max_len) if window else max_len
            out.append(kv_heads * rows * (k_dim + v_dim) * torch.finfo(dtype).bits // 8)
        return out

    def cache_bytes(self, max_len: int, placement) -> int:
        """Bytes of the KV cache of one slot of `max_len` tokens, without allocating it."""
        return sum(self.layer_cache_bytes(max_len, placement))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and vocabulary projection: logits float32."""
        return self.lm_head(self.model.norm(x)).float()

    def forward(self, tokens: torch.Tensor, step: Step, caches: list[KVCache], keep: list[int] | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (float32); with `keep`, only position keep[b]
        of each row: [B, 1, V] (a prefill needs one position, and the vocabulary
        projection of all of them can cost as much as the layers)."""
        x = self.embed(tokens)
        rope = self.rotary(step.positions.to(x.device))
        x = self.model.layers(x, rope, step, caches)
        if keep is not None:
            x = x[torch.arange(x.shape[0], device=x.device), torch.as_tensor(keep, device=x.device)][:, None]
        return self.head(x)


class Block(nn.Module):
    """Pre-norm decoder block: attention and a feed-forward `mlp`, each residual."""

    def __init__(self, cfg, ffn: nn.Module, attn: nn.Module | None = None, ffn_name: str = "mlp"):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn if attn is not None else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_name = ffn_name  # Hugging Face's name for it: "mlp" or Mixtral's "block_sparse_moe"
        self.add_module(ffn_name, ffn)

    def forward(self, x, rope, step, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, step, cache)
        return x + self._modules[self.ffn_name](self.post_attention_layernorm(x))


def routed_gguf_names(moe: str) -> dict[str, str]:
    """GGUF names of a sparse MoE's router and stacked routed experts under module path
    `moe` (with an {i} for the layer), as llama.cpp writes them for every MoE family."""
    names = {f"{moe}.gate.weight": "blk.{i}.ffn_gate_inp.weight"}
    for proj in ("gate", "up", "down"):
        names[f"{moe}.experts.{proj}_proj"] = f"blk.{{i}}.ffn_{proj}_exps.weight"
    return names
