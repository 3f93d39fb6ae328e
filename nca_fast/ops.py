"""Launchers for the fused Triton kernels (not available yet: see issue 3)."""
from __future__ import annotations


def unavailable_reason(model, x) -> str:
    """Why the fused path cannot run ``model`` on ``x`` ('' when it can)."""
    return "the fused Triton kernels are not available yet"


def fused_step(model, x, **kw):
    raise RuntimeError(unavailable_reason(model, x))


def fused_frames(model, x, steps, **kw):
    raise RuntimeError(unavailable_reason(model, x))
