"""The CPU fast path that ``backend='auto'`` runs for float32 states on a CPU.

Same contract as :func:`nca_fast.reference.step` (and tested against it), reorganised for a CPU's
caches instead of written for clarity:

* the state is copied once per step into a padded channels-last buffer ``[B, H+2, W+2, C]``, so that
  a cell's perception vector and hidden vector are rows of matrices;
* the grid is processed in bands of whole rows that stay in the cache: per band, perception by
  shifted adds, one ``addmm`` (``[n, F*C] @ [F*C, hidden]``), an in-place ReLU/clamp, and one ``addmm``
  that writes the update already transposed (``[C, n]``, the layout of the output);
* every scratch buffer is kept between steps (per thread, grown when needed), so a step allocates
  only its output and a few single-channel tensors.

The eager reference allocates the ``[B, hidden, H, W]`` tensor every step; for large grids glibc
serves it by ``mmap`` and the kernel zero-fills every page again, which alone costs more than the
arithmetic. Banding keeps the hidden tensor small and hot.
"""
from __future__ import annotations

import threading
from typing import Dict, Mapping, Optional, Tuple

import torch

from . import reference
from .spec import NCASpec

# Cells per band: a band's perception, hidden and update rows (8192 * (48 + 128 + 16) floats = 6 MiB
# for the growing model) stay in the last-level cache. In a GEMM-only microbenchmark on a 2-core
# Zen 4, bands of 2048-8192 cells ran at ~8 M cells/s, 32768 at 6.4 M, whole 1024^2 grids far lower.
BAND_CELLS = 8192

_local = threading.local()


def _buffer(name: str, shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A per-thread scratch tensor reused across steps (its contents are garbage)."""
    cache: Dict = _local.__dict__.setdefault("buffers", {})
    key = (name, like.dtype, like.device)
    buf = cache.get(key)
    if buf is None or buf.numel() < _numel(shape):
        buf = torch.empty(_numel(shape), dtype=like.dtype, device=like.device)
        cache[key] = buf
    return buf[: _numel(shape)].view(shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def clear_buffers() -> None:
    """Free this thread's scratch buffers (they are otherwise kept for the next step)."""
    _local.__dict__.pop("buffers", None)


def _pad_channels_last(x: torch.Tensor, padding: str) -> torch.Tensor:
    """``x [B, C, H, W]`` -> padded channels-last scratch ``[B, H+2, W+2, C]``."""
    B, C, H, W = x.shape
    xp = _buffer("padded", (B, H + 2, W + 2, C), x)
    xp[:, 1:H + 1, 1:W + 1].copy_(x.permute(0, 2, 3, 1))
    if padding == "zeros":
        xp[:, 0].zero_()
        xp[:, H + 1].zero_()
        xp[:, :, 0].zero_()
        xp[:, :, W + 1].zero_()
    else:  # rows first, then columns over all rows, so that the corners come out right
        top, bottom, left, right = (H, 1, W, 1) if padding == "circular" else (1, H, 1, W)
        xp[:, 0, 1:W + 1] = xp[:, top, 1:W + 1]
        xp[:, H + 1, 1:W + 1] = xp[:, bottom, 1:W + 1]
        xp[:, :, 0] = xp[:, :, left]
        xp[:, :, W + 1] = xp[:, :, right]
    return xp


def _taps(spec: NCASpec):
    """Per filter, its non-zero taps as ``(dy, dx, value)``."""
    return [[(r - 1, c - 1, v) for r, row in enumerate(f.taps) for c, v in enumerate(row) if v != 0.0]
            for f in spec.filters]


def _perceive_band(xp: torch.Tensor, r0: int, rows: int, W: int, taps, out: torch.Tensor) -> None:
    """Perception of grid rows ``r0 .. r0+rows-1`` of one padded image ``xp [H+2, W+2, C]`` into
    ``out [rows, W, F, C]`` (blocked order once flattened), by shifted multiply-adds."""
    for f, filt in enumerate(taps):
        dst = out[:, :, f]
        if not filt:
            dst.zero_()
            continue
        for k, (dy, dx, v) in enumerate(filt):
            src = xp[r0 + 1 + dy: r0 + 1 + dy + rows, 1 + dx: 1 + dx + W]
            if k == 0:
                torch.mul(src, v, out=dst) if v != 1.0 else dst.copy_(src)
            else:
                dst.add_(src, alpha=v)


def _alive(x: torch.Tensor, spec: NCASpec) -> torch.Tensor:
    """:func:`nca_fast.reference.alive_mask` as a separable 3x3 max (rows, then columns), bool
    ``[B, 1, H, W]``: CPU ``max_pool2d`` is several times slower than two ``maximum`` passes."""
    a = x[:, spec.alive_channel: spec.alive_channel + 1]
    if spec.padding == "zeros":
        a = torch.nn.functional.pad(a, (1, 1, 1, 1), value=float("-inf"))
    else:
        a = reference.pad1(a, spec.padding)
    rows = torch.maximum(torch.maximum(a[..., :-2], a[..., 1:-1]), a[..., 2:])  # [B, 1, H+2, W]
    m = torch.maximum(torch.maximum(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])
    return m > spec.alive_threshold


def _clamp_(t: torch.Tensor, r) -> None:
    if r is not None:
        t.clamp_(r[0], r[1])


def step(x: torch.Tensor, params: Mapping[str, torch.Tensor], spec: NCASpec,
         fire_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """One NCA step ``[B, C, H, W] -> [B, C, H, W]``, as :func:`nca_fast.reference.step`.

    ``fire_mask`` (bool ``[B, 1, H, W]``) selects the cells that update; None = all. Any dtype and
    device work, but only float32 on a CPU is what this path is made for. When autograd has to record
    the step (grad enabled and ``x`` or a weight requires grad) it runs the reference instead.
    """
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params.values())):
        return reference.step(x, params, spec, fire_mask)
    B, C, H, W = x.shape
    x = x.contiguous()
    nf, hidden = spec.n_filters, spec.hidden
    w1t = params["w1"].t()  # [F*C, hidden]: addmm reads it transposed, no copy
    w2 = params["w2"]  # [C, hidden]
    b1, b2 = params.get("b1"), params.get("b2")
    b2col = None if b2 is None else b2[:, None]  # [C, 1], broadcast over a band's cells

    xp = _pad_channels_last(x, spec.padding)
    taps = _taps(spec)
    y = torch.empty_like(x)
    fire = None if fire_mask is None else fire_mask.reshape(B, H * W).to(x.dtype)
    rows_per_band = max(1, min(H, BAND_CELLS // W))
    n_max = rows_per_band * W
    perc = _buffer("perception", (n_max, nf * C), x)
    hid = _buffer("hidden", (n_max, hidden), x)
    upd = _buffer("update", (C, n_max), x)

    for b in range(B):
        for r0 in range(0, H, rows_per_band):
            rows = min(rows_per_band, H - r0)
            n = rows * W
            p, h, dx = perc[:n], hid[:n], upd[:, :n]
            _perceive_band(xp[b], r0, rows, W, taps, p.view(rows, W, nf, C))
            _clamp_(p, spec.perception_clamp)
            if b1 is None:
                torch.mm(p, w1t, out=h)
            else:
                torch.addmm(b1, p, w1t, out=h)
            h.relu_()
            _clamp_(h, spec.hidden_clamp)
            # dx^T = w2 @ h^T: the update comes out as [C, n], the layout of y's band
            if b2col is None:
                torch.mm(w2, h.t(), out=dx)
            else:
                torch.addmm(b2col, w2, h.t(), out=dx)
            _clamp_(dx, spec.update_clamp)
            if fire is not None:
                dx.mul_(fire[b, r0 * W: r0 * W + n])
            yb = y[b, :, r0:r0 + rows].view(C, n)
            torch.add(x[b, :, r0:r0 + rows].view(C, n), dx, alpha=spec.step_size, out=yb)
            _clamp_(yb, spec.state_clamp)

    if spec.alive_channel is not None:
        y.mul_(_alive(x, spec) & _alive(y, spec))
    return y
