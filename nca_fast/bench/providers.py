"""Benchmark providers: the same NCA (same weights, same spec) run by different engines.

A provider turns ``(model, example state)`` into a :class:`Runner` whose ``step(x, k)`` is one
stochastic step number ``k`` as that engine's users would run it (update mask included), and whose
``check(x, mask)`` is one step with an explicit update mask, used to verify the provider against the
reference before it is timed.
"""
from __future__ import annotations

import copy
import importlib.util
import time
from typing import Dict

import torch

from .. import reference, rng
from ..kernels.config import step_problem
from ..model import NCA
from ..precision import FP32_PRECISIONS, TOLERANCE, relative_error
from . import cax_nca
from .cases import realistic_state
from .runner import Runner, device_sync

SEED = 0  # the seed of every timed stochastic step


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


def _device_precision(x: torch.Tensor) -> str:
    """The MLP precision of eager / compiled float32 PyTorch on ``x``'s device: cuDNN convolutions
    run TF32 on a GPU unless ``torch.backends.cudnn.allow_tf32`` is off."""
    return "tf32" if x.device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "ieee"


class BackendProvider(Provider):
    """``model.step(x, backend=name)``: the reference path (eager PyTorch) or the CPU fast path, with
    the mask from :func:`nca_fast.rng.update_mask`."""

    def __init__(self, name: str):
        self.name = name

    def unavailable(self, model, x):
        return "" if self.name != "cpu" or x.device.type == "cpu" else "the CPU fast path runs on a CPU only"

    def prepare(self, model, x):
        def step(x, k):
            return model.step(x, seed=SEED, step=k, backend=self.name)

        def check(x, mask):
            if mask is None:
                mask = torch.ones(x.shape[0], 1, *x.shape[2:], dtype=torch.bool, device=x.device)
            return model.step(x, update_mask=mask, backend=self.name)
        return Runner(step, check, sync=device_sync(x.device), precision=_device_precision(x))


def _allow_recompiles(n: int = 64) -> None:
    """Every model compiles its own graphs from the same two functions: past dynamo's per-function
    recompile limit (8) it would silently run them eagerly instead."""
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit"):  # (renamed in torch 2.7)
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * n)


def _philox_mask(cols, rows, images, step_t, threshold: int):
    r0 = rng.philox4x32(cols, rows, step_t, images, SEED)[0]
    return ((r0 >> 8) < threshold).unsqueeze(1)


class CompileProvider(Provider):
    """``torch.compile`` of the reference, as a user would compile it: the Philox mask and the step
    (with an explicit mask, which verify() checks), each compiled once per model and reused for every
    grid size (torch's default: a static graph for the first shape, then one with dynamic shapes).
    The step counter is a 0-d tensor, so a new step does not recompile. Compile time is reported
    apart from the step time."""

    def __init__(self):
        self._compiled = {}

    name = "compile"

    def unavailable(self, model, x):
        try:
            import torch._dynamo  # noqa: F401
        except ImportError as e:  # pragma: no cover
            return f"torch.compile unavailable: {e}"
        return ""

    def _functions(self, model):
        key = (model.spec.json, id(model))
        if key not in self._compiled:
            params, spec = _detached(model), model.spec
            _allow_recompiles()
            self._compiled[key] = (torch.compile(_philox_mask, dynamic=True),
                                   torch.compile(lambda x, m: reference.step(x, params, spec, m), dynamic=True))
        return self._compiled[key]

    def prepare(self, model, x):
        mask_fn, step_fn = self._functions(model)
        B, _, H, W = x.shape
        dev = x.device
        rows = torch.arange(H, device=dev, dtype=torch.int64).view(1, H, 1)
        cols = torch.arange(W, device=dev, dtype=torch.int64).view(1, 1, W)
        images = torch.arange(B, device=dev, dtype=torch.int64).view(B, 1, 1)
        threshold = rng.fire_threshold(model.spec.fire_rate)
        step_ts = {}

        def step(x, k):
            t = step_ts.get(k)
            if t is None:
                t = step_ts[k] = torch.tensor(k, dtype=torch.int64, device=dev)
            return step_fn(x, mask_fn(cols, rows, images, t, threshold))

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
        return Runner(step, check, compile_s=max(0.0, first - (time.perf_counter() - t0)), sync=sync,
                      precision=_device_precision(x))


class TritonProvider(Provider):
    """The fused Triton kernels as a rollout runs them: ``ROLLOUT_STEPS`` steps per call (one launch
    each, plus one finalize for alive models), captured in a CUDA graph on a GPU so that small grids
    are not timed as launch overhead. The copy of the input into the graph's static buffer is
    included. ``precision`` selects the state dtype and kernel: "tf32" / "ieee" (float32 state),
    "fp16", "bf16"."""

    ROLLOUT_STEPS = 8
    DTYPES = {"tf32": torch.float32, "ieee": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    def __init__(self, precision: str):
        self.precision, self.dtype = precision, self.DTYPES[precision]
        self.name = f"triton-{precision}"

    def unavailable(self, model, x):
        return step_problem(model.spec, x.to(self.dtype))

    def _model(self, model):
        if self.precision in FP32_PRECISIONS and model.fp32_matmul != self.precision:
            model = copy.copy(model)  # the same weights, another MLP precision
            model.fp32_matmul = self.precision
        return model

    def prepare(self, model, x):
        model = self._model(model)
        r = model.fused_rollout(x.shape, self.dtype, steps=self.ROLLOUT_STEPS)
        if x.device.type == "cuda":
            r.capture()
        # the interpreter computes every dot exactly: there the fused path is held to "ieee"
        precision = self.precision if x.device.type == "cuda" else "ieee" if self.dtype == torch.float32 \
            else self.precision

        def step(x, k):
            return r(x, seed=SEED, start_step=k * self.ROLLOUT_STEPS)

        def check(x, mask):
            if mask is None:
                mask = torch.ones(x.shape[0], 1, *x.shape[2:], dtype=torch.bool, device=x.device)
            return model.step(x, update_mask=mask, backend="triton")

        def verify_timed(S=self.ROLLOUT_STEPS):
            """The timed path itself (in-kernel masks, pending alive form, graph replay) over S steps."""
            xs = realistic_state(model, 1, 24, seed=5, device=x.device)
            small = model.fused_rollout(xs.shape, self.dtype, steps=S)
            got = small(xs.to(self.dtype), seed=SEED, start_step=S)
            want = copy.deepcopy(model).double().rollout(xs.double(), S, seed=SEED, start_step=S,
                                                         backend="reference")
            err = relative_error(got, want)
            tol = S * TOLERANCE[precision]
            if not err <= tol:
                raise AssertionError(f"{S}-step fused rollout differs from the reference by {err:.3g} "
                                     f"(tolerance {tol:g})")
            return err
        return Runner(step, check, dtype=self.dtype, sync=device_sync(x.device), precision=precision,
                      steps_per_call=self.ROLLOUT_STEPS, verify_timed=verify_timed,
                      notes=[f"{self.ROLLOUT_STEPS}-step fused rollouts" +
                             (" in a CUDA graph" if x.device.type == "cuda" else "")])


class CaxProvider(Provider):
    """The same NCA built with CAX (JAX); see :mod:`nca_fast.bench.cax_nca`."""

    name = "cax"

    def unavailable(self, model, x):
        missing = [m for m in ("jax", "cax", "flax") if importlib.util.find_spec(m) is None]
        if missing:  # (found by name only: importing JAX here would weigh on every provider's memory)
            return f'{"/".join(missing)} not installed: pip install "nca-fast[cax]"'
        return cax_nca.unsupported_reason(model.spec, x)

    def prepare(self, model, x):
        return cax_nca.cax_runner(model, x)


def all_providers() -> Dict[str, Provider]:
    ps = [BackendProvider("reference"), CompileProvider(), BackendProvider("cpu"),
          *(TritonProvider(p) for p in ("tf32", "fp16", "ieee", "bf16")), CaxProvider()]
    return {p.name: p for p in ps}


PROVIDER_NAMES = tuple(all_providers())
DEFAULT_GPU_PROVIDERS = ("reference", "compile", "triton-tf32", "triton-fp16", "cax")
DEFAULT_CPU_PROVIDERS = ("reference", "compile", "cpu", "cax")


# ---- equivalence ------------------------------------------------------------------------------
@torch.no_grad()
def verify(runner: Runner, model: NCA, x: torch.Tensor, *, seed: int = 123) -> float:
    """Max abs difference of one step against the reference, relative to the state's scale
    (:func:`nca_fast.precision.relative_error`; the reference runs in float64 up to 2**18 cells,
    above that in float32 to bound its memory).

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
    err = relative_error(got, want)
    del want, got
    tol = TOLERANCE[runner.precision]
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"differs from the reference by {err:.3g} (tolerance {tol:g})")
    return err
