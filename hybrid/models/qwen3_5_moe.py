"""Qwen3.5 MoE (`qwen3_5_moe`, the text model of the multimodal checkpoint, or
`qwen3_5_moe_text`; GGUF arch `qwen35moe`): Qwen3.5-35B-A3B, 122B-A10B. Of every
`full_attention_interval` layers the last has gated full attention and the others a gated
DeltaNet (linear attention); every layer's feed-forward is a MoE.

- Linear attention (`linear_attn`): in_proj_qkv(x) through a causal depthwise convolution
  of K taps and silu gives q, k [Hk, Dk] and v [Hv, Dv]; q and k are L2-normalised, q
  scaled by 1/sqrt(Dk); each value head runs the gated delta rule (`gated_delta_rule`)
  with decay exp(g), g = -exp(A_log) softplus(in_proj_a(x) + dt_bias), and write strength
  sigmoid(in_proj_b(x)); its output is RMS-normed per head, times silu(in_proj_z(x)), and
  projected by out_proj. Its memory per slot (the convolution's last K-1 inputs and a
  [Dk, Dv] state per head) is a `RecurrentState`, not a KV cache. It runs in torch.
- Full attention (`self_attn`): q_proj gives each head its query and an output gate;
  q/k RMSNorm; RoPE on the first `partial_rotary_factor` of each head (the checkpoint's
  multimodal RoPE is this for text, whose three position streams are equal); the
  attention output times sigmoid(gate) goes to o_proj.
- MoE: Qwen2-MoE's: softmax router, top-k renormalised, a shared expert behind a sigmoid gate.

Norms: Hugging Face stores w and multiplies by 1 + w (all but the DeltaNet's gated norm,
plain w); llama.cpp's converter stores 1 + w. This family keeps llama.cpp's form, so its
norms are the common RMSNorm (and its CPU operator); `sanitize` adds the 1. llama.cpp also
stores A = -exp(A_log) (`merge_gguf` takes the log back), the convolution as [C, K] (the
module's form; `sanitize` squeezes Hugging Face's [C, 1, K]), and, where Hv > Hk, the
value heads in tiled order (value head j reads key head j % Hk, not j // (Hv / Hk)):
`linear_v_tiled` in the config says which order the weights are in."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from hybrid.files.checkpoint import TensorRef
from . import llama, qwen_moe
from .common import Attention, CausalLM, KVCache, RecurrentState, RMSNorm, Rotary, apply_rope

MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
GGUF_ARCHITECTURES = {"qwen35moe": "qwen3_5_moe_text"}
# GGUF metadata (after "qwen35moe.") -> config key, beyond the keys every family shares
GGUF_CONFIG = {
    "ssm.conv_kernel": "linear_conv_kernel_dim",
    "ssm.state_size": "linear_key_head_dim",
    "ssm.group_count": "linear_num_key_heads",
    "ssm.time_step_rank": "linear_num_value_heads",
    "ssm.inner_size": "linear_inner_size",
    "full_attention_interval": "full_attention_interval",
}

F32 = GGMLQuantizationType.F32


@dataclass
class Config(llama.Config):
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_local_experts: int = 256
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True  # the router always renormalises its top k
    layer_types: list = field(default_factory=list)
    full_attention_interval: int = 4
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_v_tiled: bool = False  # value heads in llama.cpp's tiled order
    partial_rotary_factor: float = 0.25
    o_bias: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = {**d, **(d.get("text_config") or {})}  # the multimodal checkpoint: its text model
        if "num_experts" in d:
            d["num_local_experts"] = d["num_experts"]
        d.setdefault("partial_rotary_factor", (d.get("rope_parameters") or {}).get("partial_rotary_factor", 0.25))
        if "rope_dimension_count" in d:  # GGUF stores the rotary width itself
            d["partial_rotary_factor"] = d["rope_dimension_count"] / d.get("head_dim", 256)
        cfg = super().from_dict(d)
        cfg.qk_norm, cfg.norm_topk_prob, cfg.o_bias = True, True, cfg.attention_bias
        if not cfg.layer_types:
            every = cfg.full_attention_interval
            cfg.layer_types = ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                               for i in range(cfg.num_hidden_layers)]
        return cfg

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = set(self.layer_types) - {"linear_attention", "full_attention"}
        if unknown:
            raise ValueError(f"layer_types {sorted(unknown)} are not supported (linear_attention, full_attention)")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"linear_num_value_heads {self.linear_num_value_heads} is not a multiple of "
                             f"linear_num_key_heads {self.linear_num_key_heads}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_inner_size(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    def is_linear(self, i: int) -> bool:
        return self.layer_types[i] == "linear_attention"


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_rule(q, k, v, g, beta, state, chunk: int = 64):
    """q, k [B, H, T, Dk] (normalised, q scaled), v [B, H, T, Dv], g and beta [B, H, T],
    state [B, H, Dk, Dv], all float32 -> (out [B, H, T, Dv], the state after T tokens).

    Each token: S = exp(g) S; S += k (beta (v - S^T k))^T; out = S^T q. A token with g =
    beta = 0 leaves S as it was (padding). One token is that step; more go a chunk at a
    time, the chunk's updates one triangular solve (the WY form of fla's chunk kernel, as
    transformers' torch_chunk_gated_delta_rule computes it)."""
    B, H, T, Dk = k.shape
    if T == 1:
        S = state * g[:, :, 0, None, None].exp()
        kt, qt = k[:, :, 0], q[:, :, 0]
        delta = (v[:, :, 0] - torch.einsum("bhkv,bhk->bhv", S, kt)) * beta[:, :, 0, None]
        S = S + kt[..., None] * delta[..., None, :]
        return torch.einsum("bhkv,bhk->bhv", S, qt)[:, :, None], S
    C = min(chunk, T)
    pad = -T % C
    q, k, v = (F.pad(t, (0, 0, 0, pad)).unflatten(2, (-1, C)) for t in (q, k, v))  # [B, H, n, C, D]
    g, beta = (F.pad(t, (0, pad)).unflatten(2, (-1, C)) for t in (g, beta))  # [B, H, n, C]
    decay = g.cumsum(-1)  # log decay from the chunk's start to each token
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    between = (decay[..., :, None] - decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [.., C, C]
    kb = k * beta[..., None]
    system = (kb @ k.transpose(-1, -2)) * between  # its strict lower triangle, under a unit diagonal
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, kb * decay.exp()[..., None], upper=False, unitriangular=True)
    inner = (q @ k.transpose(-1, -2)) * between
    q, k = q * decay.exp()[..., None], k * (decay[..., -1:] - decay).exp()[..., None]
    out, S = torch.empty_like(u), state
    for i in range(u.shape[2]):
        v_new = u[:, :, i] - w[:, :, i] @ S
        out[:, :, i] = q[:, :, i] @ S + inner[:, :, i] @ v_new
        S = S * decay[:, :, i, -1, None, None].exp() + k[:, :, i].transpose(-1, -2) @ v_new
    return out.flatten(2, 3)[:, :, :T], S


class ShortConv(nn.Module):
    """The causal depthwise convolution over q, k, v: weight [C, K]."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel))

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, T], state [B, C, K-1] (the inputs before x) -> (silu(conv) [B, C, T],
        the inputs the taps saw [B, C, K-1+T])."""
        seen = torch.cat((state.to(x.dtype), x), -1)
        return F.silu(F.conv1d(seen, self.weight[:, None].to(x.dtype), groups=x.shape[1])), seen


class GatedRMSNorm(nn.Module):
    """The DeltaNet's output norm: RMSNorm over each head's values (weight w, not 1 + w), times silu(gate)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32.to(x.dtype) * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """Linear attention: forward(x [B, T, hidden], rope (unused), step, state) -> [B, T, hidden],
    reading and writing the step's rows of its `RecurrentState`."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.Hk, self.Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.Dk, self.Dv, self.K = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
        self.tiled = cfg.linear_v_tiled
        C, V = 2 * self.Hk * self.Dk + self.Hv * self.Dv, self.Hv * self.Dv
        self.in_proj_qkv = nn.Linear(cfg.hidden_size, C, bias=False)
        self.in_proj_z = nn.Linear(cfg.hidden_size, V, bias=False)
        self.in_proj_b = nn.Linear(cfg.hidden_size, self.Hv, bias=False)
        self.in_proj_a = nn.Linear(cfg.hidden_size, self.Hv, bias=False)
        self.conv1d = ShortConv(C, self.K)
        self.dt_bias = nn.Parameter(torch.empty(self.Hv))
        self.A_log = nn.Parameter(torch.empty(self.Hv))
        self.norm = GatedRMSNorm(self.Dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(V, cfg.hidden_size, bias=False)

    def state_shape(self) -> tuple[int, ...]:
        """(C, K, Hv, Dk, Dv) of its `RecurrentState`."""
        return self.conv1d.weight.shape[0], self.K, self.Hv, self.Dk, self.Dv

    def forward(self, x, rope, step, state: RecurrentState):
        B, T, _ = x.shape
        Hk, Hv, Dk, Dv = self.Hk, self.Hv, self.Dk, self.Dv
        conv, S = state.read(step)
        mixed, seen = self.conv1d(self.in_proj_qkv(x).transpose(1, 2), conv)  # [B, C, T], [B, C, K-1+T]
        q, k, v = mixed.transpose(1, 2).float().split([Hk * Dk, Hk * Dk, Hv * Dv], -1)
        q, k = l2norm(q.view(B, T, Hk, Dk)) * Dk**-0.5, l2norm(k.view(B, T, Hk, Dk))
        # each key head serves Hv / Hk value heads: consecutive ones, or every Hk-th (tiled)
        r = Hv // Hk
        q, k = (t.repeat(1, 1, r, 1) if self.tiled else t.repeat_interleave(r, 2) for t in (q, k))
        # a row's padding (past step.lengths) gets g = beta = 0: it leaves the state alone
        own = (torch.arange(T, device=x.device) < torch.tensor(step.lengths, device=x.device)[:, None])[..., None]
        beta = self.in_proj_b(x).float().sigmoid() * own  # [B, T, Hv]
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias.float()) * own
        out, S = gated_delta_rule(*(t.transpose(1, 2) for t in (q, k, v.view(B, T, Hv, Dv), g, beta)), S)
        state.write(step, torch.stack([seen[b, :, n : n + self.K - 1] for b, n in enumerate(step.lengths)]), S)
        y = self.norm(out.transpose(1, 2).to(x.dtype), self.in_proj_z(x).view(B, T, Hv, Dv))
        return self.out_proj(y.reshape(B, T, Hv * Dv))


class GatedAttention(Attention):
    """The common attention with q/k norm, RoPE on the model's `rotary_dim` of each head
    and an output gate: q_proj gives each head [query D, gate D]."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.q_proj = nn.Linear(cfg.hidden_size, 2 * self.n_heads * self.head_dim, bias=cfg.attention_bias)

    def forward(self, x, rope, step, cache: KVCache):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, gate = self.q_proj(x).view(B, T, H, 2 * D).chunk(2, dim=-1)
        k = self.k_norm(self.k_proj(x).view(B, T, Hkv, D))
        v = self.v_proj(x).view(B, T, Hkv, D)
        cos, sin = rope
        q = apply_rope(self.q_norm(q).transpose(1, 2), cos, sin)
        k, v = cache.update(step, apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2))
        out = self.attend(q, k, v, cache.mask(step))  # [B, T, H*D]
        return self.o_proj(out * torch.sigmoid(gate.reshape(B, T, H * D)))


class Block(nn.Module):
    """Pre-norm block: a gated DeltaNet (`linear_attn`) or gated attention (`self_attn`),
    then the MoE, each residual."""

    def __init__(self, cfg: Config, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer = "linear_attn" if cfg.is_linear(i) else "self_attn"
        self.add_module(self.mixer, GatedDeltaNet(cfg) if cfg.is_linear(i) else GatedAttention(cfg))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = qwen_moe.SparseMoe(cfg)

    def forward(self, x, rope, step, cache):
        x = x + self._modules[self.mixer](self.input_layernorm(x), rope, step, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(CausalLM):
    def make_rotary(self, cfg):
        return Rotary(cfg.rope, cfg.rotary_dim, cfg.max_position_embeddings)

    def make_layer(self, cfg, i):
        return Block(cfg, i)

    def make_cache(self, slots: int, max_len: int, placement) -> list:
        """A RecurrentState for each linear-attention layer (float32 on its device), a
        KVCache for each full-attention one."""
        caches = []
        for i, layer in enumerate(self.model.layers):
            device, dtype = placement(f"model.layers.{i}.{layer.mixer}")
            if layer.mixer == "linear_attn":
                caches.append(RecurrentState(slots, *layer.linear_attn.state_shape(), device))
            else:
                caches.append(KVCache(slots, max_len, *layer.self_attn.cache_shape(), dtype, device))
        return caches

    def layer_cache_bytes(self, max_len: int, placement) -> list[int]:
        out = []
        for i, layer in enumerate(self.model.layers):
            if layer.mixer == "linear_attn":
                out.append(RecurrentState.nbytes(*layer.linear_attn.state_shape()))
            else:
                _, dtype = placement(f"model.layers.{i}.self_attn")
                kv_heads, k_dim, v_dim = layer.self_attn.cache_shape()
                out.append(kv_heads * max_len * (k_dim + v_dim) * torch.finfo(dtype).bits // 8)
        return out


# ---------------------------------------------------------------- checkpoints

def _ref(ref: TensorRef, name: str, shape=None, fn=None) -> TensorRef:
    """ref under another name; with fn, its float32 values through fn."""
    if fn is None:
        return dataclasses.replace(ref, name=name, shape=tuple(shape or ref.shape))
    return TensorRef(name, tuple(shape or ref.shape), F32, lambda: np.ascontiguousarray(fn(ref.numpy()), dtype=np.float32))


def sanitize(refs: dict[str, TensorRef]) -> None:
    """A Hugging Face checkpoint into the module tree's form: the multimodal checkpoint's
    text model (model.language_model.* -> model.*, the vision tower and the
    multi-token-prediction layer dropped), fused experts gate_up_proj [E, 2I, H] split, norm
    weights w -> 1 + w (all but the DeltaNet's gated norm), the convolution [C, 1, K] -> [C, K]."""
    for name in list(refs):
        ref = refs.pop(name)
        if name.startswith(("model.visual.", "mtp.")):
            continue
        name = re.sub(r"^model\.language_model\.", "model.", name)
        if name.endswith(".experts.gate_up_proj"):
            E, I2, H = ref.shape
            for proj, half in (("gate_proj", slice(None, I2 // 2)), ("up_proj", slice(I2 // 2, None))):
                new = name.replace("gate_up_proj", proj)
                refs[new] = _ref(ref, new, (E, I2 // 2, H), lambda w, h=half: w[:, h])
        elif name.endswith("norm.weight") and not name.endswith(".linear_attn.norm.weight"):
            refs[name] = _ref(ref, name, fn=lambda w: w + 1.0)
        elif name.endswith(".conv1d.weight"):
            C, _, K = ref.shape
            refs[name] = _ref(ref, name, (C, K), fn=lambda w, shape=(C, K): w.reshape(shape))
        else:
            refs[name] = _ref(ref, name)


def gguf_config(meta: dict, cfg: dict) -> None:
    """What llama.cpp's file says another way: the value head width (inner size / heads),
    the value heads' tiled order, block_count counting the multi-token-prediction layers."""
    cfg["num_hidden_layers"] -= meta.get("qwen35moe.nextn_predict_layers", 0)
    cfg["linear_value_head_dim"] = cfg.pop("linear_inner_size") // cfg["linear_num_value_heads"]
    cfg["linear_v_tiled"] = True


def merge_gguf(refs: dict[str, TensorRef], cfg: dict) -> None:
    """The multi-token-prediction layers (past the last layer) dropped; A = -exp(A_log) back to A_log."""
    for name in list(refs):
        layer = re.match(r"(?:model\.layers|blk)\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= cfg["num_hidden_layers"]:
            del refs[name]
        elif name.endswith(".linear_attn.A_log"):
            refs[name] = _ref(refs[name], name, fn=lambda a: np.log(-a))


def _tiled(w: np.ndarray, r: int, width: int, axis: int = 0, skip: int = 0) -> np.ndarray:
    """llama.cpp's order of the value heads along `axis` (past its first `skip` entries):
    blocks of `width` grouped [Hk, r] -> tiled [r, Hk]."""
    w = np.moveaxis(w, axis, 0)
    rest = w[skip:]
    rest = rest.reshape(-1, r, width, *rest.shape[1:]).swapaxes(0, 1).reshape(rest.shape)
    return np.moveaxis(np.concatenate([w[:skip], rest]), 0, axis)


def to_gguf(name: str, w: np.ndarray, cfg: Config) -> np.ndarray:
    """What llama.cpp's converter does to a tensor beyond naming it (the inverse of
    `merge_gguf` and `linear_v_tiled`): A_log -> -exp(A_log); the value heads tiled."""
    if name.endswith(".A_log"):
        w = -np.exp(w)
    r, Dv = cfg.linear_num_value_heads // cfg.linear_num_key_heads, cfg.linear_value_head_dim
    if r == 1 or ".linear_attn." not in name:
        return w
    qk = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
    if name.endswith((".in_proj_qkv.weight", ".conv1d.weight")):
        return _tiled(w, r, Dv, skip=qk)
    if name.endswith(".in_proj_z.weight"):
        return _tiled(w, r, Dv)
    if name.endswith((".in_proj_a.weight", ".in_proj_b.weight", ".A_log", ".dt_bias")):
        return _tiled(w, r, 1)
    if name.endswith(".out_proj.weight"):
        return _tiled(w, r, Dv, axis=1)
    return w


_L, _D = "model.layers.{i}", "model.layers.{i}.linear_attn"

GGUF_NAMES = {
    **{k: v for k, v in llama.GGUF_NAMES.items() if not re.search(r"post_attention|\.mlp\.|_proj\.bias", k)},
    f"{_L}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    **{k: v for k, v in qwen_moe.GGUF_NAMES.items() if ".mlp." in k and k not in llama.GGUF_NAMES},
    f"{_D}.in_proj_qkv.weight": "blk.{i}.attn_qkv.weight",
    f"{_D}.in_proj_z.weight": "blk.{i}.attn_gate.weight",
    f"{_D}.in_proj_b.weight": "blk.{i}.ssm_beta.weight",
    f"{_D}.in_proj_a.weight": "blk.{i}.ssm_alpha.weight",
    f"{_D}.conv1d.weight": "blk.{i}.ssm_conv1d.weight",
    f"{_D}.dt_bias": "blk.{i}.ssm_dt.bias",
    f"{_D}.A_log": "blk.{i}.ssm_a",
    f"{_D}.norm.weight": "blk.{i}.ssm_norm.weight",
    f"{_D}.out_proj.weight": "blk.{i}.ssm_out.weight",
}
GGUF_PERMUTED: dict[str, str] = {}  # llama.cpp keeps Hugging Face's rotary layout for qwen35moe

# per-expert checkpoint tensors, under the text model's prefix or the multimodal one's
STACKED = {
    f"{pre}.layers.{{i}}.mlp.experts.{p}": f"{pre}.layers.{{i}}.mlp.experts.{{e}}.{p}.weight"
    for pre in ("model", "model.language_model") for p in ("gate_proj", "up_proj", "down_proj")
}
