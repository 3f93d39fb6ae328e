"""The sample pool and damage of Distill's *Growing NCA* training (experiments 2 and 3).

Each training iteration draws a batch from a pool of states, replaces its worst sample with the
seed (so that the model keeps learning to grow from scratch), damages its best samples (so that it
learns to regenerate), and writes the batch back after the rollout: states persist over many
iterations, which is what makes the pattern stable beyond the rollout length it was trained on.
"""
from __future__ import annotations

import torch


class SamplePool:
    """``n`` states ``[n, C, H, W]``, all the seed at first."""

    def __init__(self, seed_state: torch.Tensor, n: int):
        self.states = seed_state.expand(n, *seed_state.shape[1:]).clone()

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of ``batch`` distinct states, drawn uniformly (on the CPU, from ``generator``)."""
        return torch.randperm(len(self.states), generator=generator)[:batch].to(self.states.device)

    def commit(self, index: torch.Tensor, states: torch.Tensor) -> None:
        self.states[index] = states.detach()


def circle_masks(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, 1, H, W]`` bool: a disc of radius 0.1-0.4 around a centre within the middle half, in
    coordinates that run from -1 to 1 across the grid (Distill's ``make_circle_masks``)."""
    centre = torch.rand(2, n, 1, 1, generator=generator) - 0.5
    r = torch.rand(n, 1, 1, generator=generator) * 0.3 + 0.1
    yy = torch.linspace(-1.0, 1.0, height)[None, :, None]
    xx = torch.linspace(-1.0, 1.0, width)[None, None, :]
    return (((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) < r * r)[:, None]
