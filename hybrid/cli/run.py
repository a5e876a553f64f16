"""`hybrid run`: one completion, streamed to stdout."""

from __future__ import annotations

import sys

HELP = "generate one answer for a prompt and stream it to stdout"


def add_parser(subparsers):
    from hybrid.cli.defaults import add_model_args, add_prefix_cache_arg, add_sampling_args, add_start_arg

    p = subparsers.add_parser("run", help=HELP, description=HELP + ". The prompt is chat-formatted with the "
                              "model's template unless --raw is given. Progress goes to stderr.")
    p.add_argument("--prompt", "-p", help="the prompt (default: read from stdin)")
    p.add_argument("--raw", action="store_true", help="plain completion of the prompt, no chat template")
    p.add_argument("--system", metavar="TEXT", help="system message (chat format only)")
    p.add_argument("--json", action="store_true", help="constrain the output to a JSON object or array")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr at the end")
    add_model_args(p)
    add_start_arg(p)
    add_prefix_cache_arg(p)
    add_sampling_args(p)
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    from hybrid.cli.defaults import load_for_engine, prefix_cache_bytes, sampling_from_args, tiers_note
    from hybrid.engine.scheduler import Engine
    from hybrid.engine.generate import chat_prompt_ids

    params = sampling_from_args(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.raw and args.system:
        raise ValueError("--system needs the chat format; drop --raw")
    model, tiers = load_for_engine(args)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.name} has no tokenizer")
    if args.raw:
        ids = tok.encode(prompt, add_special_tokens=True)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = chat_prompt_ids(tok, messages + [{"role": "user", "content": prompt}])
    engine = Engine(model, slots=1, ctx=args.ctx, prefix_cache=prefix_cache_bytes(args)).start()
    del model   # after a tiered start's swap nothing else keeps the torch tier's float32 weights
    if tiers is not None:
        tiers.attach(engine)
        print(tiers_note(tiers), file=sys.stderr, flush=True)
    try:
        stream = engine.submit(ids, params, json_mode=args.json)
        try:
            for ev in stream:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
        finally:
            stream.cancel()
        sys.stdout.write("\n")
        sys.stdout.flush()
    finally:
        engine.stop()
        if tiers is not None:
            tiers.stop()
            print(tiers_note(tiers), file=sys.stderr, flush=True)
    if ev.error:
        print(f"hybrid run: error: {ev.error}", file=sys.stderr)
        return 1
    if args.stats:
        print(format_stats(ev), file=sys.stderr)
    return 0


def format_stats(ev) -> str:
    """'N tokens, X tok/s (prompt: M tokens, Y tok/s)' from a stream's last event."""
    u, t = ev.usage or {}, ev.timings or {}

    def rate(n, ns):
        return f"{n / (ns / 1e9):.1f} tok/s" if ns else "- tok/s"

    n = u.get("completion_tokens", 0)  # the first token came out of the prompt pass
    return (f"{n} tokens, {rate(max(n - 1, 0), t.get('eval_ns', 0))} "
            f"(prompt: {u.get('prompt_tokens', 0)} tokens, {rate(u.get('prompt_tokens', 0), t.get('prompt_eval_ns', 0))})")
