"""The records operators hand the decode kernels (decode.py, layer.py), each defined once.

An operator builds its record by keyword when it loads, and passes it as a plain tuple
(`plain`): numba's dispatcher types a plain tuple in C, a named one in Python (a 30-layer
decode stack of named records: 114 us a token to get into the kernel, against 51). A kernel
names it again at its top, `w = AttentionWeights(*attn)`, and reads fields by name; that
costs nothing in the compiled code. Fields used inside a parallel loop are read into locals
before it (a named tuple used inside one failed to lower).

Weights are the kernels' form (`formats.as_blocks`): a type code and uint8 GGUF blocks
[rows, row_bytes] (float weights viewed as bytes); stacked experts [E, rows, row_bytes].
"""

from typing import NamedTuple

import numpy as np


class AttentionWeights(NamedTuple):
    """Llama-family attention, as `decode.attention_step` takes it (H heads, Hkv kv heads of D)."""

    tq: int  # q_proj's type code
    wq: np.ndarray  # q_proj: uint8 blocks [H * D, row_bytes]
    tk: int  # k_proj's type code
    wk: np.ndarray  # k_proj: uint8 blocks [Hkv * D, row_bytes]
    tv: int  # v_proj's type code
    wv: np.ndarray  # v_proj: uint8 blocks [Hkv * D, row_bytes]
    to: int  # o_proj's type code
    wo: np.ndarray  # o_proj: uint8 blocks [hidden, row_bytes]
    bq: np.ndarray  # q_proj's bias: float32 [H * D], or [0] for none (then bk, bv, bo are too)
    bk: np.ndarray  # k_proj's bias: float32 [Hkv * D], or [0]
    bv: np.ndarray  # v_proj's bias: float32 [Hkv * D], or [0]
    bo: np.ndarray  # o_proj's bias: float32 [hidden], or [0]
    qn: np.ndarray  # q RMSNorm weight: float32 [D], or [0] for none
    kn: np.ndarray  # k RMSNorm weight: float32 [D], or [0] for none
    eps: float  # the q/k norms' epsilon
    scale: float  # the attention scores' scale (1 / sqrt(D) unless the family says otherwise)
    acts: int  # the activation form the projections ask for (activations.ACT_*)
    window: int  # 0, or a sliding window: a token attends to its last `window` positions
    sinks: np.ndarray  # float32 [H] per-head sink logits (gpt-oss), or [0] for none


class MlpWeights(NamedTuple):
    """A gated MLP, down(silu(gate x) * up x), as `decode.mlp_step` takes it."""

    tg: int  # gate_proj's type code
    wg: np.ndarray  # gate_proj: uint8 blocks [I, row_bytes]
    tu: int  # up_proj's type code
    wu: np.ndarray  # up_proj: uint8 blocks [I, row_bytes]
    td: int  # down_proj's type code
    wd: np.ndarray  # down_proj: uint8 blocks [hidden, row_bytes]
    acts: int  # the activation form asked for (activations.ACT_*)


class Router(NamedTuple):
    """A sparse MoE's router: softmax top-k over the experts' logits (no bias)."""

    tr: int  # the router's type code; it takes int16 activations whatever `acts` says
    wr: np.ndarray  # the router: uint8 blocks [E, row_bytes]
    top_k: int  # experts per token
    normalize: bool  # whether the top-k weights are renormalised to sum to one


class ExpertWeights(NamedTuple):
    """Stacked routed experts, as `moe._moe_fused` takes them (SiLU, no biases)."""

    tg: int  # gate_proj's type code
    gate: np.ndarray  # gate_proj: uint8 blocks [E, I, row_bytes]
    tu: int  # up_proj's type code
    up: np.ndarray  # up_proj: uint8 blocks [E, I, row_bytes]
    td: int  # down_proj's type code
    down: np.ndarray  # down_proj: uint8 blocks [E, hidden, row_bytes]
    acts: int  # the activation form asked for (activations.ACT_*)


class SharedExpert(NamedTuple):
    """Qwen2-MoE's shared expert, scaled by the sigmoid of its gate."""

    mlp: MlpWeights  # the expert, a gated MLP
    tg: int  # shared_expert_gate's type code; it takes int16 activations
    wg: np.ndarray  # shared_expert_gate: uint8 blocks [1, row_bytes]


class DenseLayer(NamedTuple):
    """A Llama block: pre-norm attention and pre-norm gated MLP, as `layer.dense_layer_step` takes it."""

    norm1: np.ndarray  # input_layernorm's weight: float32 [hidden]
    eps1: float  # its epsilon
    norm2: np.ndarray  # post_attention_layernorm's weight: float32 [hidden]
    eps2: float  # its epsilon
    attn: AttentionWeights  # self_attn
    mlp: MlpWeights  # the feed-forward


class MoeLayer(NamedTuple):
    """A Mixtral or Qwen MoE block, as `layer.moe_layer_step` takes it."""

    norm1: np.ndarray  # input_layernorm's weight: float32 [hidden]
    eps1: float  # its epsilon
    norm2: np.ndarray  # post_attention_layernorm's weight: float32 [hidden]
    eps2: float  # its epsilon
    attn: AttentionWeights  # self_attn
    router: Router  # the router
    experts: ExpertWeights  # the routed experts
    shared: SharedExpert | None  # Qwen2-MoE's shared expert, or None


def plain(record: tuple) -> tuple:
    """A record as the kernels take it: a plain tuple of its fields, records inside it too."""
    return tuple(plain(field) if isinstance(field, tuple) else field for field in record)
