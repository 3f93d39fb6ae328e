"""Fused rollouts: state buffers allocated once, one launch per step, CUDA-graph capturable.

Two channels-last state buffers ping-pong and, for alive models, two mask-byte buffers hold the
pending form (``step.py``); a frame costs one more launch (``finalize``) for alive models. An input
is converted to channels-last once per rollout, not per step. The seed and the base step live in a
device tensor, so a captured graph replays with new values.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from .. import rng
from ..spec import NCASpec
from .config import step_config
from .launch import counter_tensor, launch_finalize, launch_step
from .pack import PackedHead


class FusedRollout:
    """Buffers and launches of a fused rollout of ``steps`` steps for states of one shape and dtype::

        r = model.fused_rollout(x.shape, x.dtype, steps=8)   # or FusedRollout(spec, packed, ...)
        r.capture()                       # CUDA only; optional
        y = r(x, seed=0, start_step=0)    # -> r.out (reused by the next call)

    ``packed``: the step weights packed for ``precision`` (``pack.pack_step``). With a pixel-shuffle
    ``head`` every frame is also decoded into ``r.image`` in the pass that produces the true state
    (the step itself, or finalize for alive models).
    """

    def __init__(self, spec: NCASpec, packed, shape, dtype: torch.dtype, device, steps: int, *,
                 precision: str, origin: Tuple[int, int] = (0, 0), head: Optional[PackedHead] = None):
        self.spec, self.packed, self.steps, self.origin = spec, packed, int(steps), origin
        self.cfg = step_config(spec, precision)
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.ctr = torch.zeros(2, dtype=torch.int64, device=device)
        self.bufs = [torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
                     for _ in range(2)]
        B, _, H, W = shape
        self.pres = ([torch.empty(B, H, W, dtype=torch.uint8, device=device) for _ in range(2)]
                     if self.cfg.ALIVE else [None, None])
        self.out = torch.empty_like(self.bufs[0]) if self.cfg.ALIVE else None
        self.x = None  # the static input of __call__ / capture, allocated on first use
        self.graph = None
        self.head = head
        self.image = None
        if head is not None:
            c = head.config
            self.image = torch.empty(B, c.K, H * c.R, W * c.R, dtype=dtype, device=device)

    def _head_args(self) -> dict:
        if self.head is None:
            return {}
        return dict(head=self.head.config, head_weights=self.head.weights, image=self.image)

    def launch(self, k: int, src, src_pre, frame: bool = False, dst=None):
        """Step ``k`` of the rollout from ``src`` into ``dst`` (default: a ping-pong buffer); returns
        the buffers it wrote (pending form). ``frame``: decode this step's state (models without
        alive masks decode in this pass)."""
        dst, dst_pre = (self.bufs[k % 2] if dst is None else dst), self.pres[k % 2]
        head = self._head_args() if frame and not self.cfg.ALIVE else {}
        launch_step(self.cfg, self.spec, self.packed, src, src_pre, dst, dst_pre, self.ctr, step_offset=k,
                    origin=self.origin, fire_rate=self.spec.fire_rate, pending=k > 0, **head)
        return dst, dst_pre

    def materialise(self, src, src_pre) -> torch.Tensor:
        """The true state of ``src`` in ``self.out`` (alive models: and its frame, if decoding)."""
        if self.cfg.ALIVE:
            launch_finalize(self.cfg, self.spec, src, src_pre, self.out, **self._head_args())
            return self.out
        if self.out is None:
            self.out = torch.empty_like(src)
        return self.out if src is self.out else self.out.copy_(src)

    def _run(self):
        if self.steps == 0:
            return self.out.copy_(self.x)
        src, src_pre = self.x, None
        for k in range(self.steps):
            last = k == self.steps - 1  # without alive masks the last step writes the result itself
            src, src_pre = self.launch(k, src, src_pre, frame=last,
                                       dst=self.out if last and not self.cfg.ALIVE else None)
        return self.materialise(src, src_pre)

    def capture(self):
        """Record the launches in a CUDA graph (replayed by ``__call__``)."""
        if self.device.type != "cuda":
            raise RuntimeError("FusedRollout.capture needs a CUDA device")
        self._static_input()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run()  # warm-up: compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._run()
        return self

    def _static_input(self):
        if self.x is None:
            self.x = torch.empty(self.shape, dtype=self.dtype, device=self.device, memory_format=torch.channels_last)
        if self.out is None:
            self.out = torch.empty_like(self.x)
        return self.x

    def set_counters(self, seed: int, start_step: int) -> None:
        rng.check_seed(seed)
        if isinstance(start_step, bool) or not isinstance(start_step, int) or \
                not 0 <= start_step <= 2**32 - max(self.steps, 1):
            raise ValueError(f"start_step must be an int with 0 <= start_step and start_step + steps <= 2**32, "
                             f"got {start_step!r}")
        self.ctr.copy_(counter_tensor(seed, start_step, "cpu"))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, *, seed: int, start_step: int = 0) -> torch.Tensor:
        if tuple(x.shape) != self.shape or x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"FusedRollout was built for {self.shape} {self.dtype} on {self.device}, "
                             f"got {tuple(x.shape)} {x.dtype} on {x.device}")
        self.set_counters(seed, start_step)
        self._static_input().copy_(x)
        if self.graph is not None:
            self.graph.replay()
            return self.out
        return self._run()


@torch.no_grad()
def fused_stream(r: FusedRollout, x: torch.Tensor, *, seed: int, start_step: int,
                 every: int) -> Iterator[Tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
    """Stream the rollout ``r`` from ``x``: ``(steps_done, state, image)`` after every ``every``-th
    step (one ``finalize`` per frame for alive models); the yielded tensors are reused."""
    r.set_counters(seed, start_step)
    src, src_pre = x.contiguous(memory_format=torch.channels_last), None  # once per rollout
    for k in range(r.steps):
        frame = (k + 1) % every == 0
        src, src_pre = r.launch(k, src, src_pre, frame)
        if frame:
            state = r.materialise(src, src_pre) if r.cfg.ALIVE else src
            yield k + 1, state, r.image
