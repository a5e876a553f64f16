"""Write a Hugging Face checkpoint as a GGUF file with llama.cpp's tensor names and
metadata (the inverse of the loader's tables). Used by the tests to check GGUF loading
against transformers, and by scripts/ to make synthetic benchmark models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from hybrid.files.checkpoint import find_source, open_gguf, safetensors_tensors
from hybrid.models import family, gguf_architectures
from hybrid.models.gguf import ARCHITECTURES, COMMON_KEYS

Q = GGMLQuantizationType
_ARCH_OF = {v: k for k, v in {**ARCHITECTURES, **gguf_architectures()}.items() if k != "mistral"} | {
    "mistral": "llama", "mixtral": "llama", "deepseek_v3": "deepseek2"}
_METADATA_TYPES = {"rms_norm_eps": float, "rope_theta": float, "routed_scaling_factor": float}


def _gguf_name(hf_name: str, names: dict[str, str]) -> str:
    for hf, g in names.items():
        m = re.fullmatch(re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)"), hf_name)
        if m:
            return g.format(**m.groupdict())
    raise KeyError(f"{hf_name}: no GGUF name in the family's table")


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row interleave (inverse of checkpoint.unpermute_rows)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir, out_path, qtype: str = "F32", tokenizer_from=None, extra_metadata: dict | None = None,
               split_kv_b: bool = False, experts_qtype: str | None = None) -> Path:
    """model_dir: a Hugging Face checkpoint directory. qtype: F32, F16 or a type that
    gguf's quantizer supports (Q8_0, Q4_0, ...) for 2-D weights whose rows fit its
    blocks; norms and biases stay F32. experts_qtype: another type for the stacked
    [E, out, in] expert weights (e.g. MXFP4, as gpt-oss files hold them).
    tokenizer_from: a GGUF file whose tokenizer.* fields are copied."""
    src = find_source(model_dir)
    cfg = json.loads((src.path / "config.json").read_text())
    fam = family(cfg["model_type"])
    arch = _ARCH_OF[cfg["model_type"]]
    refs = safetensors_tensors(src.safetensors_files, fam.STACKED)
    if hasattr(fam, "sanitize"):  # e.g. Gemma's norms: llama.cpp's converter stores 1 + w
        fam.sanitize(refs)
    writer = GGUFWriter(str(out_path), arch)
    writer.add_name(cfg.get("_name_or_path") or src.path.name)
    _add_config(writer, arch, fam.Config.from_dict(cfg), cfg)
    for key, value in (extra_metadata or {}).items():
        add_metadata(writer, key, value)
    if tokenizer_from:
        for key, value in open_gguf(Path(tokenizer_from)).metadata.items():
            if key.startswith("tokenizer."):
                add_metadata(writer, key, value)
    target = Q[qtype.upper()]
    config = fam.Config.from_dict(cfg)
    for name, ref in refs.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        w = ref.numpy()
        if hasattr(fam, "to_gguf"):  # what llama.cpp's converter changes beyond names and types
            w = fam.to_gguf(name, w, config)
        if arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            w = permute_rows(w, heads)
        if split_kv_b and name.endswith("self_attn.kv_b_proj.weight"):  # newer llama.cpp layout
            H, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
            kv_b = w.reshape(H, nope + v, -1)
            writer.add_tensor(_gguf_name(name.replace("kv_b_proj.weight", "k_b"), fam.GGUF_NAMES),
                              np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1), dtype=np.float32))
            writer.add_tensor(_gguf_name(name.replace("kv_b_proj.weight", "v_b"), fam.GGUF_NAMES),
                              np.ascontiguousarray(kv_b[:, nope:], dtype=np.float32))
            continue
        gname = _gguf_name(name, fam.GGUF_NAMES)
        if experts_qtype and w.ndim == 3:
            blocks = quantize(np.ascontiguousarray(w, dtype=np.float32), Q[experts_qtype.upper()])
            writer.add_tensor(gname, blocks, raw_shape=blocks.shape, raw_dtype=Q[experts_qtype.upper()])
        elif w.ndim == 1 or target == Q.F32 or w.shape[-1] % 32 or gname.endswith(("ffn_gate_inp.weight", ".bias")):  # routers and biases stay F32, as in llama.cpp
            writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
        elif target == Q.F16:
            writer.add_tensor(gname, w.astype(np.float16))
        else:
            blocks = quantize(np.ascontiguousarray(w, dtype=np.float32), target)
            writer.add_tensor(gname, blocks, raw_shape=blocks.shape, raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_path)


def _add_config(writer: GGUFWriter, arch: str, config, cfg: dict) -> None:
    values = dict(cfg)
    derived = ("num_key_value_heads", "head_dim", "num_local_experts")
    values.update({k: getattr(config, k) for k in derived if hasattr(config, k)})
    own = getattr(family(cfg["model_type"]), "GGUF_CONFIG", {}).values()  # a family's keys its config derives
    values.update({k: getattr(config, k) for k in own if k not in values and hasattr(config, k)})
    if arch == "deepseek2":  # llama.cpp's key_length is the whole q/k head; gating 1 softmax, 2 sigmoid
        values.update(head_dim=config.qk_head_dim, rope_dimension_count=config.qk_rope_head_dim)
        writer.add_uint32(f"{arch}.expert_gating_func", 2 if config.scoring_func == "sigmoid" else 1)
    if hasattr(config, "rotary_dim"):  # partial rotary (GLM): llama.cpp stores the rotary width
        values["rope_dimension_count"] = config.rotary_dim
    if "rope" in config.__dict__:
        values["rope_theta"] = config.rope["rope_theta"]
    for gkey, hf in {**COMMON_KEYS, **getattr(family(cfg["model_type"]), "GGUF_CONFIG", {})}.items():
        if hf in values and values[hf] is not None and not isinstance(values[hf], (dict, list)):
            v = values[hf]
            v = _METADATA_TYPES.get(hf, type(v))(v)
            add_metadata(writer, f"{arch}.{gkey}", v)
    rope = getattr(config, "rope", {}) or {}
    if rope.get("rope_type") == "llama3":  # llama.cpp's form: a tensor of per-frequency divisors
        from hybrid.models.common import rope_frequencies

        plain, _ = rope_frequencies({**rope, "rope_type": "default"}, config.head_dim, config.max_position_embeddings)
        scaled, _ = rope_frequencies(rope, config.head_dim, config.max_position_embeddings)
        writer.add_tensor("rope_freqs.weight", (plain / scaled).numpy().astype(np.float32))
    elif rope.get("rope_type", "default") != "default":
        writer.add_string(f"{arch}.rope.scaling.type", rope["rope_type"])
        writer.add_float32(f"{arch}.rope.scaling.factor", float(rope["factor"]))
        if rope.get("original_max_position_embeddings"):
            writer.add_uint32(f"{arch}.rope.scaling.original_context_length", int(rope["original_max_position_embeddings"]))
        if rope.get("mscale_all_dim"):  # DeepSeek's YaRN attention temperature, as llama.cpp stores it
            writer.add_float32(f"{arch}.rope.scaling.yarn_log_multiplier", 0.1 * rope["mscale_all_dim"])


def add_metadata(writer: GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)
    else:
        raise TypeError(f"metadata {key}: cannot write a {type(value).__name__}")
