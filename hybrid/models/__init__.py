"""Model families, found by a registry: every module in this package except `common` is a
family. A family module provides `MODEL_TYPES` (the Hugging Face `model_type`s it loads),
`Config`, `Model` and its checkpoint tables `GGUF_NAMES`, `GGUF_PERMUTED`, `STACKED`;
optionally `GGUF_ARCHITECTURES` (GGUF general.architecture -> model_type), `GGUF_CONFIG`
(extra GGUF metadata keys -> config keys), `gguf_config(meta, cfg)` (what llama.cpp fixes
in code rather than storing), `sanitize(refs)` (a Hugging Face checkpoint's tensors
into the module tree's form), `merge_gguf(refs, cfg)` (a GGUF file's tensors into that
form) and `to_gguf(name, w, config)` (what llama.cpp's converter does to a tensor beyond
naming it, for the GGUF writer). Adding a family is adding its file and its rule files."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType

_NOT_FAMILIES = {"common", "gguf"}


@cache
def _modules() -> dict[str, ModuleType]:
    """Family file name -> module (the modules that declare MODEL_TYPES)."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_FAMILIES)
    modules = {name: importlib.import_module(f"{__name__}.{name}") for name in names}
    return {name: mod for name, mod in modules.items() if hasattr(mod, "MODEL_TYPES")}


@cache
def _model_types() -> dict[str, str]:
    """model_type -> family file name."""
    table: dict[str, str] = {}
    for name, mod in _modules().items():
        for model_type in mod.MODEL_TYPES:
            if model_type in table:
                raise RuntimeError(f"model_type {model_type!r} is claimed by families {table[model_type]} and {name}")
            table[model_type] = name
    return table


def supported_families() -> list[str]:
    """Every supported model_type."""
    return sorted(_model_types())


def family_names() -> list[str]:
    """The family files (the names rule files start with)."""
    return sorted(_modules())


def gguf_architectures() -> dict[str, str]:
    """GGUF general.architecture -> model_type, for the families that declare theirs."""
    return {arch: mt for mod in _modules().values() for arch, mt in getattr(mod, "GGUF_ARCHITECTURES", {}).items()}


def family(model_type: str) -> ModuleType:
    table = _model_types()
    if model_type not in table:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_families())}"
        )
    return _modules()[table[model_type]]


def family_name(model_type: str) -> str:
    """The family file a model_type belongs to (the key rule files are chosen by)."""
    family(model_type)
    return _model_types()[model_type]
