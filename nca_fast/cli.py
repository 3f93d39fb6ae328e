"""The ``nca-fast`` command line. Each subcommand lives in ``nca_fast/commands/<name>.py`` and exposes
``add_parser(subparsers)`` (which sets ``func``) so that commands stay independent of each other."""
from __future__ import annotations

import argparse
import logging
import sys

from ._version import __version__
from .commands import bench, export, fit_decoder, info, kernels, run, train, view

COMMANDS = (info, run, bench, kernels, fit_decoder, train, export, view)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nca-fast", description="nca_fast: run, render, benchmark, train, export and watch neural "
                                     "cellular automata (`nca-fast COMMAND --help` for each command).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log backend choices")
    parser.add_argument("--version", action="version", version=f"nca-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # (a command that re-runs itself in a clean process passes these on)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"nca-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError, MemoryError, FloatingPointError) as e:
        message = " ".join(str(e).split()) or type(e).__name__  # one line
        print(f"nca-fast {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
