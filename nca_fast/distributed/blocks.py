"""How a grid is split across ranks, how far a step reaches, and how often halos are exchanged.

The grid is split into row blocks (every rank holds whole rows, so columns pad as on one device).
One step of a cell reads its 3x3 neighbourhood; with alive masks it also reads the neighbours'
*updated* alpha, whose own neighbourhoods reach one row further: a step's radius is 1, or 2 with
alive masks. k steps reach k times as far, so a halo of k*radius rows, exchanged every k steps and
stepped redundantly, leaves each block exactly right after the k steps.
"""
from __future__ import annotations

import math
from typing import List, Tuple

from ..spec import NCASpec


def row_blocks(height: int, world: int) -> List[Tuple[int, int]]:
    """``world`` row ranges ``[r0, r1)`` covering ``height`` rows, sizes differing by at most one."""
    if world < 1 or height < world:
        raise ValueError(f"cannot split {height} rows across {world} ranks (each needs a row at least)")
    base, extra = divmod(height, world)
    out, r0 = [], 0
    for r in range(world):
        r1 = r0 + base + (1 if r < extra else 0)
        out.append((r0, r1))
        r0 = r1
    return out


def step_radius(spec: NCASpec) -> int:
    return 2 if spec.alive_channel is not None else 1


def max_steps_per_exchange(spec: NCASpec, height: int, world: int) -> int:
    """The most steps one exchange can cover: the halo (k * radius rows) must come from the adjacent
    rank alone, and the overlapped schedule steps each block's two edge strips of 2 * halo rows."""
    smallest = min(r1 - r0 for r0, r1 in row_blocks(height, world))
    return max(1, smallest // (2 * step_radius(spec)))


def steps_per_exchange(spec: NCASpec, width: int, height: int, world: int, *, latency_s: float = 50e-6,
                       seconds_per_cell: float = 2e-8) -> int:
    """k from a simple cost model: per exchange, one message latency against the redundant work of
    stepping the halos (about k^2 * radius * width cells over k steps); the k that minimises
    ``latency / k + radius * k * width * seconds_per_cell`` per step, within what the blocks allow."""
    r = step_radius(spec)
    k = max(1, round(math.sqrt(latency_s / (r * width * seconds_per_cell))))
    return min(k, max_steps_per_exchange(spec, height, world))
