"""Pixel-shuffle decoder: a per-cell head whose ``K*r*r`` outputs become an ``r x r`` pixel block.

Head (``nn.Linear`` convention): ``w0 [K*r*r, C], b0`` (linear) or ``w0 [hidden, C], b0`` + ReLU,
``w1 [K*r*r, hidden], b1``. Output channel ``n = k*r*r + i*r + j`` of cell ``(y, x)`` is pixel
``(k, y*r + i, x*r + j)``: exactly ``F.pixel_shuffle``'s order. This last-layer layout
(``[K*r*r, hidden_or_C]`` + bias) is what the fused step+decode kernel consumes.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

from .base import Decoder
from .spec import DecoderSpec


def pixel_shuffle_decode(x: torch.Tensor, params: Mapping[str, torch.Tensor], spec: DecoderSpec,
                         size=None) -> torch.Tensor:
    """Reference: ``x [B, C, H, W] -> [B, K, H*r, W*r]``."""
    if size is not None and tuple(size) != spec.output_size(*x.shape[-2:]):
        raise ValueError(f"a pixel_shuffle decoder renders exactly {spec.output_size(*x.shape[-2:])}, "
                         f"got size={tuple(size)}")
    B, _, H, W = x.shape
    r, K = spec.scale, spec.out_channels
    h = x.permute(0, 2, 3, 1)  # [B, H, W, C]
    if spec.layers:
        h = torch.relu(F.linear(h, params["w0"], params["b0"]))
    n = spec.layers
    y = F.linear(h, params[f"w{n}"], params[f"b{n}"])  # [B, H, W, K*r*r]
    y = y.view(B, H, W, K, r, r).permute(0, 3, 1, 4, 2, 5)  # [B, K, H, i, W, j]
    return y.reshape(B, K, H * r, W * r)


class PixelShuffleDecoder(Decoder):
    """``PixelShuffleDecoder(pixel_shuffle_spec(C, scale, K, hidden))``; forward = reference path."""

    KIND = "pixel_shuffle"
    reference = staticmethod(pixel_shuffle_decode)

    @staticmethod
    def init_weights(spec: DecoderSpec, generator: torch.Generator):
        """nn.Linear's default init (uniform +-1/sqrt(fan_in))."""
        out = {}
        for name, shape in spec.parameter_shapes().items():
            fan_in = spec.parameter_shapes()["w" + name[1:]][1]
            bound = 1.0 / math.sqrt(fan_in)
            out[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        return out
