"""`hybrid rules`: show what a rule file does to a model, without loading weights."""

from __future__ import annotations

import json
import sys

HELP = "print the placement plan of a rule file for a model (no weights are read)"


def add_parser(subparsers):
    from .defaults import add_gpu_args, add_prefix_cache_arg

    p = subparsers.add_parser(
        "rules",
        help=HELP,
        description=HELP + ". Exit status 1 if the plan does not fit the memory available, 2 on bad input.",
    )
    p.add_argument("--model", help="model file or directory (default: the built-in model)")
    p.add_argument("--rules", help="rule file path or built-in name (default: chosen by family and CUDA presence)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--slots", type=int, default=4, help="KV-cache slots (default: serve's 4)")
    p.add_argument("--ctx", type=int, help="context per slot (default: the model's, at most 4096)")
    add_gpu_args(p)
    add_prefix_cache_arg(p)
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    from hybrid.cli.defaults import default_model_path, prefix_cache_bytes
    from hybrid.engine.prefix_cache import DEFAULT_BLOCK
    from hybrid.inject.loader import build
    from hybrid.inject.memory import expected_rss, kv_bytes_per_token
    from hybrid.inject.plan import format_plan, kv_cache_by_device, kv_cache_per_slot, placement_of, summarize

    assume = dict(args.assume_gpu) or None
    config, module, placements, counts, refs, ruleset, src, meta = build(args.model or default_model_path(), args.rules,
                                                                         assume)
    ctx = args.ctx or min(config.max_position_embeddings, 4096)
    placement = placement_of(placements, ruleset.dtype)
    gpu_kv = kv_cache_by_device(module, placement, args.slots, ctx)
    plan = summarize(placements, counts, refs, ruleset, gpu_kv, args.gpu_reserve)
    plan["model"] = str(src.path)
    plan["kv_cache"] = kv_cache_per_slot(module, placements, config.max_position_embeddings)
    cpu = sum(d["weight_bytes"] for d in plan["devices"] if d["device"] == "cpu")
    per_token = kv_bytes_per_token(module, placement)
    # the engine keeps no prefix cache for a model with recurrent layers (hybrid.engine.scheduler)
    budget = 0 if plan["kv_cache"]["recurrent_layers"] else prefix_cache_bytes(args)
    plan["prefix_cache"] = {"budget_bytes": budget, "block_tokens": DEFAULT_BLOCK, "kv_bytes_per_token": per_token}
    # a GPU's KV cache is not resident; a recurrent state is the same size at 1 token as at 2
    one, two = (kv_cache_by_device(module, placement, 1, n).get("cpu", 0) for n in (1, 2))
    plan["expected_rss"] = expected_rss(cpu, two - one, args.slots, ctx, budget, state_per_slot=2 * one - two)
    print(json.dumps(plan, indent=2) if args.json else f"model: {src.path}\n" + format_plan(plan))
    if not plan["fits"]:
        print("the plan does not fit the memory available", file=sys.stderr)
        return 1
    return 0
