"""The CPU fast path that backend='auto' runs on a CPU (placeholder: the reference step).

Same contract as :func:`nca_fast.reference.step`, tested against it.
"""
from __future__ import annotations

from .reference import step  # noqa: F401
