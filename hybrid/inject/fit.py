"""`hybrid fit`: a rule file fitted to one GPU's memory, planned from tensor sizes alone.

The family's `-gpu` file is the base: attention, norms, embeddings, lm_head, routers,
shared experts and dense MLPs on the GPU, routed experts on the CPU kernels. That part and
the KV cache (slots x ctx) must fit, with a reserve for activations; what is left of the
budget takes routed experts one whole layer at a time from layer 0 (llama.cpp's
--n-cpu-moe, counted from the other end), and then, at the boundary, as many of the next
layer's experts as fit (`SplitExperts`). The file written is an ordinary rule file: the
base file's rules behind the ones placing experts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import yaml

from hybrid.inject.loader import build, describe
from hybrid.inject.placement import Placement, device_key, resolve_rules_path
from hybrid.inject.plan import human, kv_cache_by_device, placement_bytes, placement_of, summarize
from hybrid.models import family_name
from hybrid.operators import CPUExperts, SplitExperts

PROFILES = ("decode", "prefill")
# Tokens of one prefill chunk (the scheduler's default), for the prefill profile's workspace.
PREFILL_CHUNK = 512


class FitError(ValueError):
    """The budget cannot hold the part of the model that must be on the GPU."""


@dataclass
class ExpertLayer:
    """One layer's routed experts: where the base file leaves them, and their size on the GPU."""

    index: int
    path: str
    placement: Placement
    gpu_bytes: int  # all of its experts in torch on the GPU
    num_experts: int
    splittable: bool  # a stacked `Experts` on the CPU kernels in the base file


@dataclass
class Fit:
    rules_yaml: str
    gpu: str
    budget: int
    base_bytes: int  # GPU weights of the base file
    kv_bytes: int
    reserve_bytes: int
    whole_layers: list[int] = field(default_factory=list)
    split: tuple[int, int, int] | None = None  # (layer, experts on the GPU, experts in the layer)
    cpu_layers: list[int] = field(default_factory=list)
    plan: dict = field(default_factory=dict)  # the written file's plan, as `hybrid rules` makes it

    @property
    def minimum(self) -> int:
        return self.base_bytes + self.kv_bytes + self.reserve_bytes


def fit(source, budget: int, *, gpu: str = "cuda:0", ctx: int | None = None, slots: int = 4, profile: str = "decode",
        reserve: int = 0, assume: dict[str, int] | None = None) -> Fit:
    """Plan `source` for a GPU `gpu` with `budget` bytes free. `assume`: the GPUs to check
    the written plan against (default: {gpu: budget})."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r}: choose one of {', '.join(PROFILES)}")
    if slots < 1:
        raise ValueError(f"slots must be at least 1, not {slots}")
    gpu = device_key(gpu)
    assume = assume or {gpu: budget}
    _, cfg, _, _ = describe(source)
    base = _base_rules(family_name(cfg["model_type"]), gpu, profile)
    config, module, placements, counts, refs, ruleset, _, _ = build(source, _dump(base), assume)
    ctx = ctx or min(config.max_position_embeddings, 4096)
    layers = _expert_layers(placements, ruleset.dtype, gpu)
    if profile == "prefill":
        reserve += _prefill_workspace(layers, config)
    kv = kv_cache_by_device(module, placement_of(placements, ruleset.dtype), slots, ctx).get(gpu, 0)
    base_plan = summarize(placements, counts, refs, ruleset)
    base_bytes = sum(d["weight_bytes"] for d in base_plan["devices"] if d["device"] == gpu)
    result = Fit("", gpu, budget, base_bytes, kv, reserve)
    if budget < result.minimum:
        raise FitError(
            f"{gpu}: {human(budget)} is too small for this model with {slots} slots of {ctx} tokens: the GPU part "
            f"without routed experts needs at least {human(result.minimum)} (weights {human(base_bytes)}, KV cache "
            f"{human(kv)}, reserve {human(reserve)}); give --gpu-memory {_size_arg(result.minimum)} or more, or "
            f"fewer --slots, a smaller --ctx, a smaller --gpu-reserve")

    left, filling, extra_rules = budget - result.minimum, True, []
    for layer in layers:  # whole layers while they fit, then part of one, then the CPU
        n = min(left // max(1, layer.gpu_bytes // layer.num_experts), layer.num_experts - 1)
        if filling and layer.gpu_bytes <= left:
            result.whole_layers.append(layer.index)
            left -= layer.gpu_bytes
        elif filling and layer.splittable and n >= 1:
            kwargs = {"device": gpu, "dtype": str(ruleset.dtype).removeprefix("torch."), "experts": int(n),
                      **_cpu_kwargs(layer.placement)}
            extra_rules.append({"match": {"name": re.escape(layer.path)},
                                "replace": {"class": "SplitExperts", "kwargs": kwargs}})
            result.split = (layer.index, int(n), layer.num_experts)
            filling = False
        else:
            result.cpu_layers.append(layer.index)
            filling = False
    if result.whole_layers:
        extra_rules.insert(0, {"match": {"name": _layers_pattern(layers[0].path, result.whole_layers)},
                               "replace": {"class": "default", "kwargs": {"device": gpu}}})
    base["rules"] = extra_rules + base["rules"]
    base["description"] = (
        f"Fitted by `hybrid fit` for {gpu} with {human(budget)}: {len(result.whole_layers)} of {len(layers)} layers' "
        f"routed experts on the GPU" + (f", layer {result.split[0]} split ({result.split[1]} of {result.split[2]} "
                                        f"experts on the GPU)" if result.split else "")
        + f"; KV cache for {slots} slots of {ctx} tokens, reserve {human(reserve)}, profile {profile}."
    )
    result.rules_yaml = _dump(base)
    # the file as the rule engine reads it: the plan `hybrid rules` prints for it
    config, module, placements, counts, refs, ruleset, _, _ = build(source, result.rules_yaml, assume)
    gpu_kv = kv_cache_by_device(module, placement_of(placements, ruleset.dtype), slots, ctx)
    result.plan = summarize(placements, counts, refs, ruleset, gpu_kv, reserve)
    return result


def _base_rules(family: str, gpu: str, profile: str) -> dict:
    """The family's -gpu file as data, on `gpu`; with the prefill profile, the CPU experts
    compute long prompts on the GPU (`prefill_device`)."""
    data = yaml.safe_load(resolve_rules_path(f"{family}-gpu").read_text())
    text = yaml.safe_dump(data).replace("cuda:0", gpu)
    data = yaml.safe_load(text)
    data["default_device"] = gpu
    if profile == "prefill":
        for rule in data["rules"]:
            if rule.get("replace", {}).get("class") == "CPUExperts":
                rule["replace"].setdefault("kwargs", {})["prefill_device"] = gpu
    return data


def _expert_layers(placements: list[Placement], dtype, gpu: str) -> list[ExpertLayer]:
    """The routed experts of each layer (modules `model.layers.N.<...>.experts`) with what
    they weigh in torch on the GPU."""
    out = []
    for p in placements:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:\w+\.)*experts", p.path)  # not shared_experts
        if m is None or not isinstance(getattr(p.module, "gate_proj", None), torch.Tensor):
            continue
        if p.operator is None and device_key(p.device) == gpu:
            continue  # on the GPU in the base file already (an operator declined it): part of the minimum
        on_gpu = Placement(p.path, p.module, gpu, dtype, None)
        num = getattr(p.module, "num_experts", None) or p.module.gate_proj.shape[0]
        splittable = (p.operator is CPUExperts and isinstance(p.module, SplitExperts.replaces)
                      and p.module.biases is None and p.module.glu is None)  # SplitExperts takes neither
        out.append(ExpertLayer(int(m.group(1)), p.path, p, placement_bytes(on_gpu, {}), num, splittable))
    return out


def _cpu_kwargs(p: Placement) -> dict:
    """The CPU experts' kwargs that SplitExperts's CPU share takes too."""
    keep = ("quant", "threads", "activations", "prefill_device", "prefill_min_tokens")
    return {k: v for k, v in p.kwargs.items() if k in keep}


def _prefill_workspace(layers: list[ExpertLayer], config) -> int:
    """GPU memory the prefill profile adds: two experts' float32 weights in flight (streamed
    one at a time by `prefill_device`) and a chunk's activations through one of them."""
    if not layers:
        return 0
    per_expert = max(layer.gpu_bytes // layer.num_experts for layer in layers)  # in the file's dtype
    width = 3 * getattr(config, "moe_intermediate_size", getattr(config, "intermediate_size", 0))
    return 2 * per_expert * 2 + PREFILL_CHUNK * (config.hidden_size + width) * 4


def _layers_pattern(path: str, layers: list[int]) -> str:
    """A regex for the experts at `path` (one layer's) in each of `layers`."""
    prefix, rest = re.fullmatch(r"(model\.layers\.)\d+(\..*)", path).groups()
    numbers = str(layers[0]) if len(layers) == 1 else "(" + "|".join(str(i) for i in layers) + ")"
    return re.escape(prefix) + numbers + re.escape(rest)


def _size_arg(n: int) -> str:
    """A --gpu-memory value of at least n bytes, in MiB."""
    return f"{-(-n // (1 << 20))}MiB"


def _dump(data: dict) -> str:
    """A rule file in the built-in files' style: one flow mapping per match and replace."""
    lines = []
    if data.get("description"):
        lines += ["description: >"] + [f"  {line}" for line in _wrap(data["description"])]
    lines += [f"default_device: {_scalar(data.get('default_device', 'cpu'))}", f"dtype: {data.get('dtype', 'float32')}"]
    if data.get("cudnn_attention") is not None:
        lines.append(f"cudnn_attention: {_scalar(data['cudnn_attention'])}")
    if data.get("torch_threads") is not None:
        lines.append(f"torch_threads: {data['torch_threads']}")
    lines.append("rules:" if data["rules"] else "rules: []")
    for rule in data["rules"]:
        lines.append(f"  - match: {_scalar(rule['match'])}")
        if "replace" in rule:
            lines.append(f"    replace: {_scalar(rule['replace'])}")
        if "recursive" in rule:
            lines.append(f"    recursive: {_scalar(rule['recursive'])}")
    return "\n".join(lines) + "\n"


def _scalar(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_scalar(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    s = str(v)
    return s if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s) else "'" + s.replace("'", "''") + "'"


def _wrap(text: str, width: int = 88) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line] if line else lines
