"""The ``nca-fast`` command line. Each subcommand lives in ``nca_fast/commands/<name>.py`` and exposes
``add_parser(subparsers)`` (which sets ``func``) so that commands stay independent of each other."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("info", "run", "bench", "kernels", "fit_decoder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nca-fast", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"nca_fast.commands.{name}")
        except ModuleNotFoundError as e:  # a command whose module is not written yet
            if e.name != f"nca_fast.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"nca-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
