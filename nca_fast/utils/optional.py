"""Optional dependencies: imported where they are used, with the extra that provides them named."""
from __future__ import annotations

import importlib


def optional_import(module: str, extra: str):
    """Import ``module``, or say which ``pip install "nca-fast[extra]"`` provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f'{module} is needed for this; install it with pip install "nca-fast[{extra}]"') from e
