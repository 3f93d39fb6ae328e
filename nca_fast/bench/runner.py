"""What a benchmark provider prepares: a :class:`Runner`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch


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
    precision: str = "ieee"  # its MLP's precision: selects the tolerance of verify()


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None
