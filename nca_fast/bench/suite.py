"""The benchmark run: every case x provider, verified, timed, with the device's memory floor."""
from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from .._version import __version__
from ..kernels.config import bytes_per_cell_update
from ..model import NCA
from . import timing
from .cases import Case, realistic_state
from .providers import Provider, all_providers, verify


@dataclass
class Settings:
    """How long to measure. ``repeats`` fixes the number of timed steps (``min_time`` then 0)."""

    warmup: int = 1
    min_time: float = 0.25
    min_repeats: int = 3
    max_repeats: int = 200
    max_time: float = 10.0
    rotate: bool = True

    @classmethod
    def for_mode(cls, full: bool, repeats: Optional[int] = None) -> "Settings":
        s = cls(warmup=2, min_time=1.0, min_repeats=5, max_time=30.0) if full else cls()
        if repeats is not None:
            if repeats < 1:
                raise ValueError(f"--repeats must be >= 1, got {repeats}")
            s.min_repeats = s.max_repeats = repeats
            s.min_time = 0.0
        return s


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": affinity,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": sys.version.split()[0], "hostname": platform.node()}


def versions() -> dict:
    out = {"nca_fast": __version__, "torch": torch.__version__}
    for mod in ("triton", "numpy", "jax", "jaxlib", "cax", "flax"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001  (absent or broken: record as absent)
            out[mod] = None
    return out


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "memory_bytes": p.total_memory,
                "capability": f"{p.major}.{p.minor}", "l2_bytes": timing.cache_bytes(device)}
    return {"type": device.type, "name": machine_info()["cpu"] if device.type == "cpu" else str(device),
            "llc_bytes": timing.cache_bytes(device)}


def _trim_heap() -> None:
    """Return freed heap to the OS so that one provider's garbage is not the next one's peak RSS."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Result:
    model: str
    size: int
    batch: int
    provider: str
    status: str  # ok | skipped | rejected | error
    reason: str = ""
    cells: int = 0
    dtype: str = "float32"
    verify_error: Optional[float] = None
    compile_s: Optional[float] = None
    samples_s: List[float] = field(default_factory=list)
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    max_s: Optional[float] = None
    cells_per_s: Optional[float] = None
    speedup: Optional[float] = None
    floor_fraction: Optional[float] = None
    bytes_per_cell: Optional[int] = None
    peak_mem_bytes: Optional[int] = None
    peak_mem_how: str = ""
    base_mem_bytes: Optional[int] = None  # memory in use when the measurement started
    inputs_rotated: int = 1
    notes: List[str] = field(default_factory=list)


@torch.no_grad()
def run_one(case: Case, model: NCA, provider: Union[str, Provider], device: torch.device,
            settings: Settings, bandwidth: float, log: Callable[[str], None] = print) -> Result:
    """Verify, then time ``provider`` (a name or a :class:`Provider`) on ``case``; ``bandwidth``
    (bytes/s) gives the memory floor."""
    prov = all_providers()[provider] if isinstance(provider, str) else provider
    name = prov.name
    state_bytes = case.cells * model.spec.channels * 4
    n_inputs = timing.rotation_count(state_bytes, device) if settings.rotate else 1
    r = Result(case.model, case.size, case.batch, name, "ok", cells=case.cells,
               dtype=str(prov.dtype).replace("torch.", ""), inputs_rotated=n_inputs)
    x0 = realistic_state(model, case.batch, case.size, seed=0, device=device)
    reason = prov.unavailable(model, x0)
    if reason:
        r.status, r.reason = "skipped", reason
        return r
    try:
        runner = prov.prepare(model, x0)
    except Exception as e:  # noqa: BLE001  (one broken provider must not end the run)
        r.status, r.reason = "error", f"{type(e).__name__}: {e}"
        return r
    r.compile_s = runner.compile_s or None
    r.notes += runner.notes
    try:
        r.verify_error = verify(runner, model, x0)
        if runner.verify_timed is not None:
            r.verify_error = max(r.verify_error, runner.verify_timed())
    except AssertionError as e:
        r.status, r.reason = "rejected", f"not equivalent: {e}"
        log(f"  {name}: REJECTED ({e})")
        return r
    # One contiguous batch split into the rotated inputs (one generator call, not n_inputs).
    inputs = realistic_state(model, case.batch * n_inputs, case.size, seed=1, device=device,
                             dtype=runner.dtype).split(case.batch)
    del x0
    _trim_heap()
    try:
        with timing.PeakMemory(device) as mem:
            samples = timing.measure(lambda k: runner.step(inputs[k % n_inputs], k), device=device,
                                     sync=runner.sync, warmup=settings.warmup,
                                     min_time=settings.min_time, min_repeats=settings.min_repeats,
                                     max_repeats=settings.max_repeats, max_time=settings.max_time)
    except Exception as e:  # noqa: BLE001
        r.status, r.reason = "error", f"{type(e).__name__}: {e}"
        return r
    per_step = 1.0 / runner.steps_per_call  # every time below is per step
    r.samples_s = [t * per_step for t in samples.seconds]
    r.median_s, r.min_s, r.max_s = samples.median * per_step, samples.min * per_step, samples.max * per_step
    r.cells_per_s = case.cells / r.median_s
    r.bytes_per_cell = bytes_per_cell_update(model.spec, runner.dtype)
    r.floor_fraction = case.cells * r.bytes_per_cell / bandwidth / r.median_s
    r.peak_mem_bytes, r.peak_mem_how, r.base_mem_bytes = mem.bytes, mem.how, mem.base
    log(f"  {case.label:22s} {name:12s} {r.cells_per_s / 1e6:9.3f} M cell-updates/s "
        f"{r.median_s * 1e3:10.2f} ms/step")
    return r


def run(cases: Sequence[Case], models: Dict[str, NCA], providers: Sequence[str], device: torch.device,
        settings: Settings, log: Callable[[str], None] = print, argv: Optional[List[str]] = None) -> dict:
    """The whole benchmark; returns the JSON-ready report (machine, device, versions, every sample)."""
    unknown = [p for p in providers if p not in all_providers()]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; known: {list(all_providers())}")
    log(f"measuring {device} copy bandwidth ...")
    bandwidth = timing.copy_bandwidth(device)
    log(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    # Provider-major: a provider's imports (JAX, inductor) do not weigh on the others' peak memory.
    results: List[Result] = []
    for name in providers:
        log(f"{name}:")
        for case in cases:
            results.append(run_one(case, models[case.model].to(device), name, device, settings,
                                   bandwidth, log))
            _trim_heap()
    order = {c: i for i, c in enumerate(cases)}
    results.sort(key=lambda r: order[Case(r.model, r.size, r.batch)])  # stable: providers keep order
    for case in cases:
        rs = [r for r in results if Case(r.model, r.size, r.batch) == case and r.status == "ok"]
        ref = next((r for r in rs if r.provider == "reference"), None)
        for r in rs:
            r.speedup = None if ref is None else ref.median_s / r.median_s
    return {
        "nca_fast": __version__,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": argv,
        "machine": machine_info(),
        "device": dict(device_info(device), copy_bandwidth_bytes_per_s=bandwidth),
        "versions": versions(),
        "settings": asdict(settings),
        "models": {name: {"spec": m.spec.to_dict(), "flops_per_cell": m.spec.flops_per_cell()}
                   for name, m in models.items()},
        "providers": list(providers),
        "results": [asdict(r) for r in results],
    }
