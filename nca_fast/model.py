"""The NCA module: weights + spec, with seed / step / rollout / frames / to_rgb and backend dispatch."""
from __future__ import annotations

import logging
import math
import warnings
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import nn

from . import cpu, reference, rng
from .spec import NCASpec

log = logging.getLogger("nca_fast")

BACKENDS = ("auto", "reference", "triton")
STATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_logged_choices: set = set()


class NCA(nn.Module):
    """A neural cellular automaton: ``NCA(spec, weights=None)``.

    ``weights`` maps ``w1 [hidden, F*C]``, ``b1 [hidden]``, ``w2 [C, hidden]``, ``b2 [C]`` (biases only
    where the spec has them) to tensors; without it the weights are drawn from ``init_seed`` at a scale
    that keeps the state bounded (a non-trivial NCA for tests and benchmarks, not a trained one).
    """

    #: MLP precision of the fused kernels for float32 states: "tf32" (tensor cores) or "ieee" (full fp32).
    fp32_matmul: str = "tf32"

    def __init__(self, spec: NCASpec, weights: Optional[Mapping[str, torch.Tensor]] = None, *,
                 init_seed: int = 0):
        super().__init__()
        if not isinstance(spec, NCASpec):
            raise TypeError(f"spec must be an NCASpec, got {type(spec).__name__}")
        self.spec = spec
        shapes = spec.parameter_shapes()
        if weights is None:
            weights = random_weights(spec, init_seed)
        register_weights(self, shapes, weights, "weight")

    # ---- weights ------------------------------------------------------------------------------
    def params(self, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """The weights as a dict (``w1, b1, w2, b2``), optionally cast."""
        names = self.spec.parameter_shapes()
        return {n: (getattr(self, n) if dtype is None else getattr(self, n).to(dtype)) for n in names}

    def extra_repr(self) -> str:
        s = self.spec
        return (f"channels={s.channels}, filters={[f.name for f in s.filters]}, hidden={s.hidden}, "
                f"padding={s.padding!r}, alive={s.alive_channel}, fire_rate={s.fire_rate}")

    # ---- states -------------------------------------------------------------------------------
    def seed(self, batch: int = 1, height: int = 72, width: int = 72, device=None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The spec's seed state ``[B, C, H, W]``: zeros, plus one live centre cell for ``"center"``."""
        for what, v in (("batch", batch), ("height", height), ("width", width)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be a positive int, got {v!r}")
        device = self.w1.device if device is None else device
        x = torch.zeros(batch, self.spec.channels, height, width, device=device, dtype=dtype)
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

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """The image of a state, ``[B, 3, H, W]`` in [0, 1]."""
        self._check_state(x)
        s = self.spec
        if s.render == "rgba_premultiplied":
            rgb = 1 - x[:, 3:4].clamp(0, 1) + x[:, :3]
        else:
            rgb = x[:, :3] * s.render_scale + s.render_offset
        return rgb.clamp(0, 1)

    # ---- dynamics -----------------------------------------------------------------------------
    def step(self, x: torch.Tensor, *, seed: int = 0, step: int = 0,
             update_mask: Optional[torch.Tensor] = None, fire_rate: Optional[float] = None,
             origin: Tuple[int, int] = (0, 0), backend: str = "auto") -> torch.Tensor:
        """One step ``[B, C, H, W] -> [B, C, H, W]``.

        The update mask is drawn from ``(seed, step, batch index, global row, global column)``
        (see :mod:`nca_fast.rng`); ``origin`` is the (row, column) of ``x[..., 0, 0]`` in the global
        grid. ``update_mask`` (bool ``[B, 1, H, W]``) replaces the random mask; ``fire_rate``
        replaces the spec's.
        """
        self._check_state(x)
        fire_rate = self._check_step_args(x, seed, step, update_mask, fire_rate, origin)
        backend = self._resolve_backend(backend, x)
        if backend == "triton":
            from . import ops
            return ops.fused_step(self, x, seed=seed, step=step, update_mask=update_mask,
                                  fire_rate=fire_rate, origin=origin)
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
            return cpu.step(x, self.params(compute), self.spec, update_mask, out=out)
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
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self._check_step_args(x, seed, start_step, None, None, origin)
        if start_step + steps > 2**32:
            raise ValueError(f"step counters start_step + steps = {start_step + steps} exceed 2**32")
        backend = self._resolve_backend(backend, x)
        return self._frames(x, steps, seed, start_step, every, origin, backend)

    @torch.no_grad()
    def _frames(self, x, steps, seed, start_step, every, origin, backend):
        if backend == "triton":
            from . import ops
            yield from ops.fused_frames(self, x, steps, seed=seed, start_step=start_step,
                                        every=every, origin=origin)
            return
        spare = None  # the CPU fast path ping-pongs two buffers of ours (never the caller's x)
        for k in range(steps):
            y = self._reference_step(x, seed, start_step + k, None, self.spec.fire_rate, origin,
                                     backend, out=spare if backend == "cpu" else None)
            spare, x = (x if k > 0 else None), y
            if (k + 1) % every == 0:
                yield k + 1, x

    @torch.no_grad()
    def rollout(self, x: torch.Tensor, steps: int, *, seed: int = 0, start_step: int = 0,
                every: Optional[int] = None, origin: Tuple[int, int] = (0, 0),
                backend: str = "auto") -> torch.Tensor:
        """Run ``steps`` steps (step counters ``start_step ... start_step+steps-1``).

        Returns the final state ``[B, C, H, W]``, or with ``every=k`` the states after every k-th
        step stacked as ``[steps // k, B, C, H, W]``. For long renders use :meth:`frames`.
        """
        if every is None:  # one frame, at the end (the fused path materialises the state once)
            out = x
            for _, out in self.frames(x, steps, seed=seed, start_step=start_step, every=max(steps, 1),
                                      origin=origin, backend=backend):
                pass
            return out.clone() if out is x else out
        states = [s.clone() for _, s in self.frames(x, steps, seed=seed, start_step=start_step,
                                                     every=every, origin=origin, backend=backend)]
        if not states:
            return x.new_empty((0,) + tuple(x.shape))
        return torch.stack(states)

    # ---- checks and dispatch ------------------------------------------------------------------
    def _check_state(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"state must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"state must be [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.spec.channels:
            raise ValueError(f"state has {x.shape[1]} channels, the model has {self.spec.channels}")
        if x.dtype not in STATE_DTYPES:
            raise ValueError(f"state dtype {x.dtype} not supported; use one of {STATE_DTYPES}")
        if min(x.shape) < 1:
            raise ValueError(f"state has an empty dimension: {tuple(x.shape)}")
        if x.device != self.w1.device:
            raise ValueError(f"state is on {x.device} but the model is on {self.w1.device}")

    def _check_step_args(self, x, seed, step, update_mask, fire_rate, origin) -> float:
        rng.check_seed(seed)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**32:
            raise ValueError(f"step must be an int in [0, 2**32), got {step!r}")
        if len(origin) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in origin):
            raise ValueError(f"origin must be (row, col) ints, got {origin!r}")
        if update_mask is not None:
            B, _, H, W = x.shape
            if update_mask.dtype != torch.bool:
                raise ValueError(f"update_mask must be bool, got {update_mask.dtype}")
            if tuple(update_mask.shape) != (B, 1, H, W):
                raise ValueError(f"update_mask must be [B, 1, H, W] = {(B, 1, H, W)}, "
                                 f"got {tuple(update_mask.shape)}")
            if update_mask.device != x.device:
                raise ValueError(f"update_mask is on {update_mask.device}, state on {x.device}")
        fire_rate = self.spec.fire_rate if fire_rate is None else fire_rate
        rng.fire_threshold(fire_rate)  # validates the range
        return float(fire_rate)

    def _resolve_backend(self, backend: str, x: torch.Tensor) -> str:
        """'reference', 'cpu' (the CPU fast path) or 'triton' for a requested backend."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "reference":
            return backend
        from . import ops
        reason = ops.unavailable_reason(self, x)
        if backend == "triton":
            if reason:
                raise RuntimeError(f"backend='triton' cannot run here: {reason}")
            return "triton"
        # auto: fused kernels on CUDA; on a CPU the CPU fast path (float32) or the reference.
        if x.device.type != "cuda":
            fast = x.device.type == "cpu" and x.dtype == torch.float32
            choice, why = ("cpu" if fast else "reference"), f"state on {x.device.type}, {x.dtype}"
        elif reason:
            choice, why = "reference", reason
            if not torch.compiler.is_compiling():
                warnings.warn(f"nca_fast: falling back to the reference path: {reason}", RuntimeWarning)
        else:
            choice, why = "triton", "state on cuda"
        key = (choice, why)
        if key not in _logged_choices and not torch.compiler.is_compiling():
            _logged_choices.add(key)
            log.info("nca_fast backend='auto' chose %s (%s)", choice, why)
        return choice


def register_weights(module: nn.Module, shapes: Mapping[str, tuple], weights: Mapping, what: str) -> None:
    """Check ``weights`` against ``shapes`` (names, shapes, finite floats) before registering any of
    them, then register each as a float32 parameter of ``module``; errors name the ``what``."""
    missing, extra = set(shapes) - set(weights), set(weights) - set(shapes)
    if missing or extra:
        raise ValueError(f"{what}s: missing {sorted(missing)}, unexpected {sorted(extra)}; expected {dict(shapes)}")
    checked = {}
    for name, shape in shapes.items():
        w = torch.as_tensor(weights[name])
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"{what} {name!r} has shape {tuple(w.shape)}, spec needs {tuple(shape)}")
        if not w.is_floating_point() or not torch.isfinite(w).all():
            raise ValueError(f"{what} {name!r} must be finite floating point")
        checked[name] = w
    for name, w in checked.items():
        module.register_parameter(name, nn.Parameter(w.detach().to(torch.float32).clone()))


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
