"""LPPN: the Cells-to-Pixels implicit decoder (Pajouheshgar et al. 2025, ``utils/render.py`` and
``models/siren.py`` of TheDevilWillBeBee/Cells2Pixels).

For an integer scale s the image is::

    z      = crop_s(interpolate(pad1(x, padding), scale_factor=s, bilinear, align_corners=False))
    t      = (arange(s) / s - 0.5 + 0.5 / s) * 2               # local coordinate, both axes
    coords = [t_row, t_col] per pixel (tiled per cell)
    enc    = coords                                   if N == 0
           = [sin(a), cos(a)], a = [pi*k*coords for k in 1..N]  (row, col interleaved per k)
    h      = sin(first_omega * (W0 [enc; z] + b0))     # encoding first, as in their Siren
    h      = sin(hidden_omega * (Wl h + bl))           # layers - 1 times
    out    = W_L h + b_L                               # linear, K channels

Arbitrary output sizes ``(Ho, Wo)`` use the same formulas with source position
``(i + 0.5) * H / Ho - 0.5`` (bilinear taps, padded by one cell) and local coordinate
``2 * frac((i + 0.5) * H / Ho) - 1``, which reduce exactly to the above when ``Ho = s*H``.
Taps are computed in integer arithmetic, as in the fused kernel.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .base import Decoder
from .spec import DecoderSpec

MAX_PIXELS_PER_CHUNK = 1 << 20  # the reference renders in row bands to bound its memory


def axis_taps(n_in: int, n_out: int, padding: str, device=None):
    """For each output index along one axis: source cells ``i0, i1`` (padding applied), the weight
    ``w`` of ``i1``, and the local coordinate in (-1, 1). Exact integer arithmetic."""
    idx = torch.arange(n_out, device=device, dtype=torch.int64)
    den = 2 * n_out
    t = (2 * idx + 1) * n_in + n_out  # = den * (src + 1) >= 0
    i0 = torch.div(t, den, rounding_mode="floor") - 1
    w = (t % den).to(torch.float64) / den
    local = ((2 * idx + 1) * n_in % den).to(torch.float64) / n_out - 1.0
    i1 = i0 + 1
    if padding == "circular":
        i0, i1 = i0 % n_in, i1 % n_in
    else:
        i0, i1 = i0.clamp(0, n_in - 1), i1.clamp(0, n_in - 1)
    return i0, i1, w, local


def encode_coords(coords: torch.Tensor, frequencies: int) -> torch.Tensor:
    """``coords [..., 2]`` -> ``[..., E]``: raw, or ``[sin(pi k c)]_k, [cos(pi k c)]_k``."""
    if frequencies == 0:
        return coords
    a = torch.cat([coords * (math.pi * k) for k in range(1, frequencies + 1)], dim=-1)
    return torch.cat([torch.sin(a), torch.cos(a)], dim=-1)


def siren(inp: torch.Tensor, params: Mapping[str, torch.Tensor], spec: DecoderSpec) -> torch.Tensor:
    """The SIREN MLP on ``[..., E + C]`` -> ``[..., K]``."""
    h = torch.sin(spec.first_omega * F.linear(inp, params["w0"], params["b0"]))
    for i in range(1, spec.layers):
        h = torch.sin(spec.hidden_omega * F.linear(h, params[f"w{i}"], params[f"b{i}"]))
    n = spec.layers
    return F.linear(h, params[f"w{n}"], params[f"b{n}"])


def lppn_inputs(x: torch.Tensor, spec: DecoderSpec, size: Tuple[int, int],
                rows: slice = slice(None)) -> torch.Tensor:
    """The SIREN input ``[B, h, Wo, E + C]`` (encoding, then interpolated state) of output ``rows``."""
    B, C, H, W = x.shape
    Ho, Wo = size
    dt, dev = x.dtype, x.device
    r0, r1, wr, ly = (t[rows] for t in axis_taps(H, Ho, spec.padding, dev))
    c0, c1, wc, lx = axis_taps(W, Wo, spec.padding, dev)
    wy, wx, ly, lx = wr.to(dt)[:, None, None], wc.to(dt)[None, :, None], ly.to(dt), lx.to(dt)
    xs = x.permute(0, 2, 3, 1)                                   # [B, H, W, C]
    zr = xs[:, r0] * (1 - wy) + xs[:, r1] * wy                   # [B, h, W, C]
    z = zr[:, :, c0] * (1 - wx) + zr[:, :, c1] * wx              # [B, h, Wo, C]
    coords = torch.stack(torch.broadcast_tensors(ly[:, None], lx[None, :]), dim=-1)
    enc = encode_coords(coords, spec.frequencies).expand(B, -1, -1, -1)
    return torch.cat([enc, z], dim=-1)


def lppn_decode(x: torch.Tensor, params: Mapping[str, torch.Tensor], spec: DecoderSpec,
                size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Reference: ``x [B, C, H, W] -> [B, K, Ho, Wo]`` (``size`` defaults to ``(H*s, W*s)``)."""
    B, C, H, W = x.shape
    Ho, Wo = spec.output_size(H, W) if size is None else (int(size[0]), int(size[1]))
    if Ho < 1 or Wo < 1:
        raise ValueError(f"output size must be positive, got {(Ho, Wo)}")
    band = max(1, MAX_PIXELS_PER_CHUNK // (B * Wo))
    out = [siren(lppn_inputs(x, spec, (Ho, Wo), slice(a, a + band)), params, spec)
           for a in range(0, Ho, band)]
    return torch.cat(out, dim=1).permute(0, 3, 1, 2)


class LPPNDecoder(Decoder):
    """``LPPNDecoder(lppn_spec(C, scale, K, hidden, layers))``; ``forward(x, size=None)``."""

    KIND = "lppn"
    reference = staticmethod(lppn_decode)

    @staticmethod
    def init_weights(spec: DecoderSpec, generator: torch.Generator):
        """SIREN init as in Cells-to-Pixels: first layer U(+-1/in), later U(+-sqrt(6/in)/omega),
        biases nn.Linear's U(+-1/sqrt(in))."""
        out = {}
        shapes = spec.parameter_shapes()
        uni = lambda shape, bound: (torch.rand(shape, generator=generator) * 2 - 1) * bound
        for i in range(spec.layers + 1):
            n_out, n_in = shapes[f"w{i}"]
            bound = 1.0 / n_in if i == 0 else math.sqrt(6.0 / n_in) / spec.hidden_omega
            out[f"w{i}"] = uni((n_out, n_in), bound)
            out[f"b{i}"] = uni((n_out,), 1.0 / math.sqrt(n_in))
        return out
