"""Helpers shared by the importers: base64, weight-order permutations, checked NCA construction."""
from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..model import NCA
from ..spec import NCASpec
from .errors import ModelFormatError


def listing(items, most: int = 8) -> str:
    """The first ``most`` items (each cut to 60 characters), then how many more: error messages
    about a hostile file stay short."""
    items = [str(i)[:60] for i in items]
    head = ", ".join(items[:most])
    return head + (f" and {len(items) - most} more ({len(items)} in all)" if len(items) > most else "")


def decode_b64(path, text, what: str) -> bytes:
    """Strict base64 -> bytes; a clear error naming ``what`` on bad input."""
    if not isinstance(text, str):
        raise ModelFormatError(path, f"{what} must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ModelFormatError(path, f"{what} is not valid base64 ({e})") from None


def interleaved_to_blocked(w1: torch.Tensor, n_filters: int) -> torch.Tensor:
    """Reorder the columns of ``w1 [hidden, C*F]`` from interleaved (column ``c*F + f``, as TF's
    ``depthwise_conv2d`` with a channel multiplier produces) to blocked (column ``f*C + c``)."""
    hidden, n = w1.shape
    return w1.reshape(hidden, n // n_filters, n_filters).transpose(1, 2).reshape(hidden, n)


def swap_blocks(w1: torch.Tensor, channels: int, i: int, j: int) -> torch.Tensor:
    """Swap the column blocks ``i`` and ``j`` (each ``channels`` wide) of a blocked ``w1``."""
    blocks = list(w1.split(channels, dim=1))
    blocks[i], blocks[j] = blocks[j], blocks[i]
    return torch.cat(blocks, dim=1)


def make_spec(path, factory: Callable[..., NCASpec], **kw) -> NCASpec:
    """``factory(**kw)`` named after the file (unless ``name`` is given); errors name the file."""
    kw.setdefault("name", Path(path).stem)
    try:
        return factory(**kw)
    except ValueError as e:
        raise ModelFormatError(path, f"unsupported architecture: {e}") from None


def make_nca(path, spec: NCASpec, weights: Mapping[str, torch.Tensor]) -> NCA:
    """``NCA(spec, weights)`` whose shape / NaN errors name the file."""
    try:
        return NCA(spec, dict(weights))
    except ValueError as e:
        raise ModelFormatError(path, str(e)) from None


def channels_from(path, in_ch: int, n_filters: int, what: str) -> int:
    """The channel count behind a first layer of ``in_ch = n_filters * C`` inputs."""
    if in_ch < n_filters or in_ch % n_filters:
        raise ModelFormatError(path, f"{what}: first layer has {in_ch} inputs, not a multiple of the "
                                     f"{n_filters} perception filters; not a model of this kind")
    return in_ch // n_filters
