"""Differentiable fused rollouts: a whole rollout as one autograd node, its launches CUDA-graphed.

Stepping the ``nca_fast::fused_step`` op ``steps`` times pays, per step and direction, a custom-op
dispatch and an autograd node, a counter tensor copied to the device, fresh buffers, a reduction of the
weight gradients and four adds into the accumulated ones: host work that a 72x72x8 training rollout
(about 5 us of GPU time a step) cannot hide. Here the forward launches the steps into buffers allocated
once (the step counter is a kernel argument, the seed and base step one device tensor), and the backward
runs the steps' backward kernels in reverse:

- the state gradient ping-pongs between two fp32 buffers (never rounded to a 16-bit state dtype);
- the weight-gradient partial sums of every step accumulate in place in one buffer (each tile stream's
  row owned by one program per launch, no atomics) and are reduced once, in a fixed order: the
  gradients are bit-reproducible;
- per step it launches the backward (one pass, or the update and MLP passes of clamped models) and the
  transposed perception, against the forward's step (and finalize for alive models).

On CUDA the forward's and the backward's launches are captured as two CUDA graphs once per state
shape and rollout length (``_Rollout`` owns every buffer they touch, shared by the lengths; a call
copies its input, weights and counters in and its results out), so a training iteration costs two
graph launches instead of ~5 kernel launches a step.
A rollout whose buffers a later rollout of the same shape has overwritten (two forwards before a
backward) replays its forward again before its backward: the same kernels on the same inputs, so the
same states.

Memory (gradient checkpointing): the forward keeps the input state of each segment of ``seg`` steps and,
for the last segment, every step's input state and alive bytes; the backward recomputes each earlier
segment's from its checkpoint into the same buffers. So a rollout holds ``ceil(steps / seg) + seg``
states (+ ``seg`` alive planes) between its forward and backward, and one ``seg = steps`` rollout
recomputes nothing. Models the fused backward does not take use the op path (``model.rollout``).
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..spec import NCASpec
from ..utils.checks import check_memory, once_differentiable
from .config import StepConfig, interpreting
from .launch import (
    backward_buffers,
    counter_tensor,
    launch_finalize,
    launch_perceive_vjp,
    launch_reduce_partials,
    launch_step,
    launch_step_backward,
    weight_gradient_buffers,
)
from .op import images_per_launch
from .pack import dot_dtype


@dataclass(frozen=True)
class RolloutPlan:
    """What a differentiable fused rollout runs (whatever its seed and first step counter): ``steps``
    steps of states ``shape`` in ``dtype``, checkpointed in segments of ``seg`` steps, keeping the state
    after every ``every``-th step."""
    spec: NCASpec
    cfg: StepConfig
    precision: str
    shape: Tuple[int, int, int, int]
    dtype: torch.dtype
    device: torch.device
    steps: int
    seg: int
    origin: Tuple[int, int]
    every: Optional[int]

    @property
    def buffers_key(self) -> tuple:
        """What the buffers depend on (rollouts that differ only in the rest share them)."""
        return self.spec, self.cfg, self.precision, self.shape, self.dtype, self.device

    @property
    def launches_key(self) -> tuple:
        """What else the launches depend on: one pair of CUDA graphs per value."""
        return self.steps, self.seg, self.origin, self.every

    @property
    def n_seg(self) -> int:
        return -(-self.steps // self.seg)

    @property
    def n_kept(self) -> int:
        return self.steps // self.every if self.every is not None else 0

    def segment(self, s: int) -> Tuple[int, int]:
        """(first step, number of steps) of segment ``s``."""
        return s * self.seg, min(self.seg, self.steps - s * self.seg)

    def kept(self, k: int) -> int:
        """The index in the kept stack of the state after step ``k``, or -1."""
        return (k + 1) // self.every - 1 if self.every is not None and (k + 1) % self.every == 0 else -1


class _Rollout:
    """Every buffer of differentiable rollouts of one state shape, and their launches, which touch
    nothing else (so that they can be captured in CUDA graphs): the inputs (``ckpts[0]``, the weights,
    ``ctr``), the states between forward and backward (``ckpts[s]`` the input of segment ``s``,
    ``inner[i]`` the input of step ``i + 1`` of the segment last run, ``lives[i]`` the alive bytes of its
    step ``i``; ``y``/``pre`` an alive model's pending form between its step and finalize), the outputs
    (``out``, ``kept[j]``), the incoming gradients (``g[0]``, ``g_kept[j]``) and the backward's scratch
    and results. The per-step lists grow to what the longest rollout needs (appending leaves the
    tensors that captured graphs point to in place), so rollouts of 64 to 96 steps share one set."""

    def __init__(self, plan: RolloutPlan, packed):
        self.key = plan.buffers_key
        self.shape, self.dtype, self.device = plan.shape, plan.dtype, plan.device
        B, _, H, W = plan.shape
        cfg, dev = plan.cfg, plan.device
        dot = dot_dtype(plan.precision)
        self.weights = tuple(torch.empty_like(w) for w in packed)  # fp32 (the backward's)
        self.dot = tuple(torch.empty_like(w, dtype=dot) for w in packed[:3])  # w1, wb, w2 as the forward dots them
        self.ctr = torch.zeros(2, dtype=torch.int64, device=dev)
        self.ckpts, self.inner, self.lives, self.kept, self.g_kept = [], [], [], [], []
        self.y = self._state() if cfg.ALIVE else None
        self.pre = torch.empty(B, H, W, dtype=torch.uint8, device=dev) if cfg.ALIVE else None
        self.out = self._state()
        self.step_b = images_per_launch(cfg, H, W)
        self.scratch = backward_buffers(cfg, (min(B, self.step_b),) + plan.shape[1:], dev)
        self.g = [self._state(torch.float32) for _ in range(2)]
        self.grads = weight_gradient_buffers(cfg, dev)
        self.graphs: "OrderedDict[tuple, tuple]" = OrderedDict()  # launches_key -> (forward, backward) graphs
        self.generation = 0  # forwards run into these buffers (a backward checks its own is the last)
        self.graphed = False  # whether the last forward replayed a graph

    def _state(self, dtype=None) -> torch.Tensor:
        return torch.empty(self.shape, dtype=dtype or self.dtype, device=self.device,
                           memory_format=torch.channels_last)

    def ensure(self, plan: RolloutPlan) -> "_Rollout":
        """Grow the per-step lists to what ``plan`` needs."""
        B, _, H, W = self.shape
        for lst, n, make in ((self.ckpts, plan.n_seg, self._state), (self.inner, plan.seg - 1, self._state),
                             (self.kept, plan.n_kept, self._state), (self.g_kept, plan.n_kept, self._state),
                             (self.lives, plan.seg if plan.cfg.ALIVE else 0,
                              lambda: torch.empty(B, H, W, dtype=torch.uint8, device=self.device))):
            lst += [make() for _ in range(n - len(lst))]
        return self

    def tensors(self):
        """Every buffer (for memory accounting)."""
        s = self.scratch
        return [t for t in (*self.weights, *self.dot, self.ctr, *self.ckpts, *self.inner, *self.lives, self.y,
                            self.pre, self.out, *self.kept, *self.g, *self.g_kept, *self.grads, s.gp, s.part, s.gd)
                if t is not None]

    def load(self, x: torch.Tensor, packed, seed: int, start_step: int) -> None:
        """The inputs into the buffers that the launches read (outside any graph: host-to-device)."""
        self.ckpts[0].copy_(x)
        for dst, w in zip(self.weights, packed):
            dst.copy_(w)
        self.ctr.copy_(counter_tensor(seed, start_step, "cpu"))

    # ---- the launches (of one plan; everything they read and write is a buffer above) -----------
    def forward(self, plan: RolloutPlan) -> None:
        for d, w in zip(self.dot, self.weights):
            d.copy_(w)
        for s in range(plan.n_seg):
            self._segment(plan, s, keep=True)

    def _segment(self, plan: RolloutPlan, s: int, keep: bool) -> None:
        """Segment ``s`` forward from ``ckpts[s]``: its inner states and alive bytes, its last state into
        the next checkpoint (``out`` for the last segment); with ``keep`` the kept states."""
        cfg, spec = plan.cfg, plan.spec
        packed = (*self.dot, *self.weights[3:])
        k0, n = plan.segment(s)
        src = self.ckpts[s]
        for i in range(n):
            k = k0 + i
            dst = self.inner[i] if i < n - 1 else (self.ckpts[s + 1] if s + 1 < plan.n_seg else self.out)
            if cfg.ALIVE:  # the step, then its true state (and each cell's alive decision for the backward)
                launch_step(cfg, spec, packed, src, None, self.y, self.pre, self.ctr, step_offset=k,
                            origin=plan.origin, fire_rate=spec.fire_rate)
                launch_finalize(cfg, spec, self.y, self.pre, dst, life=self.lives[i])
            else:
                launch_step(cfg, spec, packed, src, None, dst, None, self.ctr, step_offset=k, origin=plan.origin,
                            fire_rate=spec.fire_rate)
            if keep and plan.kept(k) >= 0:
                self.kept[plan.kept(k)].copy_(dst)
            src = dst

    def backward(self, plan: RolloutPlan) -> None:
        """From ``g[0]`` (dL/d out) and ``g_kept``: dL/dx into ``gx(plan)``, the weight gradients into
        ``grads``."""
        cfg, spec = plan.cfg, plan.spec
        B = plan.shape[0]
        self.scratch.part.zero_()
        cur = 0
        for s in reversed(range(plan.n_seg)):
            k0, n = plan.segment(s)
            if s < plan.n_seg - 1:  # (the last segment's states are still there from the forward)
                self._segment(plan, s, keep=False)
            for i in reversed(range(n)):
                k = k0 + i
                if plan.kept(k) >= 0:
                    self.g[cur].add_(self.g_kept[plan.kept(k)])
                x = self.ckpts[s] if i == 0 else self.inner[i - 1]
                life = self.lives[i] if cfg.ALIVE else None
                for b0 in range(0, B, self.step_b):
                    b1 = min(B, b0 + self.step_b)
                    gy = self.g[1 - cur][b0:b1]
                    gp = launch_step_backward(cfg, spec, self.weights, x[b0:b1],
                                              life[b0:b1] if life is not None else None, self.g[cur][b0:b1], gy,
                                              self.scratch, self.ctr, step_offset=k, origin=plan.origin,
                                              batch_offset=b0, fire_rate=spec.fire_rate)
                    launch_perceive_vjp(cfg, gp, gy, self.weights[4])
                cur = 1 - cur
        launch_reduce_partials(cfg, self.scratch.part, out=self.grads)

    def gx(self, plan: RolloutPlan) -> torch.Tensor:
        return self.g[plan.steps % 2]  # (each step's backward writes the other buffer)

    def capture(self, plan: RolloutPlan) -> None:
        """Record ``plan``'s forward and backward as CUDA graphs (after a warm-up run of each, which
        compiles the kernels outside the capture), keeping the last ``MAX_GRAPHS`` plans' graphs."""
        cuda = self.device.type == "cuda"
        with self._current():
            stream = torch.cuda.Stream() if cuda else None
            if cuda:
                stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                self.forward(plan)
                self.g[0].zero_()
                for t in self.g_kept:
                    t.zero_()
                self.backward(plan)
            if cuda:
                torch.cuda.current_stream().wait_stream(stream)
            self.graphs[plan.launches_key] = (cuda_graph(lambda: self.forward(plan)),
                                              cuda_graph(lambda: self.backward(plan)))
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)

    def run_forward(self, plan: RolloutPlan) -> None:
        graphs = self.graphs.get(plan.launches_key)
        if graphs is not None:
            self.graphs.move_to_end(plan.launches_key)
            with self._current():
                graphs[0].replay()
        else:
            self.forward(plan)
        self.generation += 1
        self.graphed = graphs is not None

    def run_backward(self, plan: RolloutPlan) -> None:
        graphs = self.graphs.get(plan.launches_key)
        if graphs is None:
            self.backward(plan)
            return
        with self._current():
            graphs[1].replay()

    def _current(self):
        """This rollout's device made current (CUDA streams, graphs and replays belong to the current
        device, not to the tensors')."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()


def cuda_graph(fn):
    """``fn``'s launches as a replayable CUDA graph."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def use_graphs(x: torch.Tensor) -> bool:
    """Capture the rollout's launches (CUDA, compiled kernels, not inside someone else's capture)."""
    return x.is_cuda and not interpreting() and not torch.cuda.is_current_stream_capturing()


# Captured rollouts, one buffer set per owner (a model): a training loop runs one state shape (a new one
# replaces it) and a few rollout lengths (Distill: 64 to 96 steps), each captured once.
MAX_GRAPHS = 64  # (forward, backward) graph pairs kept per owner, least recently used dropped
_GRAPHED: "weakref.WeakKeyDictionary[object, _Rollout]" = weakref.WeakKeyDictionary()
_UNCAPTURABLE: "weakref.WeakSet[object]" = weakref.WeakSet()  # owners whose capture failed once


def captured(owner) -> bool:
    """Whether ``owner``'s last differentiable rollout ran as CUDA graphs."""
    r = _GRAPHED.get(owner)
    return r is not None and r.graphed


def held_bytes(owner) -> int:
    """Device memory that ``owner``'s captured rollouts hold between rollouts (reused, or freed, by its
    next one: what a free-memory estimate should count as free)."""
    r = _GRAPHED.get(owner)
    if r is None:
        return 0
    return sum(t.numel() * t.element_size() for t in r.tensors())


def _rollout_for(plan: RolloutPlan, owner, packed) -> _Rollout:
    """The owner's buffers for this plan's state shape (replacing those of another), or fresh ones."""
    if owner is None:
        return _Rollout(plan, packed).ensure(plan)
    r = _GRAPHED.get(owner)
    if r is None or r.key != plan.buffers_key:
        _GRAPHED.pop(owner, None)  # (its buffers go before the new ones are allocated)
        r = _GRAPHED[owner] = _Rollout(plan, packed)
    return r.ensure(plan)


class _FusedRolloutFn(torch.autograd.Function):
    """``(plan, owner, seed, start_step, x, w1, wb, w2, b2, fscale) -> (final state, kept states)``; the
    weights packed in fp32 (``pack.pack_step(..., torch.float32)``), differentiable in ``x`` and
    ``w1, wb, w2, b2``. ``owner``: whose captured graphs to use, or None (no graphs)."""

    @staticmethod
    def forward(ctx, plan: RolloutPlan, owner, seed: int, start_step: int, x, *packed):
        r = _rollout_for(plan, owner, packed)
        r.load(x, packed, seed, start_step)
        if owner is not None and plan.launches_key not in r.graphs:
            try:
                r.capture(plan)
            except RuntimeError as e:  # (CUDA's errors: plain launches from now on, said once per model)
                _GRAPHED.pop(owner, None)
                _UNCAPTURABLE.add(owner)
                warnings.warn(f"nca_fast: capturing a rollout's CUDA graphs failed ({type(e).__name__}: {e}); "
                              "this model launches its kernels one by one from now on", RuntimeWarning,
                              stacklevel=2)
                owner = None
                r = _rollout_for(plan, None, packed)
                r.load(x, packed, seed, start_step)
        r.run_forward(plan)
        ctx.plan, ctx.r, ctx.generation, ctx.counters = plan, r, r.generation, (seed, start_step)
        ctx.save_for_backward(x, *packed)
        kept = (torch.stack(r.kept[:plan.n_kept]) if plan.n_kept else
                torch.empty((0,) + plan.shape, dtype=plan.dtype, device=plan.device))
        if owner is None:  # fresh buffers, returned as they are (and dropped from r: an output held by
            out, r.out = r.out, None  # its own node's context would never be freed without a backward)
            return out, kept
        return r.out.clone(), kept  # (the graph's buffers: the next rollout overwrites them)

    @staticmethod
    def backward(ctx, g_out, g_kept):
        once_differentiable("the fused rollout")
        plan = ctx.plan
        x, *packed = ctx.saved_tensors
        r = ctx.r if ctx.r is not None else _rollout_for(plan, None, packed)  # (a 2nd backward: retain_graph)
        if ctx.r is None or r.generation != ctx.generation:  # a later rollout overwrote the states
            r.load(x, packed, *ctx.counters)
            r.run_forward(plan)
        r.g[0].copy_(g_out)
        for j in range(plan.n_kept):
            r.g_kept[j].copy_(g_kept[j])
        r.run_backward(plan)
        r.generation += 1  # (the backward's recomputation overwrote inner states)
        ctx.r = None  # (buffers not captured go now, not when the autograd graph does)
        gx = r.gx(plan).to(x.dtype, copy=True)
        gw1, gwb, gw2, gb2 = (g.to(w.dtype, copy=True) for g, w in zip(r.grads, packed))
        return None, None, None, None, gx, gw1, gwb, gw2, gb2, None


def rollout_bytes(plan: RolloutPlan) -> int:
    """Device memory a differentiable rollout of ``plan`` holds (its ``_Rollout``, weights aside)."""
    B, C, H, W = plan.shape
    cells, cfg = B * H * W, plan.cfg
    state = cells * C * torch.empty((), dtype=plan.dtype).element_size()
    states = plan.n_seg + plan.seg - 1 + 1 + 2 * plan.n_kept + (1 if cfg.ALIVE else 0)
    alive = (plan.seg + 1) * cells if cfg.ALIVE else 0
    slice_cells = min(B, images_per_launch(cfg, H, W)) * H * W
    n_chunks = -(-cfg.HP // cfg.backward_chunk())
    scratch = slice_cells * 4 * (n_chunks * cfg.F * cfg.CP + (cfg.CP if 1 in cfg.backward_passes() else 0))
    return states * state + alive + 2 * cells * C * 4 + scratch


def fused_rollout_grad(spec: NCASpec, cfg: StepConfig, precision: str, packed, x: torch.Tensor, steps: int, *,
                       seed: int, start_step: int, origin: Tuple[int, int], every: Optional[int], seg: int,
                       owner=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A differentiable fused rollout of ``x [B, C, H, W]`` (``steps >= 1``): returns the final state
    (channels-last) and the states after every ``every``-th step stacked ``[steps // every, B, C, H, W]``
    (empty without ``every``); ``packed``: the fp32 step weights under autograd. Checkpointed in
    segments of ``seg`` steps (``seg >= steps``: nothing recomputed). With an ``owner`` (the model) on
    CUDA its launches run as CUDA graphs, captured at the first rollout of each shape and length."""
    plan = RolloutPlan(spec, cfg, precision, tuple(x.shape), x.dtype, x.device, int(steps),
                       max(1, min(int(seg), int(steps))), (int(origin[0]), int(origin[1])), every)
    owner = owner if owner is not None and owner not in _UNCAPTURABLE and use_graphs(x) else None
    B, C, H, W = plan.shape
    check_memory(rollout_bytes(plan) - (held_bytes(owner) if owner is not None else 0), x.device,
                 f"a differentiable {steps}-step rollout of {B}x{C}x{H}x{W} {str(x.dtype).replace('torch.', '')} "
                 f"states (checkpoint segments of {plan.seg} steps)")
    return _FusedRolloutFn.apply(plan, owner, int(seed), int(start_step), x, *packed)
