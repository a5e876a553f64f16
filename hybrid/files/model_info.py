"""What /api/tags, /api/show and /api/ps say about the served model (read once, from its files)."""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from pathlib import Path


def describe(model, ctx: int) -> dict:
    src = getattr(model, "source", None)
    files = [Path(p) for p in (getattr(src, "gguf_files", None) or getattr(src, "safetensors_files", None) or [])]
    stats = [p.stat() for p in files if p.exists()]
    size = sum(s.st_size for s in stats)
    mtime = max((s.st_mtime for s in stats), default=0.0)
    cfg = model.config
    arch = getattr(cfg, "model_type", "unknown")
    meta, n_params = {}, None
    if getattr(src, "is_gguf", False):
        from hybrid.files.checkpoint import open_gguf

        for i, p in enumerate(files):
            g = open_gguf(p)
            meta = meta or g.metadata
            n_params = (n_params or 0) + sum(math.prod(t.shape) for t in g.tensors)
    else:
        n_params = sum(p.numel() for p in model.module.parameters())
    quant = _file_type(meta.get("general.file_type")) if meta else _dtype(model)
    info = {
        "format": "gguf" if getattr(src, "is_gguf", False) else "safetensors",
        "family": arch,
        "parameter_size": meta.get("general.size_label") or _size_label(n_params),
        "quantization_level": quant,
        "size": size,
        "size_vram": _cuda_bytes(model),
        "digest": hashlib.sha256(f"{[str(p) for p in files]}:{size}:{mtime}".encode()).hexdigest(),
        "modified_at": datetime.fromtimestamp(mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    info["model_info"] = {
        "general.architecture": arch,
        "general.parameter_count": n_params,
        f"{arch}.context_length": ctx,
        f"{arch}.embedding_length": getattr(cfg, "hidden_size", None),
        f"{arch}.block_count": getattr(cfg, "num_hidden_layers", None),
        f"{arch}.attention.head_count": getattr(cfg, "num_attention_heads", None),
        f"{arch}.attention.head_count_kv": getattr(cfg, "num_key_value_heads", None),
        "tokenizer.vocab_size": model.tokenizer.vocab_size,
    }
    return info


def _file_type(ft) -> str:
    if ft is None:
        return "unknown"
    try:
        import gguf

        return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
    except (ImportError, ValueError):
        return str(ft)


def _dtype(model) -> str:
    p = next(iter(model.module.parameters()), None)
    return str(p.dtype).removeprefix("torch.").upper() if p is not None else "unknown"


def _size_label(n) -> str:
    if not n:
        return "unknown"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _cuda_bytes(model) -> int:
    tensors = list(model.module.parameters()) + list(model.module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")
