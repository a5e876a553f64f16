"""Synthetic MoE GGUF files with random weights, for benchmarks and memory tests, in one of
three layouts, each with the metadata keys and tensor names llama.cpp's converter writes:
`qwen3moe` (Qwen3-MoE: q/k norms, head_dim apart from hidden / heads, no shared expert),
`gpt-oss` (biases on q/k/v/o, the router and the experts, per-head attention sinks, the
pre-FFN norm named post_attention_norm, sliding-window layers, YaRN) or `llama` with
`ffn_*_exps` expert tensors (Mixtral). The built-in model's tokenizer is copied in.

`qtype` is a block type (Q8_0, Q4_0, Q4_K, ...: every matrix of that type) or a
llama-quantize file type: Q4_K_M, or any block type with `mix=True`, gives each tensor the
type `llama-quantize` would; MXFP4_MOE the types of ggml-org's gpt-oss GGUFs (see
`tensor_type`). Quantized tensors are random blocks with sane scales (no float round trip),
streamed to disk one tensor at a time, so files of several GB are written at disk speed in
little memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType

from hybrid.files.checkpoint import open_gguf
from hybrid.writers.convert import add_metadata

Q = GGMLQuantizationType

ARCHITECTURES = ("llama", "qwen3moe", "gpt-oss")

# Byte offsets of the fp16 scale fields inside one block, per type.
_SCALE_OFFSETS = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}

# The largest |quant x sub-scale| of a random block per type, so that one amplitude gives
# weights of the same size whatever the type (Q4_K: 6-bit scales x 4-bit quants; Q6_K:
# int8 scales x 6-bit quants; MXFP4: E2M1 codes doubled, 12 at most).
_RANGE = {Q.Q8_0: 127, Q.Q4_0: 8, Q.Q4_1: 15, Q.Q5_0: 16, Q.Q5_1: 31, Q.Q4_K: 63 * 15, Q.Q5_K: 63 * 31,
          Q.Q6_K: 128 * 32, Q.MXFP4: 12}

# llama-quantize's file types this writer knows: name -> (default block type, general.file_type)
FILE_TYPES = {
    "Q4_K_M": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "Q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "Q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "MXFP4_MOE": (Q.Q8_0, LlamaFileType.MOSTLY_MXFP4_MOE),  # experts MXFP4, the rest Q8_0
}

# llama.cpp's fallback when a row is not a whole number of blocks (tensor_type_fallback).
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def random_blocks(qtype: GGMLQuantizationType, shape: tuple[int, ...], rng: np.random.Generator, scale: float) -> np.ndarray:
    """uint8 [*shape[:-1], row_bytes] of random quantized data whose scales are `scale`
    (fp16), so dequantized values are of the order of `scale` * quant range."""
    block, size = GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1]))
    nblocks = rows * shape[-1] // block
    data = np.frombuffer(rng.bytes(nblocks * size), dtype=np.uint8).reshape(nblocks, size).copy()
    if qtype == Q.MXFP4:  # one E8M0 byte e, the doubled E2M1 codes' unit 2^(e - 128): `scale` to a power of 2
        data[:, 0] = 128 + round(np.log2(scale))
        return data.reshape(*shape[:-1], shape[-1] // block * size)
    for off in _SCALE_OFFSETS[qtype]:
        data[:, off : off + 2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    if qtype in (Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K):  # the min/offset field: keep it small and negative-free
        data[:, 2:4] = np.frombuffer(np.float16(scale / 4).tobytes(), dtype=np.uint8)
    return data.reshape(*shape[:-1], shape[-1] // block * size)


def _use_more_bits(layer: int, layers: int) -> bool:
    """llama-quantize's choice of the layers that get more bits: the first and last eighth
    and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(qtype: str, name: str, layers: int, cols: int, mix: bool = False) -> GGMLQuantizationType:
    """The block type of matrix `name` (GGUF name, rows of `cols` weights) in a file of
    `qtype`. Without `mix` (and for a plain block type), every matrix gets `qtype`. With a
    llama-quantize mix (Q4_K_M always; other file types with `mix`), as llama.cpp's
    llama_tensor_get_type assigns them for a model with untied embeddings and other than
    8 experts: output.weight Q6_K (Q8_0 in a Q8_0 file); for Q4_K_M, attn_v and ffn_down
    (dense or experts) Q6_K in the layers `_use_more_bits` picks. MXFP4_MOE: the expert
    matrices MXFP4, every other one Q8_0, as in ggml-org's gpt-oss GGUFs. A row that is not
    a whole number of blocks falls back as llama.cpp's does (Q4_K -> Q5_0, Q6_K -> Q8_0)."""
    key = qtype.upper()
    if key not in FILE_TYPES and key not in Q.__members__:
        raise ValueError(f"unknown qtype {qtype!r}; use one of {', '.join(FILE_TYPES)} or a GGML block type")
    base = FILE_TYPES[key][0] if key in FILE_TYPES else Q[key]
    t = base
    if key == "MXFP4_MOE" and "_exps." in name:
        t = Q.MXFP4
    elif key == "Q4_K_M" or (mix and key in FILE_TYPES):
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if name == "output.weight":
            t = Q.Q8_0 if base == Q.Q8_0 else Q.Q6_K
        elif key == "Q4_K_M" and (".attn_v." in name or ".ffn_down" in name) and _use_more_bits(layer, layers):
            t = Q.Q6_K
    block = GGML_QUANT_SIZES[t][0]
    if cols % block:
        t = _FALLBACK.get(t, t)
        if cols % GGML_QUANT_SIZES[t][0]:
            raise ValueError(f"{name}: rows of {cols} weights are not whole {t.name} blocks; pick sizes divisible by {block}")
    return t


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order: [*outer, cols]
    qtype: GGMLQuantizationType  # F32 for norms, biases, sinks and the router
    fill: float | None = None  # a constant (norm weights); None: random
    std: float = 0.02  # of a random F32 tensor


def _tensors(arch: str, layers: int, hidden: int, experts: int, expert_width: int, heads: int, kv_heads: int,
             head_dim: int, vocab: int) -> list[_Tensor]:
    """Every tensor of the file, layer by layer, types F32 for norms, biases, sinks and the
    router and None (quantized) for the rest. gpt-oss's sinks are logits of the order of
    one, beside the scores near 0 that random weights give."""
    gpt = arch == "gpt-oss"
    q, kv, o = (heads * head_dim, hidden), (kv_heads * head_dim, hidden), (hidden, heads * head_dim)
    out = [_Tensor("token_embd.weight", (vocab, hidden), None)]
    for i in range(layers):
        b = f"blk.{i}"
        out += [_Tensor(f"{b}.attn_norm.weight", (hidden,), Q.F32, 1.0)]
        for name, shape in (("attn_q", q), ("attn_k", kv), ("attn_v", kv), ("attn_output", o)):
            out += [_Tensor(f"{b}.{name}.weight", shape, None)]
            if gpt:
                out += [_Tensor(f"{b}.{name}.bias", shape[:1], Q.F32)]
        if arch == "qwen3moe":
            out += [_Tensor(f"{b}.attn_q_norm.weight", (head_dim,), Q.F32, 1.0),
                    _Tensor(f"{b}.attn_k_norm.weight", (head_dim,), Q.F32, 1.0)]
        if gpt:
            out += [_Tensor(f"{b}.attn_sinks.weight", (heads,), Q.F32, std=1.0)]
        out += [
            _Tensor(f"{b}.post_attention_norm.weight" if gpt else f"{b}.ffn_norm.weight", (hidden,), Q.F32, 1.0),
            _Tensor(f"{b}.ffn_gate_inp.weight", (experts, hidden), Q.F32),
        ]
        if gpt:
            out += [_Tensor(f"{b}.ffn_gate_inp.bias", (experts,), Q.F32)]
        for proj, shape in (("gate", (experts, expert_width, hidden)), ("up", (experts, expert_width, hidden)),
                            ("down", (experts, hidden, expert_width))):
            out += [_Tensor(f"{b}.ffn_{proj}_exps.weight", shape, None)]
            if gpt:
                out += [_Tensor(f"{b}.ffn_{proj}_exps.bias", shape[:2], Q.F32)]
    out += [_Tensor("output_norm.weight", (hidden,), Q.F32, 1.0), _Tensor("output.weight", (vocab, hidden), None)]
    return out


def write_moe_gguf(
    path,
    *,
    arch: str = "llama",
    layers: int = 16,
    hidden: int = 1024,
    experts: int = 32,
    expert_width: int = 512,
    top_k: int = 4,
    heads: int = 16,
    kv_heads: int = 4,
    head_dim: int | None = None,
    qtype: str = "Q8_0",
    mix: bool = False,
    context: int = 4096,
    dense_width: int | None = None,
    rope_theta: float | None = None,
    rms_eps: float | None = None,
    sliding_window: int = 128,
    yarn: tuple[float, int] = (32.0, 4096),
    tokenizer_from=None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a MoE GGUF of architecture `arch` ("llama": Mixtral layout; "qwen3moe";
    "gpt-oss"). `head_dim`: default hidden // heads. `qtype`/`mix`: see `tensor_type`.
    `dense_width`: the qwen3moe feed_forward_length key (the dense FFN width the family
    would use; no tensor has it). gpt-oss only: `sliding_window` (of the even layers, as
    llama.cpp places them) and `yarn` (YaRN's factor and original context).
    `tokenizer_from`: a GGUF whose tokenizer is copied (default: none, and then `vocab_size`
    tokens of a toy vocabulary are not written)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; use one of {', '.join(ARCHITECTURES)}")
    head_dim = head_dim or hidden // heads
    qwen, gpt = arch == "qwen3moe", arch == "gpt-oss"
    rng = np.random.default_rng(seed)
    meta = open_gguf(Path(tokenizer_from)).metadata if tokenizer_from else {}
    vocab = len(meta["tokenizer.ggml.tokens"]) if meta else (vocab_size or 32000)
    tensors = _tensors(arch, layers, hidden, experts, expert_width, heads, kv_heads, head_dim, vocab)
    for t in tensors:
        if t.qtype is None:
            t.qtype = tensor_type(qtype, t.name, layers, t.shape[-1], mix)

    writer = GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name(f"synthetic-{arch}-{layers}x{experts}x{expert_width}-{qtype}")
    if qtype.upper() in FILE_TYPES:
        writer.add_file_type(int(FILE_TYPES[qtype.upper()][1]))
    writer.add_quantization_version(2)
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(rope_theta or {"qwen3moe": 1e6, "gpt-oss": 1.5e5}.get(arch, 1e4))
    writer.add_layer_norm_rms_eps(rms_eps or (1e-6 if qwen else 1e-5))
    writer.add_expert_count(experts)
    writer.add_expert_used_count(top_k)
    if qwen or gpt:
        writer.add_feed_forward_length(expert_width if gpt else dense_width or expert_width * top_k)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_expert_feed_forward_length(expert_width)
    else:
        writer.add_feed_forward_length(expert_width)
        writer.add_vocab_size(vocab)
    if gpt:
        writer.add_sliding_window(sliding_window)
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(yarn[0])
        writer.add_rope_scaling_orig_ctx_len(yarn[1])
    for key, value in meta.items():
        if key.startswith("tokenizer."):
            add_metadata(writer, key, value)

    # weights ~ 1/sqrt(fan_in) whatever the block type
    amplitude = 127 * 0.5 / np.sqrt(hidden) / 64
    for t in tensors:
        if t.qtype == Q.F32:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), 4 * int(np.prod(t.shape)))
        else:
            block, size = GGML_QUANT_SIZES[t.qtype]
            byte_shape = (*t.shape[:-1], t.shape[-1] // block * size)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        if t.qtype != Q.F32:
            data = random_blocks(t.qtype, t.shape, rng, amplitude / _RANGE[t.qtype])
        elif t.fill is not None:
            data = np.full(t.shape, t.fill, np.float32)
        else:
            data = rng.standard_normal(t.shape, dtype=np.float32) * t.std
        writer.write_tensor_data(data)
    writer.close()
    return Path(path)
