"""`hybrid chat`: an interactive conversation in the terminal."""

from __future__ import annotations

import sys

HELP = "chat with a model in the terminal"
COMMANDS = """commands:
  /reset   forget the conversation (the system message stays)
  /help    show this help
  /exit    leave (also /bye, Ctrl-D)
input: end a line with \\ to continue on the next one, or wrap several lines in \"\"\" ... \"\"\".
Ctrl-C stops the current answer."""


def add_parser(subparsers):
    from hybrid.cli.defaults import add_model_args, add_prefix_cache_arg, add_sampling_args, add_start_arg

    p = subparsers.add_parser("chat", help=HELP, description=HELP + ". Keeps the conversation, streams the "
                              "answers and shows the speed after each.\n\n" + COMMANDS,
                              formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--system", metavar="TEXT", help="system message")
    add_model_args(p)
    add_start_arg(p)
    add_prefix_cache_arg(p)
    add_sampling_args(p)
    p.set_defaults(func=main)
    return p


def read_message(read=input):
    """One user message: a line, lines joined by a trailing backslash, or a \"\"\" block.
    Raises EOFError at end of input."""
    line = read(">>> ")
    if line.lstrip().startswith('"""'):
        text = line.lstrip()[3:]
        lines = []
        while not text.rstrip().endswith('"""'):
            lines.append(text)
            text = read("... ")
        lines.append(text.rstrip()[:-3])
        return "\n".join(lines).strip("\n")
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read("... ")
    return "\n".join(lines + [line])


def main(args) -> int:
    from hybrid.cli.run import format_stats
    from hybrid.cli.defaults import load_for_engine, prefix_cache_bytes, sampling_from_args, tiers_note
    from hybrid.engine.scheduler import Engine
    from hybrid.engine.generate import ContextLengthExceeded, chat_prompt_ids

    params = sampling_from_args(args)
    model, tiers = load_for_engine(args)
    if model.tokenizer is None:
        raise ValueError(f"{model.name} has no tokenizer")
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:
            pass
    engine = Engine(model, slots=1, ctx=args.ctx, prefix_cache=prefix_cache_bytes(args)).start()
    tokenizer, name = model.tokenizer, model.name
    del model   # after a tiered start's swap nothing else keeps the torch tier's float32 weights
    said = None   # the kernels' state last told (a tiered start)
    if tiers is not None:
        tiers.attach(engine)
        said = tiers.state
        print(tiers_note(tiers), file=sys.stderr, flush=True)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print(f"{name}: type a message, /help for commands, /exit to leave.", flush=True)
    try:
        while True:
            try:
                text = read_message()
            except KeyboardInterrupt:
                print("\n(use /exit or Ctrl-D to leave)", flush=True)
                continue
            except EOFError:
                print(flush=True)
                return 0
            command = text.strip()
            if command in ("/exit", "/bye", "/quit"):
                return 0
            if command in ("/reset", "/clear"):
                history.clear()
                print("(conversation cleared)", flush=True)
                continue
            if command in ("/help", "/?"):
                print(COMMANDS, flush=True)
                continue
            if not command:
                continue
            history.append({"role": "user", "content": text})
            try:
                ids = _fit(tokenizer, system, history, params.max_tokens, engine.ctx, chat_prompt_ids)
                stream = engine.submit(ids, params)
            except ContextLengthExceeded as e:
                history.pop()
                print(f"error: {e}", file=sys.stderr, flush=True)
                continue
            answer, last = [], None
            try:
                for last in stream:
                    answer.append(last.text)
                    sys.stdout.write(last.text)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                stream.cancel()
                print("\n(stopped)", flush=True)
            else:
                print(flush=True)
                if last is not None and last.error:
                    print(f"error: {last.error}", file=sys.stderr, flush=True)
                elif last is not None:
                    print(f"[{format_stats(last)}]", file=sys.stderr, flush=True)
            if tiers is not None and tiers.state != said and tiers.done.is_set():
                said = tiers.state
                print(tiers_note(tiers), file=sys.stderr, flush=True)
            history.append({"role": "assistant", "content": "".join(answer)})
    finally:
        engine.stop()
        if tiers is not None:
            tiers.stop()


def _fit(tokenizer, system, history, max_tokens, ctx, render):
    """Prompt ids for the conversation, dropping the oldest exchanges until it fits."""
    while True:
        ids = render(tokenizer, system + history)
        if len(ids) + (max_tokens or 1) <= ctx or len(history) <= 1:
            return ids  # the engine reports a single message that is too long
        del history[:2]
        print("(the oldest exchange was dropped to fit the context)", file=sys.stderr, flush=True)
