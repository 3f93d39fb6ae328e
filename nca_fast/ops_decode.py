"""Launchers for the decode-only kernels (:mod:`nca_fast.kernels.decode`) and the ``decode`` dispatch.

``decode(decoder, x, backend="auto")`` renders ``x [B, C, H, W]`` to ``[B, K, Ho, Wo]``:
``"reference"`` runs the decoder's PyTorch forward; ``"triton"`` the fused kernel (CUDA, or CPU
tensors under ``TRITON_INTERPRET=1``); ``"auto"`` picks triton on CUDA when it can run, else the
reference. ``precision="fp16"`` runs the hidden layers with fp16 tensor-core operands and returns
float16 (triton only; the reference ignores it and returns float32).
"""
from __future__ import annotations

import logging
import warnings
from typing import Dict, Optional, Tuple

import torch

from .ops import interpreting

log = logging.getLogger("nca_fast")

BACKENDS = ("auto", "reference", "triton")
PRECISIONS = ("fp32", "fp16")
KERNEL_STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HIDDEN = 128
MAX_LPPN_OUT = 16
_INT32 = 2 ** 31 - 1
_logged: set = set()


def unavailable_reason(decoder, x: torch.Tensor, size=None) -> str:
    """Why the fused decode cannot run ``decoder`` on ``x`` ('' when it can)."""
    spec = decoder.spec
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        return f"state on {x.device.type} (needs CUDA, or TRITON_INTERPRET=1 for CPU tensors)"
    try:
        import triton  # noqa: F401  (availability check)
    except ImportError:
        return "triton is not installed"
    if x.dtype not in KERNEL_STATE_DTYPES:
        return f"state dtype {x.dtype} (kernels take float32/float16/bfloat16)"
    if spec.hidden > MAX_HIDDEN:
        return f"hidden width {spec.hidden} > {MAX_HIDDEN}"
    if spec.kind == "lppn" and spec.out_channels > MAX_LPPN_OUT:
        return f"{spec.out_channels} output channels > {MAX_LPPN_OUT}"
    B, C, H, W = x.shape
    Ho, Wo = _out_size(spec, H, W, size)
    if max(B * C * H * W, spec.out_channels * Ho * Wo, 2 * Ho * H + Ho, 2 * Wo * W + Wo,
           H * W * 128) > _INT32:
        return "grid or image too large for 32-bit indexing"
    return ""


def _out_size(spec, H, W, size) -> Tuple[int, int]:
    if size is None:
        return spec.output_size(H, W)
    Ho, Wo = (int(v) for v in size)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"output size must be positive, got {tuple(size)}")
    if spec.kind == "pixel_shuffle" and (Ho, Wo) != spec.output_size(H, W):
        raise ValueError(f"a pixel_shuffle decoder renders exactly {spec.output_size(H, W)}, "
                         f"got size={(Ho, Wo)}")
    return Ho, Wo


def decode(decoder, x: torch.Tensor, *, backend: str = "auto", size=None,
           precision: str = "fp32") -> torch.Tensor:
    """Render ``x [B, C, H, W]`` with ``decoder``: ``[B, K, H*s, W*s]`` (or ``[B, K, *size]``)."""
    from .decoders.base import Decoder

    if not isinstance(decoder, Decoder):
        raise TypeError(f"decoder must be an nca_fast decoder, got {type(decoder).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    decoder.check_state(x)
    _out_size(decoder.spec, x.shape[2], x.shape[3], size)
    if backend == "reference":
        choice = "reference"
    else:
        reason = unavailable_reason(decoder, x, size)
        if backend == "triton":
            if reason:
                raise RuntimeError(f"backend='triton' cannot decode here: {reason}")
            choice = "triton"
        elif reason:
            choice = "reference"
            if x.device.type == "cuda":
                warnings.warn(f"nca_fast: decoding on the reference path: {reason}", RuntimeWarning)
        else:
            choice = "triton"
        if (choice, reason) not in _logged:
            _logged.add((choice, reason))
            log.info("nca_fast decode backend=%r chose %s%s", backend, choice,
                     f" ({reason})" if reason else "")
    if choice == "reference":
        with torch.no_grad():
            return decoder(x, size)
    return fused_decode(decoder, x, size=size, precision=precision)


# ---- weight packing (cached per decoder, device, precision and weight version) -------------------
def _pad_to(n: int, sizes) -> int:
    for s in sizes:
        if n <= s:
            return s
    raise ValueError(f"{n} exceeds the largest supported size {sizes[-1]}")


def _packed(decoder, device, fp16: bool) -> Dict[str, torch.Tensor]:
    params = decoder.params()
    key = (str(device), fp16, tuple((p.data_ptr(), p._version) for p in params.values()))
    cache = decoder.__dict__.setdefault("_nca_fast_packed", {})
    if key not in cache:
        cache.clear()
        with torch.no_grad():
            fn = _pack_lppn if decoder.spec.kind == "lppn" else _pack_pixel_shuffle
            cache[key] = fn(decoder.spec, {k: v.detach().to(device, torch.float32)
                                           for k, v in params.items()}, fp16)
    return cache[key]


def _pack_lppn(spec, p, fp16):
    from .kernels import decode as K

    hid = _pad_to(spec.hidden, K.HIDDEN_SIZES)
    wdt = torch.float16 if fp16 else torch.float32
    E, h, L = spec.coord_features, spec.hidden, spec.layers
    w0 = p["w0"] * spec.first_omega                      # [h, E + C], omega folded in
    b0 = p["b0"] * spec.first_omega
    state_w = torch.zeros(hid, spec.channels, device=w0.device)
    state_w[:h] = w0[:, E:]
    state_b = torch.zeros(hid, device=w0.device)
    state_b[:h] = b0
    coord_w = torch.zeros(E, hid, device=w0.device)
    coord_w[:, :h] = w0[:, :E].t()
    wh = torch.zeros(max(L - 1, 1), hid, hid, device=w0.device)
    bh = torch.zeros(max(L - 1, 1), hid, device=w0.device)
    for i in range(1, L):
        wh[i - 1, :h, :h] = p[f"w{i}"].t() * spec.hidden_omega
        bh[i - 1, :h] = p[f"b{i}"] * spec.hidden_omega
    wo = torch.zeros(hid, int(K.K_PAD), device=w0.device)
    wo[:h, :spec.out_channels] = p[f"w{L}"].t()
    bo = torch.zeros(int(K.K_PAD), device=w0.device)
    bo[:spec.out_channels] = p[f"b{L}"]
    return dict(hid=hid, state_w=state_w, state_b=state_b, w0=coord_w.contiguous(),
                wh=wh.to(wdt).contiguous(), bh=bh, wo=wo.to(wdt).contiguous(), bo=bo)


def _pack_pixel_shuffle(spec, p, fp16):
    from .kernels import decode as K

    wdt = torch.float16 if fp16 else torch.float32
    cb, nb = int(K.C_BLOCK), int(K.PS_N_BLOCK)
    c_pad = -(-spec.channels // cb) * cb
    N = spec.head_outputs
    n_pad = -(-N // nb) * nb
    dev = p["w0"].device
    if spec.layers == 0:
        hid = 0
        w0 = torch.zeros(c_pad, n_pad, device=dev)
        w0[:spec.channels, :N] = p["w0"].t()
        b0 = torch.zeros(n_pad, device=dev)
        b0[:N] = p["b0"]
        w1, b1 = w0, b0  # unused
    else:
        hid = _pad_to(spec.hidden, K.HIDDEN_SIZES)
        w0 = torch.zeros(c_pad, hid, device=dev)
        w0[:spec.channels, :spec.hidden] = p["w0"].t()
        b0 = torch.zeros(hid, device=dev)
        b0[:spec.hidden] = p["b0"]
        w1 = torch.zeros(hid, n_pad, device=dev)
        w1[:spec.hidden, :N] = p["w1"].t()
        b1 = torch.zeros(n_pad, device=dev)
        b1[:N] = p["b1"]
    return dict(hid=hid, n_pad=n_pad, w0=w0.to(wdt).contiguous(), b0=b0,
                w1=w1.to(wdt).contiguous(), b1=b1)


# ---- launch -------------------------------------------------------------------------------------
def fused_decode(decoder, x: torch.Tensor, *, size=None, precision: str = "fp32",
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused kernel (no dispatch; the caller has checked :func:`unavailable_reason`)."""
    from .kernels import decode as K

    spec = decoder.spec
    fp16 = precision == "fp16"
    B, C, H, W = x.shape
    Ho, Wo = _out_size(spec, H, W, size)
    odt = torch.float16 if fp16 else torch.float32
    if out is None:
        out = torch.empty(B, spec.out_channels, Ho, Wo, device=x.device, dtype=odt)
    elif tuple(out.shape) != (B, spec.out_channels, Ho, Wo) or out.dtype != odt \
            or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"out must be a contiguous {odt} tensor of shape "
                         f"{(B, spec.out_channels, Ho, Wo)} on {x.device}")
    pk = _packed(decoder, x.device, fp16)
    xs = x.detach().to(torch.float32).contiguous()  # the coarse state is s*s times smaller
    if spec.kind == "lppn":
        # layer 0's state part per cell (exact: bilinear weights sum to 1), channels-last
        proj = torch.addmm(pk["state_b"], xs.permute(0, 2, 3, 1).reshape(-1, C), pk["state_w"].t())
        launch = K.lppn_launch(pk["hid"])
        grid = (triton_cdiv(Ho * Wo, launch["BLOCK_P"]), B)
        K.lppn_kernel[grid](proj, out, pk["w0"], pk["wh"], pk["bh"], pk["wo"], pk["bo"],
                            H, W, Ho, Wo, spec.out_channels, spec.frequencies, spec.layers - 1,
                            int(spec.padding == "circular"), HID=pk["hid"],
                            BLOCK_P=launch["BLOCK_P"], DOT_FP16=fp16,
                            num_warps=launch["num_warps"], num_stages=launch["num_stages"])
    else:
        launch = K.pixel_shuffle_launch(pk["hid"])
        grid = (triton_cdiv(H * W, launch["BLOCK_M"]), pk["n_pad"] // launch["N_BLOCK"], B)
        K.pixel_shuffle_kernel[grid](xs, out, pk["w0"], pk["b0"], pk["w1"], pk["b1"],
                                     C, H, W, spec.out_channels, spec.scale, spec.head_outputs,
                                     pk["n_pad"], HID=pk["hid"], BLOCK_M=launch["BLOCK_M"],
                                     N_BLOCK=launch["N_BLOCK"], DOT_FP16=fp16,
                                     num_warps=launch["num_warps"], num_stages=launch["num_stages"])
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
