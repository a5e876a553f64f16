"""`hybrid bench`: prefill and decode speed, and the fraction of the memory-bandwidth
roofline reached (see hybrid/cli/measure.py)."""

from __future__ import annotations

import json

HELP = "measure prefill/decode speed and the fraction of the memory-bandwidth roofline reached"


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help=HELP, description=HELP + ".")
    p.add_argument("--model", help="model file or directory (default: the built-in model)")
    p.add_argument("--rules", help="rule file path or built-in name")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for prefill (default 512)")
    p.add_argument("--gen-tokens", type=int, default=128, help="decode steps per batch size (default 128)")
    p.add_argument("--batch", default="1", help="comma-separated decode batch sizes, e.g. 1,4,8 (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    from hybrid.cli.measure import format_result, run
    from hybrid.cli.defaults import default_model_path
    from hybrid.inject.loader import load

    try:
        batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1 or args.prompt_tokens < 1 or args.gen_tokens < 1:
        raise ValueError("--batch takes positive integers separated by commas; --prompt-tokens and --gen-tokens must be >= 1")
    model = load(args.model or default_model_path(), rules=args.rules, progress=not args.json)
    if args.prompt_tokens + args.gen_tokens + 1 > model.context_length:
        raise ValueError(f"--prompt-tokens + --gen-tokens exceeds the model's context of {model.context_length}")
    result = run(model, args.prompt_tokens, args.gen_tokens, batches)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0
