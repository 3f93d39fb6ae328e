"""Decoder: the nn.Module shared by every decoder kind (weights + spec + input checks)."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import nn

from ..utils.checks import check_state, register_weights
from .spec import DecoderSpec


class Decoder(nn.Module):
    """Base class: ``Decoder(spec, weights=None, init_seed=0)``; subclasses set ``KIND`` and
    implement ``reference(x, params, spec, size)`` and ``init_weights(spec, generator)``."""

    KIND = ""

    def __init__(self, spec: DecoderSpec, weights: Optional[Mapping[str, torch.Tensor]] = None, *,
                 init_seed: int = 0):
        super().__init__()
        if not isinstance(spec, DecoderSpec):
            raise TypeError(f"spec must be a DecoderSpec, got {type(spec).__name__}")
        if spec.kind != self.KIND:
            raise ValueError(f"{type(self).__name__} needs kind={self.KIND!r}, spec has {spec.kind!r}")
        self.spec = spec
        shapes = spec.parameter_shapes()
        if weights is None:
            weights = self.init_weights(spec, torch.Generator().manual_seed(init_seed))
        register_weights(self, shapes, weights, "decoder weight")

    @staticmethod
    def init_weights(spec: DecoderSpec, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def params(self, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        return {n: (getattr(self, n) if dtype is None else getattr(self, n).to(dtype))
                for n in self.spec.parameter_shapes()}

    @property
    def device(self) -> torch.device:
        return self.w0.device

    def check_state(self, x: torch.Tensor) -> None:
        check_state(x, self.spec.channels, self.device, "decoder")

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        """The reference path (differentiable): ``[B, C, H, W] -> [B, K, Ho, Wo]`` (float32, or
        float64 for a float64 state)."""
        self.check_state(x)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        return self.reference(x.to(compute), self.params(compute), self.spec, size)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"channels={s.channels}, out={s.out_channels}, scale={s.scale}, hidden={s.hidden}, "
                f"layers={s.layers}")
