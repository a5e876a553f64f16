"""Synthetic Mixtral-shaped GGUF files with random weights, for benchmarks and memory
tests: llama architecture with `ffn_*_exps` expert tensors and the built-in model's
tokenizer. Quantized tensors are random blocks with sane scales (no float round trip), so
even large files are written at disk speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from .checkpoint import open_gguf
from .convert import add_metadata

Q = GGMLQuantizationType

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


def random_blocks(qtype: GGMLQuantizationType, shape: tuple[int, ...], rng: np.random.Generator, scale: float) -> np.ndarray:
    """uint8 [*shape[:-1], row_bytes] of random quantized data whose scales are `scale`
    (fp16), so dequantized values are of the order of `scale` * quant range."""
    block, size = GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1]))
    nblocks = rows * shape[-1] // block
    data = rng.integers(0, 256, size=(nblocks, size), dtype=np.uint8)
    for off in _SCALE_OFFSETS[qtype]:
        data[:, off : off + 2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    if qtype in (Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K):  # the min/offset field: keep it small and negative-free
        data[:, 2:4] = np.frombuffer(np.float16(scale / 4).tobytes(), dtype=np.uint8)
    return data.reshape(*shape[:-1], shape[-1] // block * size)


def write_moe_gguf(
    path,
    *,
    layers: int = 16,
    hidden: int = 1024,
    experts: int = 32,
    expert_width: int = 512,
    top_k: int = 4,
    heads: int = 16,
    kv_heads: int = 4,
    qtype: str = "Q8_0",
    context: int = 4096,
    tokenizer_from=None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a Mixtral-layout GGUF. `tokenizer_from`: a GGUF whose tokenizer is copied
    (default: none, and then `vocab_size` tokens of a toy vocabulary are not written)."""
    q = Q[qtype.upper()]
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    meta = open_gguf(Path(tokenizer_from)).metadata if tokenizer_from else {}
    vocab = len(meta["tokenizer.ggml.tokens"]) if meta else (vocab_size or 32000)
    writer.add_name(f"synthetic-moe-{layers}x{experts}x{expert_width}-{qtype}")
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(expert_width)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(top_k)
    writer.add_vocab_size(vocab)
    for key, value in meta.items():
        if key.startswith("tokenizer."):
            add_metadata(writer, key, value)

    head_dim = hidden // heads
    w_scale = 0.5 / np.sqrt(hidden) / 64  # quant range ~±64..127: weights ~ 1/sqrt(fan_in)

    def quant(name, shape):
        blocks = random_blocks(q, shape, rng, w_scale)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=q)

    def f32(name, shape, value=None):
        data = np.full(shape, value, np.float32) if value is not None else rng.standard_normal(shape).astype(np.float32) * 0.02
        writer.add_tensor(name, data)

    quant("token_embd.weight", (vocab, hidden))
    f32("output_norm.weight", (hidden,), 1.0)
    quant("output.weight", (vocab, hidden))
    for i in range(layers):
        f32(f"blk.{i}.attn_norm.weight", (hidden,), 1.0)
        f32(f"blk.{i}.ffn_norm.weight", (hidden,), 1.0)
        quant(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden))
        quant(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        quant(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        quant(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim))
        f32(f"blk.{i}.ffn_gate_inp.weight", (experts, hidden))
        quant(f"blk.{i}.ffn_gate_exps.weight", (experts, expert_width, hidden))
        quant(f"blk.{i}.ffn_up_exps.weight", (experts, expert_width, hidden))
        quant(f"blk.{i}.ffn_down_exps.weight", (experts, hidden, expert_width))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
