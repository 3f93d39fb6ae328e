"""Errors of the model importers, and the lazy import of optional dependencies."""
from __future__ import annotations

import importlib
import os


class ModelFormatError(ValueError):
    """A model file that cannot be read: unknown format, corrupt, truncated, wrong shapes, unsafe."""

    def __init__(self, path, problem: str):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{self.path}: {problem}")


def optional_import(module: str, extra: str):
    """Import an optional dependency, or say which ``pip install "nca-fast[extra]"`` provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for this; install it with "
                          f'pip install "nca-fast[{extra}]"') from e
