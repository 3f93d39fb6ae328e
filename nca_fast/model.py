"""The NCA module: weights + spec, with seed / step / rollout / frames / to_rgb and backend dispatch."""
from __future__ import annotations

import math
from collections import deque
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.utils.checkpoint
from torch import nn

from . import backend as backends
from . import cpu, cpu_backward, reference, rng
from .kernels import config as kconfig
from .kernels import op as kop
from .kernels.pack import PackedHead, cached, forget_packed, pack_pixel_shuffle, pack_step
from .kernels.rollout import FusedRollout, fused_stream
from .kernels.rollout_grad import fused_rollout_grad, held_bytes
from .precision import check_fp32_precision, state_precision
from .spec import NCASpec
from .utils.checks import STATE_DTYPES, available_bytes, check_int, check_memory, check_state, register_weights

BACKENDS = backends.BACKENDS


class NCA(nn.Module):
    """A neural cellular automaton: ``NCA(spec, weights=None)``.

    ``weights`` maps ``w1 [hidden, F*C]``, ``b1 [hidden]``, ``w2 [C, hidden]``, ``b2 [C]`` (biases only
    where the spec has them) to tensors; without it the weights are drawn from ``init_seed`` at a scale
    that keeps the state bounded (a non-trivial NCA for tests and benchmarks, not a trained one).
    """

    #: MLP precision of the fused kernels for float32 states: "tf32" (tensor cores) or "ieee" (full fp32).
    fp32_matmul: str = "tf32"
    #: Raise FloatingPointError when a state given to or produced by step / frames / rollout has a NaN or
    #: an inf (each check reads the whole state). Otherwise NaN and inf spread as the published models'
    #: arithmetic spreads them, on every backend: to a cell's 3x3 neighbourhood each step.
    check_finite: bool = False
    #: On CUDA, run a differentiable fused rollout's launches as two CUDA graphs (its forward and its
    #: backward), captured at the first rollout of each state shape and length and kept, with their
    #: buffers, until a rollout of another shape replaces them (``kernels/rollout_grad.py``). False:
    #: launch each kernel.
    cuda_graphs: bool = True

    def __init__(self, spec: NCASpec, weights: Optional[Mapping[str, torch.Tensor]] = None, *,
                 init_seed: int = 0):
        super().__init__()
        if not isinstance(spec, NCASpec):
            raise TypeError(f"spec must be an NCASpec, got {type(spec).__name__}")
        self.spec = spec
        if weights is None:
            weights = random_weights(spec, init_seed)
        register_weights(self, spec.parameter_shapes(), weights, "weight")

    # ---- weights ------------------------------------------------------------------------------
    def params(self, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """The weights as a dict (``w1, b1, w2, b2``), optionally cast."""
        names = self.spec.parameter_shapes()
        return {n: (getattr(self, n) if dtype is None else getattr(self, n).to(dtype)) for n in names}

    def extra_repr(self) -> str:
        s = self.spec
        return (f"channels={s.channels}, filters={[f.name for f in s.filters]}, hidden={s.hidden}, "
                f"padding={s.padding!r}, alive={s.alive_channel}, fire_rate={s.fire_rate}")

    def precision(self, dtype: torch.dtype) -> str:
        """The MLP precision the fused kernels run a ``dtype`` state in."""
        return state_precision(dtype, check_fp32_precision(self.fp32_matmul))

    def packed_weights(self, dtype: torch.dtype, grad: bool = False):
        """The weights packed for the fused step of a ``dtype`` state: cached until they change, or
        with ``grad`` packed afresh under autograd, so that the fused backward reaches the parameters."""
        precision = kconfig.kernel_precision(self.precision(dtype))
        device = self.w1.device
        if grad:  # fp32 whatever the dot dtype: the gradients reach the parameters unrounded
            return pack_step(self.params(), self.spec, precision, device, torch.float32)
        return cached(self, ("step", precision, device), lambda: pack_step(self.params(), self.spec, precision, device))

    def forget_packed(self) -> None:
        """Drop the fused path's packed weights. Needed only after writing the weights through
        ``.data`` (unversioned by PyTorch, so the cache cannot see it); optimizers, ``load_state_dict``
        and in-place ops under ``torch.no_grad()`` are seen."""
        forget_packed(self)

    def fused_rollout(self, shape, dtype: torch.dtype, steps: int, *, origin: Tuple[int, int] = (0, 0),
                      decoder=None) -> FusedRollout:
        """A :class:`~nca_fast.kernels.rollout.FusedRollout` of ``steps`` steps for states of ``shape``
        and ``dtype`` on the model's device; a pixel-shuffle ``decoder`` decodes its frames in the
        pass that produces them."""
        head = None
        if decoder is not None:
            problem = kconfig.head_problem(decoder.spec, self.spec, shape)
            if problem:
                raise ValueError(problem)
            precision = kconfig.kernel_precision(self.precision(dtype))
            config = kconfig.head_config(decoder.spec, kconfig.pow2(self.spec.channels))
            device = self.w1.device
            weights = cached(decoder, ("head", precision, config, device),
                             lambda: pack_pixel_shuffle(decoder.spec, decoder.params(), config, precision, device))
            head = PackedHead(config, weights)
        return FusedRollout(self.spec, self.packed_weights(dtype), shape, dtype, self.w1.device, steps,
                            precision=self.precision(dtype), origin=origin, head=head)

    # ---- states -------------------------------------------------------------------------------
    def seed(self, batch: int = 1, height: int = 72, width: int = 72, device=None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The spec's seed state ``[B, C, H, W]``: zeros, plus one live centre cell for ``"center"``."""
        for what, v in (("batch", batch), ("height", height), ("width", width)):
            check_int(what, v, 1)
        if dtype not in STATE_DTYPES:
            raise ValueError(f"a state's dtype is one of {', '.join(str(d) for d in STATE_DTYPES)}, got {dtype}")
        device = self.w1.device if device is None else device
        C, elt = self.spec.channels, torch.empty((), dtype=dtype).element_size()
        what = f"a {batch}x{C}x{height}x{width} {str(dtype).replace('torch.', '')} state"
        check_memory(batch * C * height * width * elt, device, what, per_cell=batch * C * elt)
        x = torch.zeros(batch, C, height, width, device=device, dtype=dtype)
        if self.spec.seed_kind == "center":
            first = 3 if self.spec.alive_channel is None else self.spec.alive_channel
            x[:, first:, height // 2, width // 2] = 1.0
        return x

    def to_rgba(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 4, H, W]`` in [0, 1]: the RGB image composited on white (as :meth:`to_rgb`) and the
        clipped alpha."""
        self._check_state(x)
        if not self.spec.has_alpha:
            raise ValueError(f"to_rgba: render {self.spec.render!r} has no alpha channel; use to_rgb")
        a = x[:, 3:4].clamp(0, 1)
        return torch.cat([(1 - a + x[:, :3]).clamp(0, 1), a], 1)

    def to_rgb(self, x: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """The image of a state, ``[B, 3, H, W]`` in [0, 1] (``clamp=False``: not clipped, so that a
        loss on it keeps its gradient where the image saturates, as Distill's texture training)."""
        self._check_state(x)
        s = self.spec
        if s.render == "rgba_premultiplied":
            rgb = 1 - x[:, 3:4].clamp(0, 1) + x[:, :3]
        else:
            rgb = x[:, :3] * s.render_scale + s.render_offset
        return rgb.clamp(0, 1) if clamp else rgb

    # ---- dynamics -----------------------------------------------------------------------------
    def step(self, x: torch.Tensor, *, seed: int = 0, step: int = 0,
             update_mask: Optional[torch.Tensor] = None, fire_rate: Optional[float] = None,
             origin: Tuple[int, int] = (0, 0), backend: str = "auto") -> torch.Tensor:
        """One step ``[B, C, H, W] -> [B, C, H, W]``.

        The update mask is drawn from ``(seed, step, batch index, global row, global column)``
        (see :mod:`nca_fast.rng`); ``origin`` is the (row, column) of ``x[..., 0, 0]`` in the global
        grid. ``update_mask`` (bool ``[B, 1, H, W]``) replaces the random mask; ``fire_rate``
        replaces the spec's. Differentiable on every path (the CPU fast path's backward recomputes the
        step from its input: ``cpu_backward.py``; ``"auto"`` on a CPU takes the reference's, faster).
        """
        self._check_state(x)
        fire_rate = self._check_step_args(x, seed, step, update_mask, fire_rate, origin)
        needs_grad = self._needs_grad(x)
        backend = self._choose(backend, x, needs_grad)
        self._check_finite(x, "the input state")
        y = self._step(x, seed, step, update_mask, fire_rate, origin, backend,
                       self.packed_weights(x.dtype, needs_grad) if backend == "triton" else None)
        self._check_finite(y, f"the state after step {step}")
        return y

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _step(self, x, seed, step, update_mask, fire_rate, origin, backend, packed):
        """One step on a chosen backend (``packed``: the fused path's weights)."""
        if backend == "triton":
            return kop.fused_step(self.spec, packed, x, seed=seed, step=step, update_mask=update_mask,
                                  fire_rate=fire_rate, origin=origin, precision=self.precision(x.dtype))
        return self._reference_step(x, seed, step, update_mask, fire_rate, origin, backend)

    def _reference_step(self, x, seed, step, update_mask, fire_rate, origin, backend="reference",
                        out=None):
        """The reference step (``backend='cpu'``: the CPU fast path, tested against it, which can
        write into ``out``, a float32 buffer like ``x``)."""
        B, _, H, W = x.shape
        if update_mask is None:
            update_mask = rng.update_mask(B, H, W, seed=seed, step=step, fire_rate=fire_rate,
                                          origin=origin, device=x.device)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        if backend == "cpu":
            return cpu_backward.step(x, self.params(compute), self.spec, update_mask, out=out)
        y = reference.step(x.to(compute), self.params(compute), self.spec, update_mask)
        return y.to(x.dtype)

    def frames(self, x: torch.Tensor, steps: int, *, seed: int = 0, start_step: int = 0,
               every: int = 1, origin: Tuple[int, int] = (0, 0),
               backend: str = "auto") -> Iterator[Tuple[int, torch.Tensor]]:
        """Stream ``(steps_done, state)`` after every ``every``-th step, holding one state at a time.

        The yielded tensor may be reused by the next step: copy it to keep it. Arguments are checked
        at the call; the stream runs without autograd (``step`` on the reference backend is
        differentiable, for training).
        """
        self._check_state(x)
        check_int("steps", steps, 0)
        check_int("every", every, 1)
        self._check_step_args(x, seed, start_step, None, None, origin)
        if start_step + steps > 2**32:
            raise ValueError(f"step counters start_step + steps = {start_step + steps} exceed 2**32")
        backend = self._choose(backend, x, needs_grad=False)
        B, C, H, W = x.shape
        check_memory(B * H * W * self.rollout_bytes_per_cell(x.dtype, backend), x.device,
                     f"a rollout of {B}x{C}x{H}x{W} {str(x.dtype).replace('torch.', '')} states on the {backend} path",
                     per_cell=B * self.rollout_bytes_per_cell(x.dtype, backend))
        self._check_finite(x, "the input state")
        return self._frames(x, steps, seed, start_step, every, origin, backend)

    @torch.no_grad()
    def _frames(self, x, steps, seed, start_step, every, origin, backend):
        if steps == 0:
            return
        if backend == "triton":
            r = self.fused_rollout(x.shape, x.dtype, steps, origin=origin)
            for k, state, _ in fused_stream(r, x, seed=seed, start_step=start_step, every=every):
                self._check_finite(state, f"the state after step {start_step + k - 1}")
                yield k, state
            return
        spare = None  # the CPU fast path ping-pongs two buffers of ours (never the caller's x)
        for k in range(steps):
            y = self._reference_step(x, seed, start_step + k, None, self.spec.fire_rate, origin,
                                     backend, out=spare if backend == "cpu" else None)
            spare, x = (x if k > 0 else None), y
            if (k + 1) % every == 0:
                self._check_finite(x, f"the state after step {start_step + k}")
                yield k + 1, x

    def rollout_bytes_per_cell(self, dtype: torch.dtype, backend: str) -> int:
        """Memory a rollout needs per grid cell beyond its input state: the fused path two states (its
        ping-pong buffers; the result is one of them) and, for alive models, two mask bytes, whatever
        the number of steps; the CPU path three states; the reference its intermediates (perception,
        hidden, update) in float32 (float64 for a float64 state)."""
        s = self.spec
        state = s.channels * torch.empty((), dtype=dtype).element_size()
        if backend == "triton":
            return 2 * state + (2 if s.alive_channel is not None else 0)
        if backend == "cpu":
            return 3 * state + 2
        compute = 8 if dtype == torch.float64 else 4
        return state + compute * (2 * s.perception_size + 2 * s.hidden + 4 * s.channels) + 1

    def rollout(self, x: torch.Tensor, steps: int, *, seed: int = 0, start_step: int = 0,
                every: Optional[int] = None, origin: Tuple[int, int] = (0, 0),
                backend: str = "auto", checkpoint_every: Optional[int] = None) -> torch.Tensor:
        """Run ``steps`` steps (step counters ``start_step ... start_step+steps-1``).

        Returns the final state ``[B, C, H, W]``, or with ``every=k`` the states after every k-th
        step stacked as ``[steps // k, B, C, H, W]``. For long renders use :meth:`frames`.

        Differentiable when autograd records it (grad enabled, ``x`` or a weight requiring grad), on
        every path. The fused path runs the rollout as one autograd node (``kernels/rollout_grad.py``)
        that saves only each step's input state and alive bytes; the CPU fast path saves each step's
        input state, update mask and alive mask (both backwards recompute perception and hidden). With
        ``checkpoint_every=k`` steps run in segments of k whose inner states are recomputed in the
        backward, so memory grows with the number of segments plus one segment's states. The default
        (None) keeps the whole graph when it takes under a quarter of the free memory (no
        recomputation; always under ``torch.compile``, which traces the fused path's op step by step)
        and segments of about sqrt(steps) otherwise.
        """
        self._check_state(x)
        if every is not None:  # the states it returns, before any step runs
            kept = check_int("steps", steps, 0) // check_int("every", every, 1)
            B, C, H, W = x.shape
            per_cell = B * C * x.element_size() * kept
            check_memory(H * W * per_cell, x.device, f"the {kept} states kept by every={every}", per_cell=per_cell)
        if self._needs_grad(x):
            return self._rollout_grad(x, steps, seed, start_step, every, origin, backend, checkpoint_every)
        with torch.no_grad():
            return self._rollout(x, steps, seed, start_step, every, origin, backend)

    def _rollout(self, x, steps, seed, start_step, every, origin, backend):
        if every is None:  # one frame, at the end (the fused path materialises the state once)
            last = deque(self.frames(x, steps, seed=seed, start_step=start_step, every=max(steps, 1),
                                     origin=origin, backend=backend), maxlen=1)
            return last[0][1] if last else x.clone()
        states = [s.clone() for _, s in self.frames(x, steps, seed=seed, start_step=start_step,
                                                     every=every, origin=origin, backend=backend)]
        if not states:
            return x.new_empty((0,) + tuple(x.shape))
        return torch.stack(states)

    def _rollout_grad(self, x, steps, seed, start_step, every, origin, backend, checkpoint_every):
        self._check_state(x)
        check_int("steps", steps, 0)
        if every is not None:
            check_int("every", every, 1)
        self._check_step_args(x, seed, start_step, None, None, origin)
        if start_step + steps > 2**32:
            raise ValueError(f"step counters start_step + steps = {start_step + steps} exceed 2**32")
        fits = (backend != "auto" or x.device.type != "cpu" or torch.compiler.is_compiling()
                or self._graph_fits(x, steps, "reference"))
        backend = self._choose(backend, x, needs_grad=True, graph_fits=fits)
        cfg = kconfig.step_config(self.spec, self.precision(x.dtype)) if backend == "triton" else None
        if cfg is not None:  # (before any step runs, not in the backward)
            kop.check_backward_size(cfg, x.shape[2], x.shape[3])
        if checkpoint_every is not None:
            seg = check_int("checkpoint_every", checkpoint_every, 1)
        elif torch.compiler.is_compiling():  # (no free-memory query in a traced graph: the whole graph)
            seg = steps
        else:
            seg = steps if self._graph_fits(x, steps, backend) else max(1, math.isqrt(max(steps, 1)))
        self._check_finite(x, "the input state")
        fused = cfg is not None and steps > 0 and not cfg.backward_problem() and not torch.compiler.is_compiling()
        if not fused and not torch.compiler.is_compiling():  # (the fused node checks its own)
            self._check_graph_memory(x, steps, seg, every, backend)
        packed = self.packed_weights(x.dtype, grad=True) if backend == "triton" else None
        # the whole rollout as one autograd node; traced by torch.compile, the op step by step
        if fused:
            out, kept = fused_rollout_grad(self.spec, cfg, self.precision(x.dtype), packed, x, steps, seed=seed,
                                           start_step=start_step, origin=origin, every=every, seg=seg,
                                           owner=self if self.cuda_graphs else None)
            self._check_finite(out, f"the state after step {start_step + steps - 1}")
            return out if every is None else kept
        fire_rate = self.spec.fire_rate

        def segment(k0: int, n: int, state: torch.Tensor, *_weights):
            """Steps k0 .. k0+n-1; returns the states wanted by ``every`` in it, then the last."""
            kept = []
            for k in range(k0, k0 + n):
                state = self._step(state, seed, start_step + k, None, fire_rate, origin, backend, packed)
                if every is not None and (k + 1) % every == 0:
                    kept.append(state)
            return (*kept, state)

        weights = tuple(packed) if packed is not None else tuple(self.parameters())
        states, k = [], 0
        while k < steps:
            n = min(seg, steps - k)
            if n == steps:  # one segment: nothing to recompute
                out = segment(k, n, x)
            else:
                out = torch.utils.checkpoint.checkpoint(segment, k, n, x, *weights, use_reentrant=False,
                                                        preserve_rng_state=False)
            states += out[:-1]
            x, k = out[-1], k + n
        self._check_finite(x, f"the state after step {start_step + steps - 1}")
        if every is None:
            return x if steps else x.clone()
        return torch.stack(states) if states else x.new_empty((0,) + tuple(x.shape))

    def graph_bytes_per_cell(self, dtype: torch.dtype, backend: str) -> int:
        """What autograd saves per cell and step of a differentiable rollout: the fused step its input
        state and alive byte, the CPU fast path its input state and two mask bytes; the reference its
        intermediates (as in :meth:`rollout_bytes_per_cell`)."""
        if backend in ("triton", "cpu"):
            return self.spec.channels * torch.empty((), dtype=dtype).element_size() + (1 if backend == "triton" else 2)
        return self.rollout_bytes_per_cell(dtype, "reference")

    def _check_graph_memory(self, x: torch.Tensor, steps: int, seg: int, every: Optional[int], backend: str) -> None:
        """Refuse, before any step runs, a differentiable rollout whose graph cannot fit: a checkpoint
        state per segment, the states ``every`` keeps and one segment's graph live at once."""
        B, C, H, W = x.shape
        n_seg = -(-steps // seg) if seg < steps else 0
        kept = steps // every if every else 0
        per_cell = B * ((n_seg + kept) * C * x.element_size()
                        + min(seg, steps) * self.graph_bytes_per_cell(x.dtype, backend))
        check_memory(H * W * per_cell, x.device,
                     f"a differentiable {steps}-step rollout of {B}x{C}x{H}x{W} {str(x.dtype).replace('torch.', '')} "
                     f"states ({backend}; checkpoint segments of {min(seg, steps)} steps)", per_cell=per_cell)

    def _graph_fits(self, x: torch.Tensor, steps: int, backend: str) -> bool:
        free = available_bytes(x.device)
        if free is not None and backend == "triton":  # (the buffers of this model's captured rollout, if any)
            free += held_bytes(self)
        need = steps * x.shape[0] * x.shape[2] * x.shape[3] * self.graph_bytes_per_cell(x.dtype, backend)
        return free is not None and need <= free // 4

    # ---- checks and dispatch ------------------------------------------------------------------
    def _check_state(self, x):
        check_state(x, self.spec.channels, self.w1.device, "model")

    def _check_finite(self, x: torch.Tensor, what: str) -> None:
        if self.check_finite and not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            n = int((~torch.isfinite(x)).sum())
            raise FloatingPointError(f"{what} has {n} non-finite values (the first at batch {bad[0]}, "
                                     f"channel {bad[1]}, row {bad[2]}, column {bad[3]})")

    def _check_step_args(self, x, seed, step, update_mask, fire_rate, origin) -> float:
        rng.check_seed(seed)
        check_int("step", step, 0, 2**32 - 1)
        if len(origin) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in origin):
            raise ValueError(f"origin must be (row, col) ints, got {origin!r}")
        if update_mask is not None:
            B, _, H, W = x.shape
            if not isinstance(update_mask, torch.Tensor) or update_mask.dtype != torch.bool:
                raise ValueError(f"update_mask must be bool, got {getattr(update_mask, 'dtype', type(update_mask))}")
            if tuple(update_mask.shape) != (B, 1, H, W):
                raise ValueError(f"update_mask must be [B, 1, H, W] = {(B, 1, H, W)}, "
                                 f"got {tuple(update_mask.shape)}")
            if update_mask.device != x.device:
                raise ValueError(f"update_mask is on {update_mask.device}, state on {x.device}")
        fire_rate = self.spec.fire_rate if fire_rate is None else fire_rate
        rng.fire_threshold(fire_rate)  # validates the range
        return float(fire_rate)

    def _choose(self, backend: str, x: torch.Tensor, needs_grad: bool, graph_fits: bool = True) -> str:
        """'reference', 'cpu' (the CPU fast path) or 'triton' for a requested backend (``graph_fits``:
        the reference's autograd graph of the call fits in memory)."""
        backends.check_backend(backend)
        problem = "" if backend in ("reference", "cpu") else kconfig.step_problem(self.spec, x)
        cpu_path = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        return backends.choose(backend, x, fused_problem=problem, cpu_path=cpu_path,
                               cpu_preferred=cpu.is_faster(x), needs_grad=needs_grad, graph_fits=graph_fits,
                               what="step")


def random_weights(spec: NCASpec, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Deterministic random weights that keep rollouts bounded (for tests, defaults and benchmarks).

    ``w1`` ~ N(0, 1/fan_in), ``w2`` ~ N(0, (0.1)^2 / hidden), biases small: updates of order 0.1.
    """
    g = torch.Generator().manual_seed(seed)
    fan_in = spec.perception_size
    w = {"w1": torch.randn(spec.hidden, fan_in, generator=g) / math.sqrt(fan_in),
         "w2": torch.randn(spec.channels, spec.hidden, generator=g) * (0.1 / math.sqrt(spec.hidden))}
    if spec.hidden_bias:
        w["b1"] = torch.randn(spec.hidden, generator=g) * 0.1
    if spec.update_bias:
        w["b2"] = torch.randn(spec.channels, generator=g) * 0.01
    return w
