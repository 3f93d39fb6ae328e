"""The reference path: one NCA step in plain PyTorch. This file *is* the specification that every
fused kernel is tested against, and the CPU fallback. Any device, float32 or float64, batch >= 1.

Shapes: state ``x [B, C, H, W]``; perception ``[B, F*C, H, W]`` (blocked: filter-major);
``w1 [hidden, F*C]``, ``b1 [hidden]``, ``w2 [C, hidden]``, ``b2 [C]``; masks bool ``[B, 1, H, W]``.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from .spec import NCASpec

_PAD_MODE = {"zeros": "constant", "circular": "circular", "replicate": "replicate"}


def pad1(x: torch.Tensor, padding: str) -> torch.Tensor:
    """Pad H and W by one cell with the spec's padding mode."""
    return F.pad(x, (1, 1, 1, 1), mode=_PAD_MODE[padding])


def filter_bank(spec: NCASpec, dtype=torch.float32, device=None) -> torch.Tensor:
    """Depthwise weights ``[F*C, 1, 3, 3]`` in blocked order (filter f, channel c at row f*C + c)."""
    taps = torch.tensor([f.taps for f in spec.filters], dtype=dtype, device=device)  # [F, 3, 3]
    return taps.repeat_interleave(spec.channels, dim=0).unsqueeze(1)


def perceive(x: torch.Tensor, spec: NCASpec) -> torch.Tensor:
    """3x3 depthwise perception: ``[B, C, H, W] -> [B, F*C, H, W]``, blocked by filter."""
    C = spec.channels
    w = filter_bank(spec, x.dtype, x.device)  # [F*C, 1, 3, 3]
    xp = pad1(x, spec.padding).repeat(1, spec.n_filters, 1, 1)  # channel f*C + c holds x[c]
    return F.conv2d(xp, w, groups=spec.n_filters * C)


def perceive_vjp(gp: torch.Tensor, spec: NCASpec) -> torch.Tensor:
    """The transposed perception: ``[B, F*C, H, W]`` perception gradients -> ``[B, C, H, W]`` state
    gradients. Perception is linear: its vector-Jacobian product is the transposed convolution onto
    the padded grid, summed over filters, with the padding ring folded back where the padding read
    it (zeros: dropped; circular: onto the opposite side; replicate: onto the edge)."""
    B, FC, H, W = gp.shape
    C = spec.channels
    w = filter_bank(spec, gp.dtype, gp.device)
    t = F.conv_transpose2d(gp, w, groups=FC).view(B, spec.n_filters, C, H + 2, W + 2).sum(1)
    for dim, n in ((2, H), (3, W)):
        first, last = t.narrow(dim, 0, 1), t.narrow(dim, n + 1, 1)
        inner = t.narrow(dim, 1, n).clone()
        if spec.padding == "circular":  # padded index 0 read cell n-1; index n+1 read cell 0
            inner.narrow(dim, n - 1, 1).add_(first)
            inner.narrow(dim, 0, 1).add_(last)
        elif spec.padding == "replicate":  # both read the edge cell on their side
            inner.narrow(dim, 0, 1).add_(first)
            inner.narrow(dim, n - 1, 1).add_(last)
        t = inner
    return t


def _clamp(t: torch.Tensor, r) -> torch.Tensor:
    return t if r is None else t.clamp(r[0], r[1])


def update(p: torch.Tensor, params: Mapping[str, torch.Tensor], spec: NCASpec) -> torch.Tensor:
    """The per-cell MLP: perception ``[B, F*C, H, W]`` -> update ``dx [B, C, H, W]`` (clamped)."""
    p = _clamp(p, spec.perception_clamp)
    h = F.conv2d(p, params["w1"][:, :, None, None], params.get("b1"))
    h = _clamp(torch.relu(h), spec.hidden_clamp)
    dx = F.conv2d(h, params["w2"][:, :, None, None], params.get("b2"))
    return _clamp(dx, spec.update_clamp)


def alive_mask(x: torch.Tensor, spec: NCASpec) -> torch.Tensor:
    """``maxpool3x3(x[:, alive_channel]) > alive_threshold`` as bool ``[B, 1, H, W]``.

    The pool pads by ``spec.alive_pool_padding``: ``"ignore"`` pads with -inf, so that cells outside
    the grid never count, as in the published models' ``max_pool2d(padding='SAME')``.
    """
    a = x[:, spec.alive_channel: spec.alive_channel + 1]
    if spec.alive_pool_padding == "ignore":
        a = F.pad(a, (1, 1, 1, 1), value=float("-inf"))
    else:
        a = pad1(a, spec.alive_pool_padding)
    return F.max_pool2d(a, 3, stride=1) > spec.alive_threshold


def step(x: torch.Tensor, params: Mapping[str, torch.Tensor], spec: NCASpec,
         fire_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """One NCA step. ``fire_mask`` (bool ``[B, 1, H, W]``) selects the cells that update; None = all."""
    dx = update(perceive(x, spec), params, spec) * spec.step_size
    y = x + (dx if fire_mask is None else dx * fire_mask.to(dx.dtype))
    y = _clamp(y, spec.state_clamp)
    if spec.alive_channel is not None:
        y = y * (alive_mask(x, spec) & alive_mask(y, spec)).to(y.dtype)
    return y
