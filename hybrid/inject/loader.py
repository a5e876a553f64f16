"""`hybrid.load`: source -> config -> skeleton on meta -> rules -> operators -> weights.

Each tensor is read once, straight into the module (or operator) that owns it, on its
final device and in the form it wants; quantized blocks for the numba kernels stay
memory-mapped. Loading is strict: a missing, unexpected or mis-shaped tensor is an
error that names it.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager

import torch
from torch import nn

from hybrid.inject import placement as rules_mod
from hybrid.files.checkpoint import (
    CheckpointError,
    Source,
    TensorRef,
    find_source,
    gguf_tensors,
    open_gguf,
    safetensors_tensors,
)
from hybrid.models import family, family_name
from hybrid.models.gguf import gguf_config

log = logging.getLogger(__name__)


def describe(source) -> tuple[Source, dict, dict, dict]:
    """Read what a source is without loading weights: (source, config dict, tensor
    index, GGUF metadata or {})."""
    src = find_source(source)
    if src.is_gguf:
        readers = [open_gguf(f) for f in src.gguf_files]
        meta = readers[0].metadata
        cfg = gguf_config(meta)
        fam = family(cfg["model_type"])
        permuted = {}
        if cfg.get("gguf_architecture") in ("llama", "mistral"):
            permuted = {name: _heads(cfg, key) for name, key in fam.GGUF_PERMUTED.items()}
        refs = gguf_tensors(readers, fam.GGUF_NAMES, permuted)
        if hasattr(fam, "merge_gguf"):
            fam.merge_gguf(refs, cfg)
        if "rope_freqs.weight" in refs:
            cfg["rope_scaling"] = {"rope_type": "default", "freq_factors": refs.pop("rope_freqs.weight").numpy().tolist()}
        if "lm_head.weight" not in refs:
            cfg["tie_word_embeddings"] = True
        return src, cfg, refs, meta
    try:
        cfg = json.loads((src.path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{src.path / 'config.json'}: not valid JSON ({e})") from e
    if "model_type" not in cfg:
        raise CheckpointError(f"{src.path / 'config.json'}: no model_type")
    fam = family(cfg["model_type"])
    refs = safetensors_tensors(src.safetensors_files, fam.STACKED)
    if hasattr(fam, "sanitize"):
        fam.sanitize(refs)
    return src, cfg, refs, {}


def _heads(cfg: dict, key: str) -> int:
    return cfg.get(key) or cfg["num_attention_heads"]


def default_rules(model_type: str, gpu: bool | None = None) -> str:
    """The built-in rule file for a family: the GPU hybrid file when CUDA is present (or
    `gpu` says to plan for one)."""
    fam = family_name(model_type)
    gpu = torch.cuda.is_available() if gpu is None else gpu
    name = f"{fam}-gpu" if gpu else f"{fam}-cpu"
    log.info("rules: %s (chosen for family %s, CUDA %s)", name, fam, "present" if gpu else "absent")
    return name


def build(source, rules=None, assume: dict[str, int] | None = None):
    """Everything up to reading weights: (config, module on meta with operators swapped in,
    placements, rule counts, tensor index, ruleset, source, metadata). `assume`: GPUs to
    plan for as if present (see `parse_rules`)."""
    src, cfg_dict, refs, meta = describe(source)
    try:
        fam = family(cfg_dict["model_type"])
        config = fam.Config.from_dict(cfg_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{src.path}: unusable model configuration: {e}") from e
    if rules is None:
        rules = default_rules(cfg_dict["model_type"], True if assume else None)
    ruleset = rules_mod.parse_rules(rules, family=family_name(cfg_dict["model_type"]), assume=assume)
    with torch.device("meta"), _skip_init():
        module = fam.Model(config)
    tied = refs.get("model.embed_tokens.weight") if getattr(config, "tie_word_embeddings", False) else None

    def tensor(name):
        ref = refs.get(name) or (tied if name == "lm_head.weight" else None)
        return (ref.qtype, tuple(ref.shape)) if ref is not None else None

    placements, counts = rules_mod.plan(module, ruleset, tensor)
    return config, module, placements, counts, refs, ruleset, src, meta


@contextmanager
def _skip_init():
    """Leave out the parameter initialisers of modules built on meta: there is nothing to
    fill, and on meta tensors torch runs them through its reference implementations,
    whose first use imports torch._dynamo and sympy (~110 MB resident for good)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


class _Tensors:
    """Hands tensors to their owners, checking shapes and remembering what was taken."""

    def __init__(self, refs: dict, tied: bool):
        self.refs, self.taken = refs, set()
        self.bytes, self._counted = 0, set()  # stored bytes of the tensors handed out so far (tied ones once)
        if tied and "lm_head.weight" not in refs and "model.embed_tokens.weight" in refs:
            self.refs = dict(refs, **{"lm_head.weight": refs["model.embed_tokens.weight"]})

    def get(self, name: str, shape) -> TensorRef:
        ref = self.refs.get(name)
        if ref is None:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        if tuple(ref.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {list(ref.shape)}, the model expects {list(shape)}")
        self.taken.add(name)
        if id(ref) not in self._counted:
            self._counted.add(id(ref))
            self.bytes += ref.nbytes
        return ref

    def check_all_taken(self) -> None:
        extra = sorted(set(self.refs) - self.taken)
        if extra:
            shown = ", ".join(extra[:8]) + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else "")
            raise CheckpointError(f"unexpected tensor(s) in the checkpoint: {shown}")


def load_weights(module: nn.Module, placements, tensors: _Tensors, progress=None) -> None:
    """progress: a `Progress` whose count (MB) follows the bytes read."""
    for p in placements:
        prefix = f"{p.path}." if p.path else ""
        if p.keeps_children:
            continue  # its children have placements of their own
        if p.operator is not None:
            original = p.module.original_shapes
            p.module.load(lambda n, pre=prefix, shapes=original: tensors.get(pre + n, shapes[n]))
        else:
            for name, param in list(p.module.named_parameters(recurse=False)):
                ref = tensors.get(prefix + name, param.shape)
                p.module._parameters[name] = nn.Parameter(ref.tensor(p.dtype, p.device), requires_grad=False)
        if progress is not None:
            progress.update(done=tensors.bytes / 1e6)
    tensors.check_all_taken()
    leftover = [n for n, t in module.named_parameters() if t.is_meta]
    if leftover:
        raise CheckpointError(f"no weights were loaded for: {', '.join(leftover[:8])}")


def _tokenizer(src: Source, meta: dict, family: str | None):
    """The model's tokenizer, or None (with a warning) when the source ships none: logits
    still work, generation says what is missing. A file without a chat template gets its
    family's built-in one where there is one (gpt-oss: harmony)."""
    from hybrid.files.chat_template import builtin_template
    from hybrid.files.tokenizer import Tokenizer

    tok = None
    if src.is_gguf:
        if "tokenizer.ggml.model" in meta:
            tok = Tokenizer.from_gguf(meta)
    elif any((src.path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        tok = Tokenizer.from_pretrained(src.path)
    if tok is None:
        log.warning("%s has no tokenizer; only logits() is available", src.path)
    elif tok.chat_template is None:
        tok.chat_template = builtin_template(family)
    return tok


def load(source, rules=None, *, progress=None):
    """Load a model from a .gguf file (or the first of a split set), a directory holding
    one, or a Hugging Face checkpoint directory. `rules`: a rule file path, a built-in
    rule file name, YAML text, or None to pick the built-in file for the family.
    `progress`: a `hybrid.inject.progress.Progress` to report the stages to, or True for a
    status line on stderr."""
    from hybrid.inject.model import Model
    from hybrid.inject.progress import Progress, StatusLine

    line = None
    if progress is True:
        progress, line = Progress(), StatusLine()
        progress.listen(line)
    try:
        if progress:
            progress.stage("reading the model's description", detail=str(source))
        config, module, placements, _, refs, ruleset, src, meta = build(source, rules)
        rules_mod.swap(module, placements, config, ruleset.source)
        rules_mod.apply_process_settings(ruleset)
        tensors = _Tensors(refs, getattr(config, "tie_word_embeddings", False))
        if progress:
            kept = any(p.operator is not None for p in placements)
            total = sum(ref.nbytes for ref in refs.values()) / 1e6
            progress.stage("mapping weights" if kept else "reading and dequantizing weights", total, "MB",
                           src.path.name)
        load_weights(module, placements, tensors, progress or None)
        rules_mod.add_device_hooks(module, placements)
        module.eval()
        if progress:
            progress.stage("reading the tokenizer")
        tokenizer = _tokenizer(src, meta, getattr(config, "model_type", None))
    finally:
        if line is not None:
            line.close()
    name = meta.get("general.name") or re.sub(r"\.gguf$", "", src.path.name)
    return Model(config, module, tokenizer, placements=placements, ruleset=ruleset, source=src, name=name)
