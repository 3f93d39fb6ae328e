"""The ``nca_fast::fused_step`` torch op and its backward: one fused step as an operator that autograd,
``torch.compile`` (``fullgraph=True``) and CUDA graphs can hold.

Forward: ``(x, packed weights, counters, mask) -> (y, life)``; ``life`` is each cell's alive decision
(u8 ``[B, H, W]``; empty without alive masks), the one thing the backward needs beyond the input state.
Backward (``nca_fast::fused_step_backward``): the fused backward's kernels (``step_backward.py``: the
step's backward, the weight-gradient reduction, the transposed perception), or, for models wider than
they take, the reference step's vector-Jacobian product on the same masks.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .. import reference, rng
from ..spec import NCASpec
from ..utils.checks import once_differentiable
from .config import INT32_MAX, step_config
from .launch import (
    backward_buffers,
    counter_tensor,
    launch_finalize,
    launch_perceive_vjp,
    launch_reduce_partials,
    launch_step,
    launch_step_backward,
)
from .pack import dot_dtype


@functools.lru_cache(maxsize=64)
def _spec_from_json(spec_json: str) -> NCASpec:
    return NCASpec.from_json(spec_json)


@torch.library.custom_op("nca_fast::fused_step", mutates_args=())
def fused_step_op(x: torch.Tensor, w1: torch.Tensor, wb: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, fscale: torch.Tensor, ctr: torch.Tensor, update_mask: Optional[torch.Tensor],
                  spec_json: str, fire_rate: float, row0: int, col0: int,
                  precision: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """One fused step of the NCA described by ``spec_json`` with packed weights (``pack.pack_step``
    in ``precision``); ``ctr`` = int64 [seed, step] on x's device. Returns the new state,
    channels-last (a contiguous NCHW ``x`` is converted on the way in), and ``life``."""
    spec = _spec_from_json(spec_json)
    cfg = step_config(spec, precision)
    dot = dot_dtype(precision)
    w1, wb, w2 = (w.to(dot) for w in (w1, wb, w2))  # (a training pack is fp32: a few KB cast per step)
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x)
    packed = (w1, wb, w2, b2, fscale)
    if cfg.ALIVE:
        y = torch.empty_like(x)
        pre = torch.empty(x.shape[0], x.shape[2], x.shape[3], dtype=torch.uint8, device=x.device)
        life = torch.empty_like(pre)
        launch_step(cfg, spec, packed, x, None, y, pre, ctr, origin=(row0, col0), fire_rate=fire_rate,
                    update_mask=update_mask)
        launch_finalize(cfg, spec, y, pre, out, life=life)
    else:
        launch_step(cfg, spec, packed, x, None, out, None, ctr, origin=(row0, col0),
                    fire_rate=fire_rate, update_mask=update_mask)
        life = torch.empty(0, dtype=torch.uint8, device=x.device)
    return out, life


@fused_step_op.register_fake
def _(x, w1, wb, w2, b2, fscale, ctr, update_mask, spec_json, fire_rate, row0, col0, precision):
    spec = _spec_from_json(spec_json)
    life = x.new_empty((x.shape[0], x.shape[2], x.shape[3]) if spec.alive_channel is not None else (0,),
                       dtype=torch.uint8)
    return torch.empty_like(x, memory_format=torch.channels_last), life


@torch.library.custom_op("nca_fast::fused_step_backward", mutates_args=())
def fused_step_backward_op(x: torch.Tensor, life: torch.Tensor, g: torch.Tensor, w1: torch.Tensor,
                           wb: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, fscale: torch.Tensor,
                           ctr: torch.Tensor, update_mask: Optional[torch.Tensor], spec_json: str, fire_rate: float,
                           row0: int, col0: int, precision: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, torch.Tensor]:
    """Gradients of ``fused_step_op``'s state output: (gx like x, gw1, gwb, gw2, gb2 like the packed
    weights)."""
    spec = _spec_from_json(spec_json)
    cfg = step_config(spec, precision)
    dtypes = [t.dtype for t in (w1, wb, w2)]
    w1, wb, w2 = (w.float() for w in (w1, wb, w2))  # the gradient dots take fp32 weights
    if cfg.backward_problem():
        gx, gw1, gwb, gw2, gb2 = _reference_backward(spec, x, g, (w1, wb, w2, b2), ctr, update_mask, fire_rate,
                                                     (row0, col0), cfg.SPLIT)
        return gx, gw1.to(dtypes[0]), gwb.to(dtypes[1]), gw2.to(dtypes[2]), gb2
    xc = x.contiguous(memory_format=torch.channels_last)
    gc = g.to(dtype=torch.float32, memory_format=torch.channels_last)  # (the kernels take fp32 gradients)
    B, _, H, W = x.shape
    step_b = images_per_launch(cfg, H, W)
    bufs = backward_buffers(cfg, (min(B, step_b),) + tuple(x.shape[1:]), x.device)
    gx = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=torch.channels_last)
    for b0 in range(0, B, step_b):
        b1 = min(B, b0 + step_b)
        gp = launch_step_backward(cfg, spec, (w1, wb, w2, b2, fscale), xc[b0:b1], life[b0:b1] if cfg.ALIVE else None,
                                  gc[b0:b1], gx[b0:b1], bufs, ctr, origin=(row0, col0), batch_offset=b0,
                                  fire_rate=fire_rate, update_mask=update_mask[b0:b1] if update_mask is not None
                                  else None)
        launch_perceive_vjp(cfg, gp, gx[b0:b1], fscale)
    gw1, gwb, gw2, gb2 = launch_reduce_partials(cfg, bufs.part)
    return _like(x, gx), gw1.to(dtypes[0]), gwb.to(dtypes[1]), gw2.to(dtypes[2]), gb2


def check_backward_size(cfg, H: int, W: int) -> int:
    """Refuse an image whose perception gradients (the widest per-cell buffer of the fused backward)
    cannot be indexed in 32 bits; returns their count per image (a batch beyond 32 bits runs in slices
    of whole images)."""
    per_image = H * W * cfg.F * cfg.CP
    if per_image > INT32_MAX:
        raise ValueError(f"the fused backward indexes {cfg.F}x{cfg.CP} perception gradients per cell in 32 bits: "
                         f"a {H}x{W} image needs {per_image} > 2**31 - 1 (train on smaller grids or sharded)")
    return per_image


def images_per_launch(cfg, H: int, W: int) -> int:
    """Images of H x W a launch of the fused backward takes (the whole batch unless it is huge)."""
    return max(1, INT32_MAX // check_backward_size(cfg, H, W))


@fused_step_backward_op.register_fake
def _(x, life, g, w1, wb, w2, b2, fscale, ctr, update_mask, spec_json, fire_rate, row0, col0, precision):
    return (torch.empty_like(x), torch.empty_like(w1), torch.empty_like(wb), torch.empty_like(w2),
            torch.empty_like(b2))


def _reference_backward(spec: NCASpec, x, g, packed, ctr, update_mask, fire_rate, origin, split):
    """The backward of models the fused backward does not take: the reference step's vector-Jacobian
    product (fp32) on the same update mask, mapped onto the packed layouts."""
    w1, wb, w2, b2 = (t[0] + t[1] if split and t.dim() > 1 else t for t in packed)
    C, h, F = spec.channels, spec.hidden, spec.n_filters
    params = {"w1": w1[:, :C, :h].permute(2, 0, 1).reshape(h, F * C), "w2": w2[:h, :C].t()}
    if spec.hidden_bias:
        params["b1"] = wb[0, :h]
    if spec.update_bias:
        params["b2"] = b2[:C]
    if update_mask is None:
        seed, step = (int(v) for v in ctr.tolist())
        B, _, H, W = x.shape
        update_mask = rng.update_mask(B, H, W, seed=seed % 2**64, step=step, fire_rate=fire_rate, origin=origin,
                                      device=x.device)
    _, vjp = torch.func.vjp(lambda xx, pp: reference.step(xx, pp, spec, update_mask), x.float(), params)
    gx, gparams = vjp(g.float())
    gw1 = torch.zeros_like(w1)
    gw1[:, :C, :h] = gparams["w1"].reshape(h, F, C).permute(1, 2, 0)
    gw2 = torch.zeros_like(w2)
    gw2[:h, :C] = gparams["w2"].t()
    gwb = torch.zeros_like(wb)
    gb2 = torch.zeros_like(b2)
    if spec.hidden_bias:
        gwb[0, :h] = gparams["b1"]
    if spec.update_bias:
        gb2[:C] = gparams["b2"]
    if split:
        gw1, gwb, gw2 = (torch.stack([t, t]) for t in (gw1, gwb, gw2))
    return _like(x, gx), gw1, gwb, gw2, gb2


def _like(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v`` in ``x``'s dtype and memory format (what the fake implementation promises): ``v`` itself
    when it already is."""
    if v.dtype == x.dtype and v.stride() == x.stride():
        return v
    return torch.empty_like(x).copy_(v)


def _setup_context(ctx, inputs, output):
    x, w1, wb, w2, b2, fscale, ctr, update_mask, spec_json, fire_rate, row0, col0, precision = inputs
    ctx.save_for_backward(x, output[1], w1, wb, w2, b2, fscale, ctr, update_mask)
    ctx.args = (spec_json, fire_rate, row0, col0, precision)


def _backward(ctx, g, _glife):
    once_differentiable("the fused step")
    x, life, w1, wb, w2, b2, fscale, ctr, update_mask = ctx.saved_tensors
    gx, gw1, gwb, gw2, gb2 = fused_step_backward_op(x, life, g, w1, wb, w2, b2, fscale, ctr, update_mask, *ctx.args)
    return gx, gw1, gwb, gw2, gb2, None, None, None, None, None, None, None, None


fused_step_op.register_autograd(_backward, setup_context=_setup_context)


def fused_step(spec: NCASpec, packed, x: torch.Tensor, *, seed: int, step: int,
               update_mask: Optional[torch.Tensor], fire_rate: float, origin: Tuple[int, int],
               precision: str) -> torch.Tensor:
    """One fused step of ``x`` (weights packed for ``precision``) through the op; differentiable in
    ``x`` and the packed weights."""
    ctr = counter_tensor(seed, step, x.device)
    return fused_step_op(x, *packed, ctr, update_mask, spec.json, float(fire_rate),
                         int(origin[0]), int(origin[1]), precision)[0]
