"""Differentiable fused rollouts: a whole rollout as one autograd node.

Stepping the ``nca_fast::fused_step`` op ``steps`` times pays, per step and direction, a custom-op
dispatch and an autograd node, a counter tensor copied to the device, fresh buffers, a reduction of the
weight gradients and four adds into the accumulated ones: host work that a 72x72x8 training rollout
(about 5 us of GPU time a step) cannot hide. Here the forward launches the steps into buffers allocated
once per rollout (the step counter is a kernel argument, the seed and base step one device tensor), and
the backward runs the steps' backward kernels in reverse:

- the state gradient ping-pongs between two fp32 buffers (never rounded to a 16-bit state dtype);
- the weight-gradient partial sums of every step accumulate in place in one buffer (each tile stream's
  row owned by one program per launch, no atomics) and are reduced once, in a fixed order: the
  gradients are bit-reproducible;
- per step it launches the backward (one pass, or the update and MLP passes of clamped models) and the
  transposed perception: 2-3 launches, against the forward's 2-3 (step, and finalize for alive models).

Memory (gradient checkpointing): the forward keeps the input state of each segment of ``seg`` steps and,
for the last segment, every step's input state and alive bytes; the backward recomputes each earlier
segment's from its checkpoint into the same buffers. So a rollout holds ``ceil(steps / seg) + seg``
states (+ ``seg`` alive planes) between its forward and backward, and one ``seg = steps`` rollout
recomputes nothing. Models the fused backward does not take use the op path (``model.rollout``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..spec import NCASpec
from .config import INT32_MAX, StepConfig
from .launch import (
    backward_buffers,
    counter_tensor,
    launch_finalize,
    launch_perceive_vjp,
    launch_reduce_partials,
    launch_step,
    launch_step_backward,
)
from .op import check_backward_size
from .pack import dot_dtype


@dataclass(frozen=True)
class RolloutPlan:
    """What a differentiable fused rollout runs: ``steps`` steps from step counter ``start_step``,
    checkpointed in segments of ``seg`` steps, keeping the state after every ``every``-th step."""
    spec: NCASpec
    cfg: StepConfig
    precision: str
    steps: int
    seg: int
    seed: int
    start_step: int
    origin: Tuple[int, int]
    every: Optional[int]

    @property
    def n_seg(self) -> int:
        return -(-self.steps // self.seg)

    def segment(self, s: int) -> Tuple[int, int]:
        """(first step, number of steps) of segment ``s``."""
        return s * self.seg, min(self.seg, self.steps - s * self.seg)

    def kept(self, k: int) -> int:
        """The index in the kept stack of the state after step ``k``, or -1."""
        return (k + 1) // self.every - 1 if self.every is not None and (k + 1) % self.every == 0 else -1


class _Buffers:
    """A rollout's states between its forward and backward: ``ckpts[s]`` the input of segment ``s``,
    ``inner[i]`` the input of step ``i + 1`` of the segment last run, ``lives[i]`` the alive bytes of its
    step ``i``; ``y``/``pre`` the pending form between an alive model's step and its finalize."""

    def __init__(self, plan: RolloutPlan, x: torch.Tensor):
        B, _, H, W = x.shape
        alive = plan.cfg.ALIVE

        def state():
            return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

        self.ckpts = [state() for _ in range(plan.n_seg)]
        self.inner = [state() for _ in range(plan.seg - 1)]
        self.lives = torch.empty(plan.seg, B, H, W, dtype=torch.uint8, device=x.device) if alive else None
        self.y = state() if alive else None
        self.pre = torch.empty(B, H, W, dtype=torch.uint8, device=x.device) if alive else None

    def input_of(self, plan: RolloutPlan, s: int, i: int) -> torch.Tensor:
        return self.ckpts[s] if i == 0 else self.inner[i - 1]


def _run_segment(plan: RolloutPlan, packed, ctr, bufs: _Buffers, s: int, out: torch.Tensor,
                 kept: Optional[torch.Tensor] = None) -> None:
    """Segment ``s`` forward from ``bufs.ckpts[s]``: its inner states and alive bytes into ``bufs``, its
    last state into the next checkpoint (``out`` for the last segment); the kept states into ``kept``."""
    cfg, spec = plan.cfg, plan.spec
    k0, n = plan.segment(s)
    src = bufs.ckpts[s]
    for i in range(n):
        k = k0 + i
        dst = bufs.inner[i] if i < n - 1 else (bufs.ckpts[s + 1] if s + 1 < plan.n_seg else out)
        if cfg.ALIVE:  # the step, then its true state (and each cell's alive decision for the backward)
            launch_step(cfg, spec, packed, src, None, bufs.y, bufs.pre, ctr, step_offset=k, origin=plan.origin,
                        fire_rate=spec.fire_rate)
            launch_finalize(cfg, spec, bufs.y, bufs.pre, dst, life=bufs.lives[i])
        else:
            launch_step(cfg, spec, packed, src, None, dst, None, ctr, step_offset=k, origin=plan.origin,
                        fire_rate=spec.fire_rate)
        if kept is not None and plan.kept(k) >= 0:
            kept[plan.kept(k)].copy_(dst)
        src = dst


class _FusedRolloutFn(torch.autograd.Function):
    """``(plan, x, w1, wb, w2, b2, fscale) -> (final state, kept states)``; the weights packed in fp32
    (``pack.pack_step(..., torch.float32)``), differentiable in ``x`` and ``w1, wb, w2, b2``."""

    @staticmethod
    def forward(ctx, plan: RolloutPlan, x, w1, wb, w2, b2, fscale):
        dot = dot_dtype(plan.precision)
        packed = (w1.to(dot), wb.to(dot), w2.to(dot), b2, fscale)  # (once per rollout, not per step)
        ctr = counter_tensor(plan.seed, plan.start_step, x.device)
        bufs = _Buffers(plan, x)
        bufs.ckpts[0].copy_(x)
        out = torch.empty_like(bufs.ckpts[0])
        n_kept = plan.steps // plan.every if plan.every is not None else 0
        kept = torch.empty((n_kept,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        for s in range(plan.n_seg):
            _run_segment(plan, packed, ctr, bufs, s, out, kept)
        ctx.plan, ctx.packed, ctx.ctr, ctx.bufs = plan, packed, ctr, bufs
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(w1, wb, w2, b2, fscale)
        return out, kept

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_kept):
        plan, cfg, spec, bufs = ctx.plan, ctx.plan.cfg, ctx.plan.spec, ctx.bufs
        w1, wb, w2, b2, fscale = ctx.saved_tensors
        weights = (w1.float(), wb.float(), w2.float(), b2, fscale)  # the gradient dots take fp32 weights
        x0 = bufs.ckpts[0]
        B, _, H, W = x0.shape
        step_b = max(1, INT32_MAX // check_backward_size(cfg, H, W))  # images per launch (one unless huge)
        scratch = backward_buffers(cfg, (min(B, step_b),) + tuple(x0.shape[1:]), x0.device)
        g = [torch.empty(x0.shape, dtype=torch.float32, device=x0.device, memory_format=torch.channels_last)
             for _ in range(2)]
        g[0].copy_(g_out)
        cur = 0
        for s in reversed(range(plan.n_seg)):
            k0, n = plan.segment(s)
            if s < plan.n_seg - 1:  # (the last segment's states are still there from the forward)
                _run_segment(plan, ctx.packed, ctx.ctr, bufs, s, bufs.ckpts[s + 1])
            for i in reversed(range(n)):
                k = k0 + i
                if g_kept is not None and plan.kept(k) >= 0:
                    g[cur].add_(g_kept[plan.kept(k)])
                x, life = bufs.input_of(plan, s, i), bufs.lives[i] if cfg.ALIVE else None
                for b0 in range(0, B, step_b):
                    b1 = min(B, b0 + step_b)
                    gy = g[1 - cur][b0:b1]
                    gp = launch_step_backward(cfg, spec, weights, x[b0:b1], life[b0:b1] if life is not None else None,
                                              g[cur][b0:b1], gy, scratch, ctx.ctr, step_offset=k, origin=plan.origin,
                                              batch_offset=b0, fire_rate=spec.fire_rate)
                    launch_perceive_vjp(cfg, gp, gy, fscale)
                cur = 1 - cur
        gw1, gwb, gw2, gb2 = launch_reduce_partials(cfg, scratch.part)
        ctx.bufs = ctx.packed = None  # (the states go now, not when the graph does)
        gx = g[cur].to(ctx.x_dtype)  # (channels-last, as the state)
        return None, gx, gw1.to(w1.dtype), gwb.to(wb.dtype), gw2.to(w2.dtype), gb2.to(b2.dtype), None


def fused_rollout_grad(spec: NCASpec, cfg: StepConfig, precision: str, packed, x: torch.Tensor, steps: int, *,
                       seed: int, start_step: int, origin: Tuple[int, int], every: Optional[int],
                       seg: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A differentiable fused rollout of ``x [B, C, H, W]`` (``steps >= 1``): returns the final state
    (channels-last) and the states after every ``every``-th step stacked ``[steps // every, B, C, H, W]``
    (empty without ``every``); ``packed``: the fp32 step weights under autograd. Checkpointed in
    segments of ``seg`` steps (``seg >= steps``: nothing recomputed)."""
    plan = RolloutPlan(spec, cfg, precision, int(steps), max(1, min(int(seg), int(steps))), int(seed),
                       int(start_step), (int(origin[0]), int(origin[1])), every)
    return _FusedRolloutFn.apply(plan, x, *packed)
