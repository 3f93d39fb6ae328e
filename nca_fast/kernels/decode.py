"""Decode-only kernels: render a coarse NCA state ``x [B, C, H, W]`` as an image ``[B, K, Ho, Wo]``.

``lppn_kernel``: one program = ``BLOCK_P`` consecutive output pixels of one image. Layer 0 of the
SIREN is split: its state part is applied per *cell* by the launcher (``proj = x W0s^T + b0``,
``[B, H, W, HID]``, exact because bilinear weights sum to 1), so the kernel samples 4 projected
cells per pixel (padding circular/replicate, exact integer tap arithmetic), adds the
local-coordinate part as fp32 rank-1 updates, then runs the sine layers and the linear output on
tensor cores (``tl.dot`` on ``[BLOCK_P, HID]`` tiles) with a range-reduced polynomial sine.
``pixel_shuffle_kernel``: one program = a tile of cells through the head of ``pixel_shuffle.py``
(the same code the step runs in its epilogue).

Weights arrive packed by :mod:`nca_fast.kernels.pack`: transposed to ``[in, out]``, zero-padded to
the block sizes, SIREN frequencies folded in (``sin(omega*(W x + b)) = sin((omega W) x + omega b)``).
Precision: ``DOT_T`` / ``PREC`` from ``config.dot_types`` ("ieee": fp32 operands in three TF32
passes, about fp32 accuracy; "fp16": fp16 operands), fp32 accumulation. The LPPN's layer 0 is always
exact fp32 (omega-scaled pre-activations are large: tensor-core rounding would show).

Traffic and work per output pixel (O = output element size, s = scale, h = padded width):
* LPPN, C state channels, E = 2 or 4N coordinate features, L sine layers, K outputs: reads
  4*h*4 bytes of projected cells per pixel, served from L1/L2 (from DRAM about once:
  4*h/s^2 bytes per pixel); writes K*O bytes. FLOPs (2 per multiply-add): per cell 2*C*h
  (projection, i.e. 2*C*h/s^2 per pixel); per pixel 6h (interpolation) + 2*E*h + 2*h^2*(L-1)
  + 2*h*16 (output, padded to 16) and L*h + 2N sines (~12 FLOP each).
  Texture-size decoder (C=12, E=2, h=32, L=3, K=3, s=8, fp16 out): 6 B written, 0.25 B of
  projected state from DRAM; ~5.3 kFLOP (4.1k of it tensor-core) + 96 sines per pixel.
* Pixel shuffle, head ``[K*r*r, C]`` (or ``[h, C]`` ReLU + ``[K*r*r, h]``): reads C*4/r^2 bytes
  (fp32 state), writes K*O bytes; 2*C*K (linear) or 2*(C*h + h*K*r*r)/r^2 FLOPs per pixel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .pixel_shuffle import pixel_shuffle_out

# Globals read inside kernels must be tl.constexpr; int(...) gives their Python value.
K_PAD = tl.constexpr(16)    # LPPN output columns (K <= 16: RGB, RGBA, 9-channel PBR, ...)


@triton.jit
def fast_sin(x):
    """sin(x) in fp32 from plain tl ops: x = k*pi + r (3-part Cody-Waite), |r| <= pi/2, odd degree-11
    Taylor polynomial, sign (-1)^k. Max abs error ~2e-7 for |x| < 1e4 (see tests)."""
    k = tl.floor(x * 0.3183098861837907 + 0.5)
    r = x - k * 3.140625
    r = r - k * 9.67502593994140625e-4
    r = r - k * 1.509957990978376432e-7
    r2 = r * r
    p = -2.505210838544172e-08
    p = p * r2 + 2.755731922398589e-06
    p = p * r2 - 1.984126984126984e-04
    p = p * r2 + 8.333333333333333e-03
    p = p * r2 - 1.666666666666667e-01
    s = r + r * r2 * p
    odd = k - 2.0 * tl.floor(k * 0.5)
    return s * (1.0 - 2.0 * odd)


@triton.jit
def _axis(idx, n_in, n_out, circular):
    """Bilinear taps (align_corners=False) and local coordinate of output index ``idx`` along one
    axis, in exact integer arithmetic: src = (idx + 0.5) * n_in / n_out - 0.5."""
    den = 2 * n_out
    t = (2 * idx + 1) * n_in + n_out          # = 2*n_out*(src + 1) >= 0, so // and % are floor ops
    i0 = t // den - 1
    w = (t % den).to(tl.float32) / den
    local = ((2 * idx + 1) * n_in % den).to(tl.float32) / n_out - 1.0
    i1 = i0 + 1
    i0 = tl.where(i0 < 0, tl.where(circular != 0, i0 + n_in, 0), i0)
    i1 = tl.where(i1 >= n_in, tl.where(circular != 0, i1 - n_in, n_in - 1), i1)
    return i0, i1, w, local


@triton.jit(do_not_specialize=("H", "W", "Ho", "Wo", "K", "N_FREQ", "N_HID_LAYERS", "CIRCULAR"))
def lppn_kernel(proj_ptr, out_ptr, w0_ptr, wh_ptr, bh_ptr, wo_ptr, bo_ptr,
                H, W, Ho, Wo, K, N_FREQ, N_HID_LAYERS, CIRCULAR,
                HID: tl.constexpr, BLOCK_P: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """proj [B, H, W, HID] fp32 (layer 0 applied per cell) -> out [B, K, Ho, Wo].
    Grid (cdiv(Ho*Wo, BLOCK_P), B).

    w0 [E, HID]: layer 0's coordinate-encoding rows; wh [L-1, HID, HID], bh [L-1, HID],
    wo [HID, K_PAD], bo [K_PAD]; all omega-folded, transposed, zero-padded."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < Ho * Wo
    py = p // Wo
    px = p % Wo
    y0, y1, wy, ly = _axis(py, H, Ho, CIRCULAR)
    x0, x1, wx, lx = _axis(px, W, Wo, CIRCULAR)
    hcol = tl.arange(0, HID)

    # Layer 0 in exact fp32 (its omega-scaled weights are large, tensor-core rounding would show).
    # Coordinate part as rank-1 updates: [y, x] or [sin(pi k y), sin(pi k x)]_k=1..N, [cos ...]_k.
    m2 = pmask[:, None]
    acc = tl.zeros((BLOCK_P, HID), dtype=tl.float32)
    if N_FREQ == 0:
        acc += ly[:, None] * tl.load(w0_ptr + hcol)[None, :]
        acc += lx[:, None] * tl.load(w0_ptr + HID + hcol)[None, :]
    for f in range(N_FREQ):
        fr = 3.141592653589793 * (f + 1)
        ry = 2 * f * HID
        rc = (2 * N_FREQ + 2 * f) * HID
        acc += fast_sin(fr * ly)[:, None] * tl.load(w0_ptr + ry + hcol)[None, :]
        acc += fast_sin(fr * lx)[:, None] * tl.load(w0_ptr + ry + HID + hcol)[None, :]
        acc += fast_sin(fr * ly + 1.5707963267948966)[:, None] * tl.load(w0_ptr + rc + hcol)[None, :]
        acc += fast_sin(fr * lx + 1.5707963267948966)[:, None] * tl.load(w0_ptr + rc + HID + hcol)[None, :]
    # state: layer 0's state part was applied per cell (proj = x @ W0s^T + b0, exact because the
    # bilinear weights sum to 1), so sampling the HID-wide projected cells finishes layer 0.
    pb = proj_ptr + b * H * W * HID + hcol[None, :]
    v00 = tl.load(pb + ((y0 * W + x0) * HID)[:, None], mask=m2, other=0.0)
    v01 = tl.load(pb + ((y0 * W + x1) * HID)[:, None], mask=m2, other=0.0)
    v10 = tl.load(pb + ((y1 * W + x0) * HID)[:, None], mask=m2, other=0.0)
    v11 = tl.load(pb + ((y1 * W + x1) * HID)[:, None], mask=m2, other=0.0)
    top = v00 + (v01 - v00) * wx[:, None]
    bot = v10 + (v11 - v10) * wx[:, None]
    acc += top + (bot - top) * wy[:, None]
    h = fast_sin(acc)

    for layer in range(N_HID_LAYERS):
        wl = tl.load(wh_ptr + layer * HID * HID + hcol[:, None] * HID + hcol[None, :])
        bl = tl.load(bh_ptr + layer * HID + hcol)
        pre = tl.dot(h.to(DOT_T), wl, input_precision=PREC)
        h = fast_sin(pre + bl[None, :])

    kcol = tl.arange(0, K_PAD)
    wo = tl.load(wo_ptr + hcol[:, None] * K_PAD + kcol[None, :])
    o = tl.dot(h.to(DOT_T), wo, input_precision=PREC)
    o = o + tl.load(bo_ptr + kcol)[None, :]
    optr = out_ptr + b * K * Ho * Wo + kcol[None, :] * Ho * Wo + p[:, None]
    tl.store(optr, o.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & (kcol < K)[None, :])


@triton.jit(do_not_specialize=("H", "W", "n_tiles_w", "tiles_per_image"))
def pixel_shuffle_kernel(x, img, dw0, db0, dw1, db1, H, W, n_tiles_w, tiles_per_image,
                         C: tl.constexpr, CP: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                         R: tl.constexpr, K: tl.constexpr, N: tl.constexpr, DH: tl.constexpr,
                         NPAD: tl.constexpr, NB: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
                         DHC: tl.constexpr = 0):
    """x [B, C, H, W] (channels-last) -> img [B, K, H*R, W*R]: one program per ``BH x BW`` tile of
    cells (grid ``B * tiles_per_image``), the head of ``pixel_shuffle.py`` applied to the tile."""
    t = tl.program_id(0)
    b = t // tiles_per_image
    r = t % tiles_per_image
    m = tl.arange(0, BH * BW)
    i = (r // n_tiles_w) * BH + m // BW
    j = (r % n_tiles_w) * BW + m % BW
    valid = (i < H) & (j < W)
    chan = tl.arange(0, CP)
    xs = tl.load(x + ((b * H + i) * W + j).to(tl.int64)[:, None] * C + chan[None, :],
                 mask=valid[:, None] & (chan[None, :] < C), other=0.0).to(tl.float32)
    pixel_shuffle_out(xs, b + m * 0, i, j, valid, img, dw0, db0, dw1, db1, H, W, CP, R, K, N, DH, NPAD, NB,
                      DOT_T, PREC, DHC)
