"""Model families by Hugging Face `model_type`. Each family module provides `Config`,
`Model`, and its checkpoint tables: `GGUF_NAMES`, `GGUF_PERMUTED`, `STACKED`."""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen_moe",
    "qwen3_moe": "qwen_moe",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
}


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def family(model_type: str) -> ModuleType:
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_families())}"
        )
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}")


def family_name(model_type: str) -> str:
    """The family file a model_type belongs to (the key rule files are chosen by)."""
    return FAMILIES[model_type]
