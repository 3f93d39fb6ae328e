"""Benchmark providers: the same NCA (same weights, same spec) run by different engines.

A provider turns ``(model, example state)`` into a :class:`Runner` whose ``step(x, k)`` is one
stochastic step number ``k`` as that engine's users would run it (update mask included), and whose
``check(x, mask)`` is one step with an explicit update mask, used to verify the provider against the
reference before it is timed.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .. import cpu, ops, reference, rng
from ..model import NCA

SEED = 0  # the seed of every timed stochastic step


@dataclass
class Runner:
    """A prepared provider: ``step(x, k) -> y`` (stochastic), ``check(x, mask) -> y`` (explicit mask,
    ``mask`` None = every cell fires), and the state dtype it runs in."""

    step: Callable[[torch.Tensor, int], torch.Tensor]
    check: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
    dtype: torch.dtype = torch.float32
    compile_s: float = 0.0  # one-off compilation time, reported apart from the step time
    sync: Callable[[], None] = lambda: None
    check_needs_full_fire: bool = False  # True: check() only supports mask=None (fire_rate=1)
    notes: List[str] = field(default_factory=list)
    steps_per_call: int = 1  # step(x, k) runs this many steps (rollout providers)
    # For runners whose timed path differs from check(): compares it with the reference on a small
    # grid, returns the error, raises AssertionError above tolerance.
    verify_timed: Optional[Callable[[], float]] = None
    tolerance: Optional[float] = None  # of verify(); default: TOLERANCE of the dtype


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class Provider:
    """Base class: ``name``, ``unavailable(model, x)`` ('' when it can run) and ``prepare``."""

    name = "?"
    dtype = torch.float32

    def unavailable(self, model: NCA, x: torch.Tensor) -> str:
        return ""

    def prepare(self, model: NCA, x: torch.Tensor) -> Runner:
        raise NotImplementedError


def _detached(model: NCA, dtype=torch.float32) -> Dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.params(dtype).items()}


class ReferenceProvider(Provider):
    """The reference path (eager PyTorch), mask from :func:`nca_fast.rng.update_mask`."""

    name = "reference"

    def prepare(self, model, x):
        def step(x, k):
            return model.step(x, seed=SEED, step=k, backend="reference")

        def check(x, mask):
            return reference.step(x, _detached(model), model.spec, mask)
        return Runner(step, check, sync=device_sync(x.device))


class AutoProvider(Provider):
    """Whatever ``backend='auto'`` runs on this device (the CPU fast path on a CPU)."""

    name = "auto"

    def prepare(self, model, x):
        def step(x, k):
            return model.step(x, seed=SEED, step=k, backend="auto")

        def check(x, mask):
            if mask is None:
                mask = torch.ones(x.shape[0], 1, *x.shape[2:], dtype=torch.bool, device=x.device)
            return model.step(x, update_mask=mask, backend="auto")
        return Runner(step, check, sync=device_sync(x.device))


class CpuProvider(Provider):
    """The CPU fast path called directly: :func:`nca_fast.cpu.step` with :func:`nca_fast.rng.update_mask`."""

    name = "cpu"

    def unavailable(self, model, x):
        return "" if x.device.type == "cpu" else "the CPU fast path runs on a CPU only"

    def prepare(self, model, x):
        params, spec = _detached(model), model.spec
        B, _, H, W = x.shape

        def step(x, k):
            mask = rng.update_mask(B, H, W, seed=SEED, step=k, fire_rate=spec.fire_rate)
            return cpu.step(x, params, spec, mask)
        return Runner(step, lambda x, mask: cpu.step(x, params, spec, mask))


class CompileProvider(Provider):
    """``torch.compile`` of the reference: Philox mask + step in one compiled function."""

    name = "compile"

    def unavailable(self, model, x):
        try:
            import torch._dynamo  # noqa: F401
        except ImportError as e:  # pragma: no cover
            return f"torch.compile unavailable: {e}"
        return ""

    def prepare(self, model, x):
        params, spec = _detached(model), model.spec
        B, _, H, W = x.shape
        dev = x.device
        rows = torch.arange(H, device=dev, dtype=torch.int64).view(1, H, 1)
        cols = torch.arange(W, device=dev, dtype=torch.int64).view(1, 1, W)
        bidx = torch.arange(B, device=dev, dtype=torch.int64).view(B, 1, 1)
        threshold = rng.fire_threshold(spec.fire_rate)

        # Two compiled graphs: the Philox mask (the step counter is a 0-d tensor, so that a new
        # step does not recompile) and the step with an explicit mask (what verify() checks).
        def philox_mask(step_t):
            r0 = rng.philox4x32(cols, rows, step_t, bidx, SEED)[0]
            return ((r0 >> 8) < threshold).unsqueeze(1)

        mask_fn = torch.compile(philox_mask, dynamic=False)
        step_fn = torch.compile(lambda x, m: reference.step(x, params, spec, m), dynamic=False)
        step_ts = {}

        def step(x, k):
            t = step_ts.get(k)
            if t is None:
                t = step_ts[k] = torch.tensor(k, dtype=torch.int64, device=dev)
            return step_fn(x, mask_fn(t))

        def check(x, mask):
            if mask is None:
                mask = torch.ones(B, 1, H, W, dtype=torch.bool, device=dev)
            return step_fn(x, mask)

        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        step(x, 0)
        sync()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        step(x, 1)
        sync()
        return Runner(step, check, compile_s=max(0.0, first - (time.perf_counter() - t0)), sync=sync)


class TritonProvider(Provider):
    """The fused Triton kernels as a rollout runs them: ``ROLLOUT_STEPS`` steps per call (one launch
    each, plus one finalize for alive models), captured in a CUDA graph on a GPU so that small grids
    are not timed as launch overhead. The copy of the input into the graph's static buffer is
    included. The state dtype selects the kernel (float32 with a TF32 MLP, or float16)."""

    ROLLOUT_STEPS = 8

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.name = "triton-fp32" if dtype == torch.float32 else "triton-fp16"

    def unavailable(self, model, x):
        return ops.unavailable_reason(model, x.to(self.dtype))

    def prepare(self, model, x):
        # TF32 operands carry 10 mantissa bits: a float32 state's step is within ~1e-3, not 1e-4.
        tf32 = self.dtype == torch.float32 and model.fp32_matmul == "tf32" and x.device.type == "cuda"
        tolerance = 2e-3 if tf32 else TOLERANCE[self.dtype]
        r = ops.FusedRollout(model, x.shape, self.dtype, x.device, steps=self.ROLLOUT_STEPS)
        if x.device.type == "cuda":
            r.capture()

        def step(x, k):
            return r(x, seed=SEED, start_step=k * self.ROLLOUT_STEPS)

        def check(x, mask):
            if mask is None:
                mask = torch.ones(x.shape[0], 1, *x.shape[2:], dtype=torch.bool, device=x.device)
            return model.step(x, update_mask=mask, backend="triton")

        def verify_timed(S=self.ROLLOUT_STEPS):
            """The timed path itself (in-kernel masks, pending alive form, graph replay) over S steps."""
            from .cases import realistic_state

            xs = realistic_state(model, 1, 24, seed=5, device=x.device)
            small = ops.FusedRollout(model, xs.shape, self.dtype, x.device, steps=S)
            got = small(xs.to(self.dtype), seed=SEED, start_step=S).to(torch.float64)
            want = copy.deepcopy(model).double().rollout(xs.double(), S, seed=SEED, start_step=S,
                                                         backend="reference")
            err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
            tol = S * tolerance
            if not err <= tol:
                raise AssertionError(f"{S}-step fused rollout differs from the reference by {err:.3g} "
                                     f"(tolerance {tol:g})")
            return err
        return Runner(step, check, dtype=self.dtype, sync=device_sync(x.device), tolerance=tolerance,
                      steps_per_call=self.ROLLOUT_STEPS, verify_timed=verify_timed,
                      notes=[f"{self.ROLLOUT_STEPS}-step fused rollouts" +
                             (" in a CUDA graph" if x.device.type == "cuda" else "")])


class CaxProvider(Provider):
    """The same NCA built with CAX (JAX); see :mod:`nca_fast.bench.cax_nca`."""

    name = "cax"

    def unavailable(self, model, x):
        import importlib.util
        missing = [m for m in ("jax", "cax", "flax") if importlib.util.find_spec(m) is None]
        if missing:  # (found by name only: importing JAX here would weigh on every provider's memory)
            return f'{"/".join(missing)} not installed: pip install "nca-fast[cax]"'
        from .cax_nca import unsupported_reason
        return unsupported_reason(model.spec, x)

    def prepare(self, model, x):
        from .cax_nca import cax_runner
        return cax_runner(model, x)


def all_providers() -> Dict[str, Provider]:
    ps = [ReferenceProvider(), CompileProvider(), AutoProvider(), CpuProvider(),
          TritonProvider(torch.float32), TritonProvider(torch.float16), CaxProvider()]
    return {p.name: p for p in ps}


PROVIDER_NAMES = tuple(all_providers())


# ---- equivalence ------------------------------------------------------------------------------
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@torch.no_grad()
def verify(runner: Runner, model: NCA, x: torch.Tensor, *, seed: int = 123) -> float:
    """Max abs difference of one step against the reference, relative to the state's scale (the
    reference runs in float64 up to 2**18 cells, above that in float32 to bound its memory).

    The step uses an explicit random update mask (half the cells fire), or every cell firing for
    providers that only take ``fire_rate=1``. Raises ``AssertionError`` above the dtype's tolerance.
    """
    B, _, H, W = x.shape
    mask = None
    if not runner.check_needs_full_fire:
        mask = rng.update_mask(B, H, W, seed=seed, step=0, fire_rate=0.5, device=x.device)
    xr = x.to(runner.dtype)
    ref_dtype = torch.float64 if x.numel() // x.shape[1] <= 1 << 18 else torch.float32
    want = reference.step(xr.to(ref_dtype), _detached(model, ref_dtype), model.spec, mask)
    got = runner.check(xr, mask)
    runner.sync()
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"output shape {tuple(got.shape)}, reference {tuple(want.shape)}")
    err = (got.to(want.dtype) - want).abs().max().item() / max(1.0, want.abs().max().item())
    del want, got
    tol = runner.tolerance or TOLERANCE.get(runner.dtype, 1e-4)
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"differs from the reference by {err:.3g} (tolerance {tol:g})")
    return err
