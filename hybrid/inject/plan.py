"""What a rule file will do to a model, computed without reading any weight: every rule
with its match count, every group of modules with operator, device and bytes, and the
totals per device against the memory that device has free."""

from __future__ import annotations

import inspect
import math
from collections import defaultdict

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from hybrid.inject.placement import Placement, RuleSet, device_key

Q = GGMLQuantizationType


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def placement_bytes(p: Placement, refs: dict) -> int:
    """Bytes the module at `p` will hold once loaded: operators keep the stored form (or
    the format their `quant` asks for); torch modules hold their own parameters in the
    placement's dtype; an operator that keeps its children holds nothing of its own."""
    prefix = f"{p.path}." if p.path else ""
    if p.keeps_children:
        return 0
    if p.operator is not None:
        total = 0
        quant = p.kwargs.get("quant")
        for name, param in p.module.named_parameters():
            ref = refs.get(prefix + name)
            if ref is None:
                continue
            if quant and ref.qtype in (Q.F32, Q.F16, Q.BF16) and param.dim() > 1:
                block, size = GGML_QUANT_SIZES[Q[str(quant).upper()]]
                total += math.prod(ref.shape) // block * size
            else:
                total += ref.nbytes
        return total
    return sum(t.numel() * _element_bytes(p.dtype) for t in p.module.parameters(recurse=False))


def device_bytes(p: Placement, refs: dict) -> dict[str, int]:
    """Bytes the module at `p` holds on each device: one device, or those of an operator
    that splits its weights (`Operator.device_bytes`, e.g. SplitExperts)."""
    split = getattr(p.operator, "device_bytes", None)
    if split is not None:
        prefix = f"{p.path}." if p.path else ""
        return {device_key(d): n for d, n in split(p.module, lambda n: refs.get(prefix + n), p.kwargs).items()}
    return {device_key(operator_device(p)): placement_bytes(p, refs)}


def operator_device(p: Placement) -> str:
    """Where the weights of the module at `p` live: an operator whose rule names no device
    keeps them where its own `device` default says (CPUExperts in a GPU file: host RAM),
    not on the device it inherited."""
    if p.operator is None or "device" in p.kwargs or "generate_device" in p.kwargs:
        return p.device
    param = inspect.signature(p.operator.__init__).parameters.get("device")
    return param.default if param is not None and isinstance(param.default, str) else p.device


def placement_of(placements: list[Placement], dtype: torch.dtype = torch.float32):
    """path -> (device, dtype) of the module at `path` or its nearest placed ancestor."""
    placed = {p.path: p for p in placements}

    def placement(path: str):
        while path not in placed and path:
            path = path.rpartition(".")[0]
        return (placed[path].device, placed[path].dtype) if path in placed else ("cpu", dtype)

    return placement


def kv_cache_by_device(module, placement, slots: int, ctx: int) -> dict[str, int]:
    """Bytes of the KV cache of `slots` sequences of `ctx` tokens on each device, from
    where each layer's attention is placed (a sliding-window layer keeps its ring)."""
    out: dict[str, int] = defaultdict(int)
    for i, nbytes in enumerate(module.layer_cache_bytes(ctx, placement)):
        device, _ = placement(f"model.layers.{i}.self_attn")
        out[device_key(device)] += slots * nbytes
    return dict(out)


def available_bytes(device: str) -> int:
    d = torch.device(device)
    if d.type == "cuda":
        free, _ = torch.cuda.mem_get_info(d)
        return int(free)
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def summarize(placements: list[Placement], counts: dict[int, int], refs: dict, ruleset: RuleSet,
              gpu_kv: dict[str, int] | None = None, gpu_reserve: int = 0) -> dict:
    """The plan as a dict (see `format_plan`). Each GPU's need is its weights, `gpu_kv`
    (its KV cache) and `gpu_reserve` (activations, allocator slack); the CPU's is its
    weights (its KV cache fills as tokens come: see `expected_rss`). A GPU assumed
    (`ruleset.assumed`) has the memory assumed."""
    groups: dict[tuple, dict] = defaultdict(lambda: {"modules": 0, "bytes": 0, "examples": []})
    for p in placements:
        rule = p.rule.index if p.rule else None
        op = p.operator.__name__ if p.operator else "torch"
        for device, nbytes in device_bytes(p, refs).items():
            if p.operator is None and nbytes == 0:
                continue  # containers hold no weights of their own
            g = groups[(rule, op, device)]
            g["modules"] += 1
            g["bytes"] += nbytes
            if len(g["examples"]) < 2:
                g["examples"].append(p.path or "<root>")
    weights: dict[str, int] = defaultdict(int)
    for (_, _, device), g in groups.items():
        weights[device] += g["bytes"]
    kv = {d: n for d, n in (gpu_kv or {}).items() if not d.startswith("cpu")}
    devices = []
    for device in sorted(set(weights) | set(kv)):
        reserve = gpu_reserve if device != "cpu" else 0
        need = weights[device] + kv.get(device, 0) + reserve
        free = ruleset.assumed[device] if device in ruleset.assumed else available_bytes(device)
        devices.append({"device": device, "bytes": need, "weight_bytes": weights[device], "kv_cache_bytes": kv.get(device, 0),
                        "reserve_bytes": reserve, "available": free, "assumed": device in ruleset.assumed,
                        "fits": need <= free})
    return {
        "rules_file": ruleset.source,
        "default_device": ruleset.default_device,
        "dtype": str(ruleset.dtype).removeprefix("torch."),
        "cudnn_attention": ruleset.cudnn_attention,
        "torch_threads": ruleset.torch_threads,
        "rules": [
            {
                "rule": r.index,
                "line": r.line,
                "match": {k: v for k, v in (("name", r.name.pattern if r.name else None), ("class", r.cls)) if v},
                "replace": r.replace,
                "kwargs": r.kwargs,
                "matches": counts[r.index],
            }
            for r in ruleset.rules
        ],
        "groups": [
            {"rule": rule, "operator": op, "device": device, **g}
            for (rule, op, device), g in sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1], kv[0][2]))
        ],
        "fallbacks": [{"module": p.path, "device": device_key(p.device),
                       "operator": p.operator.__name__ if p.operator else "torch", "declined": p.fallback}
                      for p in placements if p.fallback],
        "devices": devices,
        "fits": all(d["fits"] for d in devices),
    }


def kv_cache_per_slot(module, placements: list[Placement], context: int) -> dict:
    """Bytes of KV cache one sequence slot of `context` tokens takes (sliding-window layers
    hold only their window, recurrent layers a state of one size), from the model's own
    `cache_bytes`."""
    placement = placement_of(placements)
    layers = module.model.layers
    sliding = sum(1 for layer in layers if getattr(getattr(layer, "self_attn", None), "sliding_window", None))
    recurrent = sum(1 for layer in layers if not hasattr(layer, "self_attn"))
    return {"context": context, "bytes_per_slot": module.cache_bytes(context, placement), "sliding_layers": sliding,
            "recurrent_layers": recurrent, "layers": len(layers)}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def format_devices(devices: list[dict]) -> str:
    """The per-device totals: weights, KV cache and reserve (GPUs), needs against available."""
    lines = ["device      weights     KV cache      reserve        needs    available  fits"]
    for d in devices:
        free = human(d["available"]) + (" (assumed)" if d.get("assumed") else "")
        lines.append(f"{d['device']:<7} {human(d['weight_bytes']):>11}  {human(d['kv_cache_bytes']):>11}  "
                     f"{human(d['reserve_bytes']):>11}  {human(d['bytes']):>11}  {free:>11}  {'yes' if d['fits'] else 'NO'}")
    return "\n".join(lines)


def format_plan(plan: dict) -> str:
    on = plan["cudnn_attention"]
    cudnn = "" if on is None else f", cuDNN attention {'on' if on else 'off'} (process-wide)"
    threads = plan.get("torch_threads")
    cudnn += "" if threads is None else f", torch threads {threads} (process-wide)"
    lines = [f"rules: {plan['rules_file']} (default device {plan['default_device']}, dtype {plan['dtype']}{cudnn})", ""]
    lines.append("rule  line  matches  replace          match")
    for r in plan["rules"]:
        match = " ".join(f"{k}={v}" for k, v in r["match"].items())
        warn = "   <- matches nothing" if r["matches"] == 0 else ""
        lines.append(f"{r['rule']:>4}  {r['line']:>4}  {r['matches']:>7}  {r['replace']:<15}  {match}{warn}")
    lines += ["", "rule      operator         device   modules        bytes  e.g."]
    for g in plan["groups"]:
        rule = str(g["rule"]) if g["rule"] is not None else "inherit"
        lines.append(
            f"{rule:<8}  {g['operator']:<15}  {g['device']:<7}  {g['modules']:>7}  {human(g['bytes']):>11}  {', '.join(g['examples'])}"
        )
    if "kv_cache" in plan:
        kv = plan["kv_cache"]
        window = f", {kv['sliding_layers']} of {kv['layers']} layers sliding-window" if kv["sliding_layers"] else ""
        if kv.get("recurrent_layers"):
            window += f", {kv['recurrent_layers']} of {kv['layers']} layers recurrent (a state of one size)"
        lines += ["", f"KV cache: {human(kv['bytes_per_slot'])} per slot of {kv['context']} tokens{window}"]
    if "prefix_cache" in plan:
        pc = plan["prefix_cache"]
        if pc["budget_bytes"]:
            tokens = pc["budget_bytes"] // max(1, pc["kv_bytes_per_token"])
            lines += [f"prefix cache: up to {human(pc['budget_bytes'])} of earlier prompts' KV (about {tokens} tokens, "
                      f"in blocks of {pc['block_tokens']})"]
        else:
            lines += ["prefix cache: off" + (" (recurrent layers)" if plan.get("kv_cache", {}).get("recurrent_layers") else "")]
    if plan["fallbacks"]:
        lines += ["", f"fallbacks ({len(plan['fallbacks'])} modules: a matching operator could not take the shapes)"]
        for f in plan["fallbacks"]:
            lines.append(f"  {f['module']} -> {f['operator']} on {f['device']}")
            lines += [f"      {reason}" for reason in f["declined"]]
    lines += ["", format_devices(plan["devices"])]
    rss = plan.get("expected_rss")
    if rss:
        lines += ["", f"expected RSS: {human(rss['at_start_bytes'])} at start (runtime {human(rss['runtime_bytes'])} + CPU "
                  f"weights {human(rss['cpu_weight_bytes'])}), up to {human(rss['kv_full_bytes'])} with {rss['slots']} "
                  f"slots of {rss['ctx']} tokens full (KV cache {human(rss['kv_bytes_per_token'])} per token"
                  + (f", recurrent state {human(rss['state_bytes_per_slot'])} per slot" if rss.get("state_bytes_per_slot") else "")
                  + ")"
                  + (" and the prefix cache full" if rss.get("prefix_cache_bytes") else "")]
    return "\n".join(lines)
