"""`hybrid` command line: one module per subcommand.

A subcommand module `hybrid/cli/<name>.py` has `add_parser(subparsers)`, which adds its
parser and sets `func=main`, and `main(args) -> int` (the exit status). Modules listed
in COMMANDS that are not present are skipped, so each can be added on its own. Import
heavy dependencies inside `main`, so `hybrid --help` stays fast.

Errors: bad options and bad input (a missing model file, a bad rule file, a bad value)
print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ["run", "chat", "serve", "rules", "fit", "bench"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message (subparsers inherit it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> ArgumentParser:
    from hybrid import __version__

    parser = ArgumentParser(prog="hybrid", description="Run language models across CPU and GPU, "
                            "placed by YAML rules.")
    parser.add_argument("--version", action="version", version=f"hybrid {__version__}")
    parser.add_argument("--log-level", default="WARNING", metavar="LEVEL",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hybrid.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"hybrid.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hybrid run ... | head`
        sys.stderr.close()
        return 0
    except (ValueError, OSError) as e:  # CheckpointError, RuleError, ContextLengthExceeded, missing files
        print(f"hybrid {args.command}: error: {e}", file=sys.stderr)
        return 2
