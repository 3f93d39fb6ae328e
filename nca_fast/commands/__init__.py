"""The ``nca-fast`` subcommands: one module each, exposing ``add_parser(subparsers)``."""


def described(doc: str) -> str:
    """A module docstring's first paragraph on one line: a command's ``--help`` description (its
    first line alone would stop mid-sentence)."""
    return " ".join(doc.split("\n\n")[0].split())
