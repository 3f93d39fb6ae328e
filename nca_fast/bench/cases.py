"""Benchmark cases: the built-in default models, realistic states and the grid sizes to sweep."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from ..model import NCA
from ..spec import growing_spec, texture_spec

# Fixed seeds: the defaults must be the same NCA on every machine and in every run.
DEFAULT_MODELS = {
    "growing": lambda: NCA(growing_spec(name="growing"), init_seed=1),
    "texture": lambda: NCA(texture_spec(name="texture"), init_seed=2),
}
GPU_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
CPU_QUICK_SIZES = (64, 128, 256)  # with batch 1 only: the default run stays under two minutes on two cores
CPU_FULL_SIZES = (64, 128, 256, 512, 1024)
BATCH8_MAX_SIZE = 128  # batch 8 is also measured up to this size ("small sizes")


@dataclass(frozen=True)
class Case:
    """One benchmark case: a model (by name) on ``batch`` square grids of ``size``."""

    model: str
    size: int
    batch: int = 1

    @property
    def cells(self) -> int:
        return self.batch * self.size * self.size

    @property
    def label(self) -> str:
        return f"{self.model} {self.size}x{self.size} b{self.batch}"


def default_model(name: str) -> NCA:
    if name not in DEFAULT_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; known: {sorted(DEFAULT_MODELS)}")
    return DEFAULT_MODELS[name]()


def make_cases(models: Sequence[str], sizes: Sequence[int], batches: Sequence[int] = (1, 8),
               batch8_max: int = BATCH8_MAX_SIZE) -> List[Case]:
    """Every model x size at batch 1; batches > 1 only for sizes up to ``batch8_max``."""
    for s in sizes:
        if not isinstance(s, int) or s < 3:
            raise ValueError(f"grid sizes must be ints >= 3, got {s!r}")
    return [Case(m, s, b) for m in models for s in sorted(sizes) for b in batches
            if b == 1 or s <= batch8_max]


@torch.no_grad()
def realistic_state(model: NCA, batch: int, size: int, *, seed: int = 0, device=None,
                    dtype=torch.float32) -> torch.Tensor:
    """A fully alive, non-trivial state ``[B, C, H, W]`` (no backend gets an easy all-zero case).

    Smooth random fields (noise upsampled from an 8x coarser grid, so neighbours differ as in a
    grown pattern) in [-0.5, 0.5]; the alive channel, if any, in [0.3, 1] so every cell is alive.
    """
    spec = model.spec
    g = torch.Generator().manual_seed(seed)
    coarse = max(2, size // 8)
    noise = torch.rand(batch, spec.channels, coarse, coarse, generator=g)
    x = torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear",
                                        align_corners=False) - 0.5
    if spec.alive_channel is not None:
        a = spec.alive_channel
        x[:, a] = 0.3 + 0.7 * (x[:, a] + 0.5)
    if not torch.isfinite(x).all():
        raise RuntimeError("benchmark state is not finite")
    return x.to(device=device or model.w1.device, dtype=dtype)
