"""Model files: find what a source path holds, read its configuration, and index its
tensors under Hugging Face names without reading them.

A `TensorRef` hands a tensor out either raw (GGUF blocks as stored, for the numba
kernels) or as a dequantized torch tensor (for modules that stay in torch).
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

Q = GGMLQuantizationType
_TORCH_TYPES = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class CheckpointError(ValueError):
    """A model file or directory that cannot be loaded; the message says why and what to do."""


@dataclass
class TensorRef:
    """One tensor of a checkpoint. `shape` is the logical torch shape ([out, in] for
    weights); `raw()` returns the stored form: uint8 blocks [*shape[:-1], row_bytes] for
    quantized types, float32/float16 arrays, or uint16 bits for bf16."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    raw: Callable[[], np.ndarray]
    permute_heads: int = 0  # >0: undo llama.cpp's q/k row interleave for this many heads

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size

    def numpy(self) -> np.ndarray:
        """Dequantized float32 array of `shape`."""
        data = self.raw()
        if self.qtype == Q.BF16:
            out = (data.astype(np.uint32) << 16).view(np.float32)
        elif self.qtype in (Q.F32, Q.F16):
            out = data.astype(np.float32)
        else:
            out = dequantize(data, self.qtype)
        out = out.reshape(self.shape)
        return unpermute_rows(out, self.permute_heads) if self.permute_heads else out

    def tensor(self, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.numpy())).to(device=device, dtype=dtype)

    def raw_rows(self) -> np.ndarray:
        """`raw()` with q/k rows put back in Hugging Face order (rows move whole, so the
        blocks inside them are untouched)."""
        data = self.raw()
        return unpermute_rows(data, self.permute_heads) if self.permute_heads else data


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: within each head, rows were reordered from
    (half, pair) to (pair, half) for its interleaved rotary kernel."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------- sources


@dataclass
class Source:
    """What a path holds: GGUF files, or a Hugging Face directory of safetensors."""

    path: Path
    gguf_files: list[Path] = field(default_factory=list)
    safetensors_files: list[Path] = field(default_factory=list)

    @property
    def is_gguf(self) -> bool:
        return bool(self.gguf_files)


def find_source(path) -> Source:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: not a .gguf file; pass a GGUF file or a model directory")
        return Source(path, gguf_files=_split_files(path))
    if (path / "config.json").exists():
        return Source(path, safetensors_files=_safetensors_files(path))
    ggufs = sorted(path.glob("*.gguf"))
    firsts = [p for p in ggufs if not _SPLIT.search(p.name) or _SPLIT.search(p.name).group(1) == "00001"]
    if len(firsts) == 1:
        return Source(path, gguf_files=_split_files(firsts[0]))
    if len(firsts) > 1:
        names = ", ".join(p.name for p in firsts)
        raise CheckpointError(f"{path}: holds several GGUF models ({names}); pass one file")
    raise CheckpointError(
        f"{path}: nothing loadable here: expected a .gguf file, or a Hugging Face checkpoint "
        "(config.json with *.safetensors)"
    )


def _split_files(first: Path) -> list[Path]:
    m = _SPLIT.search(first.name)
    if not m:
        return [first]
    count = int(m.group(2))
    files = [first.with_name(_SPLIT.sub(f"-{i:05d}-of-{count:05d}.gguf", first.name)) for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{first.parent}: split GGUF is missing {', '.join(missing)}")
    return files


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise CheckpointError(f"{directory}: missing shard(s) listed in {index.name}: {', '.join(missing)}")
        return [directory / s for s in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: config.json found but no *.safetensors weights")
    return files


# ----------------------------------------------------------------------------- GGUF


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # logical torch order (GGUF stores dims innermost first)
    qtype: GGMLQuantizationType
    data: np.ndarray  # memory-mapped: uint8 blocks [*shape[:-1], row_bytes], or float arrays


@dataclass
class GGUFFile:
    """A GGUF file's metadata as Python values and its tensors as memory-mapped arrays.

    Read with a small header parser rather than `gguf.GGUFReader`, whose per-string numpy
    views of a large vocabulary cost more memory than a small model's weights."""

    path: Path
    metadata: dict
    tensors: list[GGUFTensor]


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads little-endian GGUF header values from a bytes-like buffer."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, code: int):
        fmt = "<" + _SCALARS[code]
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        (n,) = struct.unpack_from("<Q", self.buf, self.pos)
        start = self.pos + 8
        self.pos = start + n
        return self.buf[start : self.pos].decode("utf-8", errors="replace")

    def value(self, code: int):
        if code == _STRING:
            return self.string()
        if code == _ARRAY:
            item, count = self.scalar(4), self.scalar(10)
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            dt = np.dtype("<" + _SCALARS[item])
            values = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += dt.itemsize * count
            return values.tolist()
        return self.scalar(code)


def open_gguf(path: Path) -> GGUFFile:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if header[:4] != b"GGUF":
            raise ValueError("no GGUF magic number at the start")
        cur = _Cursor(header)
        cur.pos = 4
        version, n_tensors, n_kv = cur.scalar(4), cur.scalar(10), cur.scalar(10)
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (2 or newer is read)")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar(10) for _ in range(cur.scalar(4))]
            infos.append((name, tuple(reversed(dims)), Q(cur.scalar(4)), cur.scalar(10)))
    except (ValueError, IndexError, KeyError, struct.error, OSError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e}); is it truncated or corrupt?") from e
    align = int(meta.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    header.close()
    buf = np.memmap(path, mode="r")
    tensors = []
    for name, shape, qtype, offset in infos:
        block, size = GGML_QUANT_SIZES[qtype]
        row_bytes = shape[-1] // block * size
        n_bytes = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
        begin = start + offset
        if begin + n_bytes > len(buf):
            raise CheckpointError(f"{path}: tensor {name} runs past the end of the file; the file is truncated")
        raw = buf[begin : begin + n_bytes]
        if qtype in (Q.F32, Q.F16):
            data = raw.view(np.float32 if qtype == Q.F32 else np.float16).reshape(shape)
        elif qtype == Q.BF16:
            data = raw.view(np.uint16).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], row_bytes)
        tensors.append(GGUFTensor(name, shape, qtype, data))
    return GGUFFile(path, meta, tensors)


# GGUF metadata key (after "{arch}.") -> Hugging Face config key.
_GGUF_CONFIG = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "expert_count": "num_local_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    "expert_shared_count": "n_shared_experts",
    "expert_weights_scale": "routed_scaling_factor",
    "expert_weights_norm": "norm_topk_prob",
    "expert_group_count": "n_group",
    "expert_group_used_count": "topk_group",
    "leading_dense_block_count": "first_k_dense_replace",
    "attention.q_lora_rank": "q_lora_rank",
    "attention.kv_lora_rank": "kv_lora_rank",
    "attention.value_length": "v_head_dim",
    "rope.dimension_count": "rope_dimension_count",
    "vocab_size": "vocab_size",
}

# GGUF general.architecture -> Hugging Face model_type (MoE variants chosen by metadata).
_GGUF_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "deepseek2": "deepseek_v2",
}


def gguf_config(meta: dict) -> dict:
    """A Hugging Face-style config dict from GGUF metadata: the keys every family shares
    (`_GGUF_CONFIG`), then the family's own (its `GGUF_CONFIG` and `gguf_config`)."""
    from .models import family, gguf_architectures, supported_families

    arch = meta.get("general.architecture")
    arches = {**_GGUF_ARCH, **gguf_architectures()}
    if arch not in arches:
        raise CheckpointError(
            f"GGUF architecture {arch!r} is not supported; supported GGUF architectures: "
            f"{', '.join(sorted(arches))} (model types: {', '.join(supported_families())})"
        )
    cfg = {"model_type": arches[arch], "gguf_architecture": arch}
    fam = family(cfg["model_type"])
    for key, hf in {**_GGUF_CONFIG, **getattr(fam, "GGUF_CONFIG", {})}.items():
        if f"{arch}.{key}" in meta:
            cfg[hf] = meta[f"{arch}.{key}"]
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in meta:
        cfg["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    if arch == "llama" and cfg.get("num_local_experts"):
        cfg["model_type"] = "mixtral"
    if arch == "deepseek2" and meta.get(f"{arch}.expert_gating_func") == 2:
        cfg["model_type"] = "deepseek_v3"
        cfg["scoring_func"] = "sigmoid"
    if arch == "qwen3moe":  # llama.cpp always renormalises Qwen3-MoE's top-k weights
        cfg.setdefault("norm_topk_prob", True)
    if cfg["model_type"] in ("deepseek_v2", "deepseek_v3"):
        # key/value_length are the q/k head (nope+rope) and v head; newer llama.cpp files store
        # its MQA view of MLA there and the real heads under *_mla. The family splits the
        # q/k head with rope_dimension_count.
        cfg["qk_head_dim"] = meta.get(f"{arch}.attention.key_length_mla", cfg.pop("head_dim", None))
        cfg["v_head_dim"] = meta.get(f"{arch}.attention.value_length_mla", cfg.get("v_head_dim"))
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {
            "rope_type": scaling,
            "factor": meta.get(f"{arch}.rope.scaling.factor"),
            "original_max_position_embeddings": meta.get(f"{arch}.rope.scaling.original_context_length"),
        }
        if f"{arch}.rope.scaling.yarn_log_multiplier" in meta:
            mult = meta[f"{arch}.rope.scaling.yarn_log_multiplier"]
            cfg["rope_scaling"].update(mscale=mult / 0.1, mscale_all_dim=mult / 0.1)
    if hasattr(fam, "gguf_config"):
        fam.gguf_config(meta, cfg)
    return cfg


# -------------------------------------------------------------------------- indexing


def _templates_to_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)") + "$")


def gguf_tensors(files: list[GGUFFile], names: dict[str, str], permuted: dict[str, int]) -> dict[str, TensorRef]:
    """Index GGUF tensors under Hugging Face names using a family's name table
    (HF template -> GGUF template). Unknown GGUF names keep their own name, so the
    strict check later reports them."""
    table = [(_templates_to_regex(g), hf) for hf, g in names.items()]
    refs = {}
    for f in files:
        for t in f.tensors:
            hf_name = t.name
            for pattern, hf in table:
                m = pattern.match(t.name)
                if m:
                    hf_name = hf.format(**m.groupdict())
                    break
            refs[hf_name] = TensorRef(
                hf_name, t.shape, t.qtype, (lambda d=t.data: d), permuted.get(_untemplate(hf_name), 0)
            )
    return refs


def _untemplate(name: str) -> str:
    return re.sub(r"\.\d+\.", ".{i}.", name, count=1)


def safetensors_tensors(files: list[Path], stacked: dict[str, str]) -> dict[str, TensorRef]:
    """Index safetensors tensors; per-expert checkpoint tensors named by a family's
    `stacked` table (our stacked name -> checkpoint template with {i} and {e}) become one
    [E, ...] tensor."""
    from safetensors import safe_open

    refs: dict[str, TensorRef] = {}
    handles = [safe_open(str(f), framework="pt") for f in files]
    for h in handles:
        for name in h.keys():
            sl = h.get_slice(name)
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(sl.get_dtype())
            if dtype is None:
                raise CheckpointError(f"tensor {name}: dtype {sl.get_dtype()} is not supported (F32, F16, BF16)")
            refs[name] = TensorRef(name, tuple(sl.get_shape()), _TORCH_TYPES[dtype], (lambda h=h, n=name: _np(h.get_tensor(n))))
    for ours, template in stacked.items():
        pattern = _templates_to_regex(template)
        groups: dict[str, dict[int, TensorRef]] = {}
        for name in list(refs):
            m = pattern.match(name)
            if m:
                target = ours.format(i=m.group("i"))
                groups.setdefault(target, {})[int(m.group("e"))] = refs.pop(name)
        for target, parts in groups.items():
            experts = [parts[e] for e in sorted(parts)]
            if sorted(parts) != list(range(len(parts))):
                raise CheckpointError(f"{target}: experts {sorted(parts)} are not numbered 0..{len(parts) - 1}")
            refs[target] = TensorRef(
                target,
                (len(experts), *experts[0].shape),
                experts[0].qtype,
                (lambda ex=experts: np.stack([r.raw() for r in ex])),
            )
    return refs


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    return t.numpy()
