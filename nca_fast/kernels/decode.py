"""Decode-only kernels: render a coarse NCA state ``x [B, C, H, W]`` as an image ``[B, K, Ho, Wo]``.

``lppn_kernel``: one program = ``BLOCK_P`` consecutive output pixels of one image. Layer 0 of the
SIREN is split: its state part is applied per *cell* by the launcher (``proj = x W0s^T + b0``,
``[B, H, W, HID]``, exact because bilinear weights sum to 1), so the kernel samples 4 projected
cells per pixel (padding circular/replicate, exact integer tap arithmetic), adds the
local-coordinate part as fp32 rank-1 updates, then runs the sine layers and the linear output on
tensor cores (``tl.dot`` on ``[BLOCK_P, HID]`` tiles) with a range-reduced polynomial sine.
``pixel_shuffle_kernel``: one program = ``BLOCK_M`` cells x ``N_BLOCK`` head outputs; it applies the
per-cell head and scatters output ``n = k*r*r + i*r + j`` to pixel ``(k, y*r + i, x*r + j)``
(``F.pixel_shuffle`` order).

Weights arrive packed by :mod:`nca_fast.ops_decode`: transposed to ``[in, out]``, zero-padded to the
block sizes, SIREN frequencies folded in (``sin(omega*(W x + b)) = sin((omega W) x + omega b)``).
Precision: ``DOT_FP16=False`` uses ``tf32x3`` dots (about fp32 accuracy) and writes fp32;
``DOT_FP16=True`` uses fp16 operands (fp32 accumulation) and writes fp16. The LPPN's layer 0 is
always exact fp32 (omega-scaled pre-activations are large: tensor-core rounding would show).

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

# Globals read inside kernels must be tl.constexpr; int(...) gives their Python value.
C_BLOCK = tl.constexpr(16)  # pixel-shuffle state channels per tl.dot chunk (K >= 16)
K_PAD = tl.constexpr(16)    # LPPN output columns (K <= 16: RGB, RGBA, 9-channel PBR, ...)
HIDDEN_SIZES = (32, 64, 128)  # padded hidden widths the kernels are specialised for
PS_N_BLOCK = 64  # pixel-shuffle head outputs per program


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


@triton.jit
def lppn_kernel(proj_ptr, out_ptr, w0_ptr, wh_ptr, bh_ptr, wo_ptr, bo_ptr,
                H, W, Ho, Wo, K, N_FREQ, N_HID_LAYERS, CIRCULAR,
                HID: tl.constexpr, BLOCK_P: tl.constexpr, DOT_FP16: tl.constexpr):
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
        if DOT_FP16:
            pre = tl.dot(h.to(tl.float16), wl)
        else:
            pre = tl.dot(h, wl, input_precision="tf32x3")
        h = fast_sin(pre + bl[None, :])

    kcol = tl.arange(0, K_PAD)
    wo = tl.load(wo_ptr + hcol[:, None] * K_PAD + kcol[None, :])
    if DOT_FP16:
        o = tl.dot(h.to(tl.float16), wo)
    else:
        o = tl.dot(h, wo, input_precision="tf32x3")
    o = o + tl.load(bo_ptr + kcol)[None, :]
    optr = out_ptr + b * K * Ho * Wo + kcol[None, :] * Ho * Wo + p[:, None]
    tl.store(optr, o.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & (kcol < K)[None, :])


@triton.jit
def pixel_shuffle_kernel(x_ptr, out_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr,
                         C, H, W, K, R, N, N_PAD,
                         HID: tl.constexpr, BLOCK_M: tl.constexpr, N_BLOCK: tl.constexpr,
                         DOT_FP16: tl.constexpr):
    """x [B, C, H, W] -> out [B, K, H*R, W*R]. Grid (cdiv(H*W, BLOCK_M), N_PAD // N_BLOCK, B).

    HID == 0: linear head w0 [C16, N_PAD], b0 [N_PAD]. Else w0 [C16, HID], b0 [HID] (ReLU),
    w1 [HID, N_PAD], b1 [N_PAD]. Head output n = k*R*R + i*R + j (F.pixel_shuffle order)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < H * W
    n = pid_n * N_BLOCK + tl.arange(0, N_BLOCK)
    cc = tl.arange(0, C_BLOCK)
    xb = x_ptr + b * C * H * W
    if HID == 0:
        acc = tl.zeros((BLOCK_M, N_BLOCK), dtype=tl.float32)
    else:
        hcol = tl.arange(0, HID)
        acc = tl.zeros((BLOCK_M, HID), dtype=tl.float32)
    for c0 in range(0, C, C_BLOCK):
        ch = c0 + cc
        xs = tl.load(xb + ch[None, :].to(tl.int64) * H * W + m[:, None],
                     mask=mmask[:, None] & (ch < C)[None, :], other=0.0)
        if HID == 0:
            w = tl.load(w0_ptr + ch[:, None] * N_PAD + n[None, :])
        else:
            w = tl.load(w0_ptr + ch[:, None] * HID + hcol[None, :])
        if DOT_FP16:
            acc = tl.dot(xs.to(tl.float16), w, acc)
        else:
            acc = tl.dot(xs.to(tl.float32), w, acc, input_precision="tf32x3")
    if HID == 0:
        o = acc + tl.load(b0_ptr + n)[None, :]
    else:
        hid = tl.maximum(acc + tl.load(b0_ptr + hcol)[None, :], 0.0)
        w1 = tl.load(w1_ptr + hcol[:, None] * N_PAD + n[None, :])
        if DOT_FP16:
            o = tl.dot(hid.to(tl.float16), w1)
        else:
            o = tl.dot(hid, w1, input_precision="tf32x3")
        o = o + tl.load(b1_ptr + n)[None, :]
    rr = R * R
    k = n // rr
    i = (n % rr) // R
    j = n % R
    Wo = W * R
    row = (m // W)[:, None] * R + i[None, :]
    col = (m % W)[:, None] * R + j[None, :]
    off = k[None, :].to(tl.int64) * H * R * Wo + row * Wo + col
    tl.store(out_ptr + b * K * H * R * Wo + off, o.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & (n < N)[None, :])


# ---- configurations the dispatcher (nca_fast.ops_decode) can pick --------------------------------
def lppn_launch(hid: int) -> dict:
    """BLOCK_P / num_warps for a padded hidden width (keeps the [BLOCK_P, HID] tiles in registers)."""
    return {32: dict(BLOCK_P=128, num_warps=4, num_stages=2), 64: dict(BLOCK_P=128, num_warps=8, num_stages=2),
            128: dict(BLOCK_P=64, num_warps=8, num_stages=1)}[hid]  # 2 stages: 256 KB of smem


def pixel_shuffle_launch(hid: int) -> dict:
    return dict(BLOCK_M=64, N_BLOCK=PS_N_BLOCK, num_warps=4, num_stages=2)


def compile_configs():
    """Every configuration the dispatcher can pick: padded hidden width x precision, per kernel."""
    from .compile import KernelConfig

    cfgs = []
    for hid in HIDDEN_SIZES:
        launch = lppn_launch(hid)
        for fp16 in (False, True):
            wdt = "*fp16" if fp16 else "*fp32"
            sig = {"proj_ptr": "*fp32", "out_ptr": wdt, "w0_ptr": "*fp32",
                   "wh_ptr": wdt, "bh_ptr": "*fp32", "wo_ptr": wdt, "bo_ptr": "*fp32",
                   "H": "i32", "W": "i32", "Ho": "i32", "Wo": "i32", "K": "i32",
                   "N_FREQ": "i32", "N_HID_LAYERS": "i32", "CIRCULAR": "i32",
                   "HID": "constexpr", "BLOCK_P": "constexpr", "DOT_FP16": "constexpr"}
            cfgs.append(KernelConfig(
                f"lppn_h{hid}_{'fp16' if fp16 else 'fp32'}", lppn_kernel, sig,
                dict(HID=hid, BLOCK_P=launch["BLOCK_P"], DOT_FP16=fp16),
                num_warps=launch["num_warps"], num_stages=launch["num_stages"]))
    for hid in (0,) + HIDDEN_SIZES:
        launch = pixel_shuffle_launch(hid)
        for fp16 in (False, True):
            wdt = "*fp16" if fp16 else "*fp32"
            sig = {"x_ptr": "*fp32", "out_ptr": wdt, "w0_ptr": wdt, "b0_ptr": "*fp32",
                   "w1_ptr": wdt, "b1_ptr": "*fp32", "C": "i32", "H": "i32", "W": "i32",
                   "K": "i32", "R": "i32", "N": "i32", "N_PAD": "i32", "HID": "constexpr",
                   "BLOCK_M": "constexpr", "N_BLOCK": "constexpr", "DOT_FP16": "constexpr"}
            cfgs.append(KernelConfig(
                f"pixel_shuffle_h{hid}_{'fp16' if fp16 else 'fp32'}", pixel_shuffle_kernel,
                sig, dict(HID=hid, BLOCK_M=launch["BLOCK_M"], N_BLOCK=launch["N_BLOCK"],
                          DOT_FP16=fp16), num_warps=launch["num_warps"], num_stages=launch["num_stages"]))
    return cfgs
