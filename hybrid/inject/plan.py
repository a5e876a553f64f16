"""What a rule file will do to a model, computed without reading any weight: every rule
with its match count, every group of modules with operator, device and bytes, and the
totals per device against the memory that device has free."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from hybrid.inject.placement import Placement, RuleSet

Q = GGMLQuantizationType


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def placement_bytes(p: Placement, refs: dict) -> int:
    """Bytes the module at `p` will hold once loaded: operators keep the stored form (or
    the format their `quant` asks for); torch modules hold their own parameters in the
    placement's dtype."""
    prefix = f"{p.path}." if p.path else ""
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


def available_bytes(device: str) -> int:
    d = torch.device(device)
    if d.type == "cuda":
        free, _ = torch.cuda.mem_get_info(d)
        return int(free)
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def summarize(placements: list[Placement], counts: dict[int, int], refs: dict, ruleset: RuleSet) -> dict:
    groups: dict[tuple, dict] = defaultdict(lambda: {"modules": 0, "bytes": 0, "examples": []})
    for p in placements:
        rule = p.rule.index if p.rule else None
        op = p.operator.__name__ if p.operator else "torch"
        nbytes = placement_bytes(p, refs)
        if p.operator is None and nbytes == 0:
            continue  # containers hold no weights of their own
        g = groups[(rule, op, str(torch.device(p.device)))]
        g["modules"] += 1
        g["bytes"] += nbytes
        if len(g["examples"]) < 2:
            g["examples"].append(p.path or "<root>")
    totals: dict[str, int] = defaultdict(int)
    for (_, _, device), g in groups.items():
        totals[device] += g["bytes"]
    devices = []
    for device, need in sorted(totals.items()):
        free = available_bytes(device)
        devices.append({"device": device, "bytes": need, "available": free, "fits": need <= free})
    return {
        "rules_file": ruleset.source,
        "default_device": ruleset.default_device,
        "dtype": str(ruleset.dtype).removeprefix("torch."),
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
        "fallbacks": [{"module": p.path, "device": str(torch.device(p.device)),
                       "operator": p.operator.__name__ if p.operator else "torch", "declined": p.fallback}
                      for p in placements if p.fallback],
        "devices": devices,
        "fits": all(d["fits"] for d in devices),
    }


def kv_cache_per_slot(module, placements: list[Placement], context: int) -> dict:
    """Bytes of KV cache one sequence slot of `context` tokens takes (sliding-window layers
    hold only their window), from the model's own `cache_bytes`."""
    placed = {p.path: (torch.device(p.device), p.dtype) for p in placements}

    def placement(path: str):
        while path not in placed and path:
            path = path.rpartition(".")[0]
        return placed.get(path, (torch.device("cpu"), torch.float32))

    sliding = sum(1 for layer in module.model.layers if getattr(layer.self_attn, "sliding_window", None))
    return {"context": context, "bytes_per_slot": module.cache_bytes(context, placement), "sliding_layers": sliding,
            "layers": len(module.model.layers)}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def format_plan(plan: dict) -> str:
    lines = [f"rules: {plan['rules_file']} (default device {plan['default_device']}, dtype {plan['dtype']})", ""]
    lines.append("rule  line  matches  replace         match")
    for r in plan["rules"]:
        match = " ".join(f"{k}={v}" for k, v in r["match"].items())
        warn = "   <- matches nothing" if r["matches"] == 0 else ""
        lines.append(f"{r['rule']:>4}  {r['line']:>4}  {r['matches']:>7}  {r['replace']:<14}  {match}{warn}")
    lines += ["", "rule      operator        device   modules        bytes  e.g."]
    for g in plan["groups"]:
        rule = str(g["rule"]) if g["rule"] is not None else "inherit"
        lines.append(
            f"{rule:<8}  {g['operator']:<14}  {g['device']:<7}  {g['modules']:>7}  {human(g['bytes']):>11}  {', '.join(g['examples'])}"
        )
    if "kv_cache" in plan:
        kv = plan["kv_cache"]
        window = f", {kv['sliding_layers']} of {kv['layers']} layers sliding-window" if kv["sliding_layers"] else ""
        lines += ["", f"KV cache: {human(kv['bytes_per_slot'])} per slot of {kv['context']} tokens{window}"]
    if "prefix_cache" in plan:
        pc = plan["prefix_cache"]
        if pc["budget_bytes"]:
            tokens = pc["budget_bytes"] // max(1, pc["kv_bytes_per_token"])
            lines += [f"prefix cache: up to {human(pc['budget_bytes'])} of earlier prompts' KV (about {tokens} tokens, "
                      f"in blocks of {pc['block_tokens']})"]
        else:
            lines += ["prefix cache: off"]
    if plan["fallbacks"]:
        lines += ["", f"fallbacks ({len(plan['fallbacks'])} modules: a matching operator could not take the shapes)"]
        for f in plan["fallbacks"]:
            lines.append(f"  {f['module']} -> {f['operator']} on {f['device']}")
            lines += [f"      {reason}" for reason in f["declined"]]
    lines += ["", "device   needs        available    fits"]
    for d in plan["devices"]:
        lines.append(f"{d['device']:<7}  {human(d['bytes']):>11}  {human(d['available']):>11}  {'yes' if d['fits'] else 'NO'}")
    rss = plan.get("expected_rss")
    if rss:
        lines += ["", f"expected RSS: {human(rss['at_start_bytes'])} at start (runtime {human(rss['runtime_bytes'])} + CPU "
                  f"weights {human(rss['cpu_weight_bytes'])}), up to {human(rss['kv_full_bytes'])} with {rss['slots']} "
                  f"slots of {rss['ctx']} tokens full (KV cache {human(rss['kv_bytes_per_token'])} per token)"
                  + (" and the prefix cache full" if rss.get("prefix_cache_bytes") else "")]
    return "\n".join(lines)
