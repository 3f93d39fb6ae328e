"""Measurement: repeated timed steps, the device's copy bandwidth and peak memory."""
from __future__ import annotations

import math
import os
import platform
import re
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class Samples:
    """Seconds per step, one sample per timed step."""

    seconds: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)


def cache_bytes(device: torch.device) -> int:
    """The last-level cache an input must not fit in (GPU L2, CPU L3), with a 32 MiB guess."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 << 20)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for idx in os.listdir(base) if os.path.isdir(base) else ():
        try:
            text = open(os.path.join(base, idx, "size")).read().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            best = max(best, int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)])
    return best or 32 << 20


def rotation_count(state_bytes: int, device: torch.device, cap_bytes: int = 1 << 30) -> int:
    """How many distinct inputs to rotate so that together they are twice the last-level cache."""
    n = math.ceil(2 * cache_bytes(device) / max(1, state_bytes))
    return max(1, min(n, 64, max(1, cap_bytes // max(1, state_bytes))))


def measure(step: Callable[[int], object], *, device: torch.device, sync: Callable[[], None],
            warmup: int = 2, min_time: float = 1.0, min_repeats: int = 3,
            max_repeats: int = 1000, max_time: float = 30.0) -> Samples:
    """Time ``step(k)`` (one step per call, k = 0, 1, ...) after ``warmup`` calls, until both
    ``min_time`` seconds and ``min_repeats`` samples are reached (or ``max_repeats``/``max_time``).

    On CUDA each sample is the interval between two CUDA events around the call.
    """
    for k in range(warmup):
        step(k)
    sync()
    seconds: List[float] = []
    start = time.perf_counter()
    k = warmup
    while True:
        if device.type == "cuda":
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
            step(k)
            ev1.record()
            ev1.synchronize()
            seconds.append(ev0.elapsed_time(ev1) / 1e3)
        else:
            t0 = time.perf_counter()
            step(k)
            sync()
            seconds.append(time.perf_counter() - t0)
        k += 1
        n, spent = len(seconds), time.perf_counter() - start
        if n >= max_repeats or (n >= min_repeats and (spent >= min_time or spent >= max_time)):
            return Samples(seconds)


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, repeats: int = 5) -> float:
    """Measured device-memory copy bandwidth in bytes/s (bytes read + bytes written per second)."""
    if nbytes is None:
        nbytes = max(4 * cache_bytes(device), (512 << 20) if device.type == "cuda" else (128 << 20))
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    samples = measure(lambda k: dst.copy_(src), device=device, sync=sync, warmup=2, min_time=0.2,
                      min_repeats=repeats, max_time=5.0)
    return 2 * src.numel() * 4 / samples.median


# ---- peak memory -------------------------------------------------------------------------------
def _proc_status(key: str = "VmHWM") -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory over a ``with`` block: the CUDA allocator's peak on a GPU, the process's peak
    resident set (reset through ``/proc/self/clear_refs`` on Linux) on a CPU. ``bytes`` is None when
    it cannot be measured; ``how`` says what was measured."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.how, self.base = device, None, "", None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.how = "cuda allocator peak"
        else:
            self.reset = False
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self.reset = True
                self.base = _proc_status("VmRSS")
                self.how = "process peak RSS"
            except OSError:
                self.how = "process peak RSS since start (could not reset)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status("VmHWM")
            if hwm is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
                r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                hwm = r if platform.system() == "Darwin" else r * 1024
            self.bytes = hwm
        return False
