"""``decode(decoder, x)``: render a state through a decoder on the fused kernels or the reference.

``backend`` follows :mod:`nca_fast.backend` ("cpu" is the reference: decoders have no other CPU
path). ``precision`` (:mod:`nca_fast.precision`) selects the fused kernels' dot operands and output
dtype ("ieee": fp32-accurate, float32 out; "fp16" / "bf16": 16-bit operands and output); the
reference computes in float32 (float64 for a float64 state) whatever it is.

Differentiable: when autograd records the call, the fused decode's backward is the reference
decoder's vector-Jacobian product, recomputed from the saved state and weights (the forward saves
nothing of the decoded size), so a decoder trains with the NCA in one graph.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backend as backends
from ..kernels import config as kconfig
from ..kernels.decode import K_PAD
from ..kernels.launch import launch_lppn, launch_pixel_shuffle
from ..kernels.pack import cached, dot_dtype, pack_lppn, pack_pixel_shuffle
from ..precision import PRECISIONS
from ..utils.checks import check_memory
from .base import Decoder


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def decode(decoder, x: torch.Tensor, *, backend: str = "auto", size=None,
           precision: str = "ieee") -> torch.Tensor:
    """Render ``x [B, C, H, W]`` with ``decoder``: ``[B, K, H*s, W*s]`` (or ``[B, K, *size]``)."""
    if not isinstance(decoder, Decoder):
        raise TypeError(f"decoder must be an nca_fast decoder, got {type(decoder).__name__}")
    backends.check_backend(backend)
    check_precision(precision)
    decoder.check_state(x)
    Ho, Wo = kconfig.out_size(decoder.spec, x.shape[2], x.shape[3], size)
    B, K = x.shape[0], decoder.spec.out_channels
    check_memory(B * K * Ho * Wo * 4, x.device, f"a {B}x{K}x{Ho}x{Wo} decoded image", per_cell=B * K * 4)
    problem = kconfig.decode_problem(decoder.spec, x, size) if backend in ("auto", "triton") else ""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in decoder.parameters()))
    choice = backends.choose(backend, x, fused_problem=problem, cpu_path=False, cpu_preferred=False,
                             needs_grad=needs_grad, what="decode")
    if choice != "triton":
        with torch.set_grad_enabled(needs_grad):
            return decoder(x, size)
    if needs_grad:
        names = list(decoder.spec.parameter_shapes())
        return _FusedDecode.apply(decoder, size, precision, names, x, *(getattr(decoder, n) for n in names))
    return fused_decode(decoder, x, size=size, precision=precision)


class _FusedDecode(torch.autograd.Function):
    """The fused decode forward; backward: the reference decoder's VJP on the saved state and weights."""

    @staticmethod
    def forward(ctx, decoder, size, precision, names, x, *params):
        ctx.decoder, ctx.size, ctx.names = decoder, size, names
        ctx.save_for_backward(x, *params)
        return fused_decode(decoder, x, size=size, precision=precision)

    @staticmethod
    def backward(ctx, g):
        x, *params = ctx.saved_tensors
        dec = ctx.decoder

        def ref(xx, *ps):
            return dec.reference(xx, dict(zip(ctx.names, ps)), dec.spec, ctx.size)

        _, vjp = torch.func.vjp(ref, x.float(), *(p.float() for p in params))
        grads = vjp(g.float())
        gx = grads[0].to(x.dtype)
        return (None, None, None, None, gx, *(gp.to(p.dtype) for gp, p in zip(grads[1:], params)))


@torch.no_grad()
def fused_decode(decoder, x: torch.Tensor, *, size=None, precision: str = "ieee",
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused kernel (no dispatch: the caller has checked ``config.decode_problem``)."""
    spec = decoder.spec
    kp = kconfig.kernel_precision(check_precision(precision))
    B, C, H, W = x.shape
    Ho, Wo = kconfig.out_size(spec, H, W, size)
    odt = dot_dtype(precision)
    if out is None:
        out = torch.empty(B, spec.out_channels, Ho, Wo, device=x.device, dtype=odt)
    elif tuple(out.shape) != (B, spec.out_channels, Ho, Wo) or out.dtype != odt \
            or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"out must be a contiguous {odt} tensor of shape "
                         f"{(B, spec.out_channels, Ho, Wo)} on {x.device}")
    xs = x.detach().to(torch.float32).contiguous(memory_format=torch.channels_last)  # s*s times smaller
    if spec.kind == "lppn":
        packed = cached(decoder, ("lppn", kp, x.device),
                        lambda: pack_lppn(spec, decoder.params(), kp, x.device, int(K_PAD)))
        launch_lppn(spec, packed, kp, xs, out)
    else:
        head = kconfig.head_config(spec, kconfig.pow2(C))
        weights = cached(decoder, ("head", kp, head, x.device),
                         lambda: pack_pixel_shuffle(spec, decoder.params(), head, kp, x.device))
        launch_pixel_shuffle(head, weights, kp, xs, out)
    return out
