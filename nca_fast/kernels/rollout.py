"""Fused rollouts: state buffers allocated once, one launch per step, CUDA-graph capturable.

A rollout holds two channels-last state buffers that ping-pong (step k writes ``bufs[k % 2]``) and,
for alive models, two mask-byte planes for the pending form (``step.py``): 2 states + 2 bytes a cell,
whatever the number of steps. Nothing else is state-sized: the input is converted to channels-last
into the buffer step 0 does not write (or read in place when it already is channels-last), and an
alive model's true state is finalized into the buffer its last step read, which is free by then. So a
frame costs one more launch (``finalize``) for alive models and no memory. The seed and the base step
live in a device tensor, so a captured graph replays with new values.
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
        self.graph = None
        self.head = head
        self.image = None
        if head is not None:
            c = head.config
            self.image = torch.empty(B, c.K, H * c.R, W * c.R, dtype=dtype, device=device)

    @property
    def x(self) -> torch.Tensor:
        """The static input of ``__call__`` and ``capture``: the buffer step 0 reads and step 1 writes."""
        return self.bufs[1]

    @property
    def out(self) -> torch.Tensor:
        """Where ``__call__`` leaves the final state: the last step's buffer, or for alive models the
        one finalize writes (the buffer the last step read)."""
        if self.steps == 0:
            return self.bufs[1]
        return self.bufs[self.steps % 2] if self.cfg.ALIVE else self.bufs[(self.steps - 1) % 2]

    def _head_args(self) -> dict:
        if self.head is None:
            return {}
        return dict(head=self.head.config, head_weights=self.head.weights, image=self.image)

    def launch(self, k: int, src, src_pre, frame: bool = False):
        """Step ``k`` of the rollout from ``src`` into ``bufs[k % 2]``; returns the buffers it wrote
        (pending form). ``frame``: decode this step's state (models without alive masks decode in
        this pass)."""
        dst, dst_pre = self.bufs[k % 2], self.pres[k % 2]
        head = self._head_args() if frame and not self.cfg.ALIVE else {}
        launch_step(self.cfg, self.spec, self.packed, src, src_pre, dst, dst_pre, self.ctr, step_offset=k,
                    origin=self.origin, fire_rate=self.spec.fire_rate, pending=k > 0, **head)
        return dst, dst_pre

    def materialise(self, k: int, src, src_pre) -> torch.Tensor:
        """The true state after step ``k`` (whose output is ``src``): ``src`` itself, or for alive
        models finalized into the other buffer (alive models: and its frame, if decoding). Step
        ``k + 1`` overwrites it."""
        if not self.cfg.ALIVE:
            return src
        dst = self.bufs[(k + 1) % 2]
        launch_finalize(self.cfg, self.spec, src, src_pre, dst, **self._head_args())
        return dst

    def _run(self):
        src, src_pre = self.x, None
        for k in range(self.steps):
            src, src_pre = self.launch(k, src, src_pre, frame=k == self.steps - 1)
        return self.materialise(self.steps - 1, src, src_pre) if self.steps else src

    def capture(self):
        """Record the launches in a CUDA graph (replayed by ``__call__``)."""
        if self.device.type != "cuda":
            raise RuntimeError("FusedRollout.capture needs a CUDA device")
        with torch.cuda.device(self.device):  # (streams and graphs belong to the current device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._run()  # warm-up: compiles the kernels outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._run()
        return self

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
        self.x.copy_(x)
        if self.graph is not None:
            with torch.cuda.device(self.device):  # (replays on the current device's stream)
                self.graph.replay()
            return self.out
        return self._run()


@torch.no_grad()
def fused_stream(r: FusedRollout, x: torch.Tensor, *, seed: int, start_step: int,
                 every: int) -> Iterator[Tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
    """Stream the rollout ``r`` from ``x``: ``(steps_done, state, image)`` after every ``every``-th
    step (one ``finalize`` per frame for alive models); the yielded tensors are reused."""
    r.set_counters(seed, start_step)
    if x.is_contiguous(memory_format=torch.channels_last):
        src = x  # read in place (step 0 writes bufs[0]; nothing writes x)
    else:
        src = r.x.copy_(x)  # channels-last once per rollout, into the buffer step 0 does not write
    src_pre = None
    for k in range(r.steps):
        frame = (k + 1) % every == 0
        src, src_pre = r.launch(k, src, src_pre, frame)
        if frame:
            yield k + 1, r.materialise(k, src, src_pre), r.image
