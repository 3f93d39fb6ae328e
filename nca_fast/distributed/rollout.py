"""A rollout of one grid split into row blocks across the ranks of a ``torch.distributed`` group.

Each rank holds its block ``[B, C, rows, W]``. Every exchange round covers k steps: the rank posts
its top and bottom ``h = k * radius`` rows to the neighbouring ranks (non-blocking; circular padding
wraps from the last rank to the first), steps the block's interior — the rows that need no halo —
while they travel, then steps the two edge strips with the halos that arrived. Every cell is updated
with the mask drawn from its *global* coordinates (``nca_fast.rng``), so the result is the
single-device rollout's, bit for bit where the step itself is shape-independent (the CPU fast path;
the reference with one intra-op thread, whose 1x1 convolutions otherwise split their work by shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import rng
from ..model import NCA
from ..utils.checks import check_int
from .blocks import max_steps_per_exchange, row_blocks, step_radius, steps_per_exchange


@dataclass(frozen=True)
class Layout:
    """Where this rank's block lies: global ``height`` x ``width``, rows ``[r0, r1)``, and the ranks
    above and below it (None at a grid edge that is not wrapped)."""
    height: int
    width: int
    rank: int
    world: int
    r0: int
    r1: int
    up: Optional[int]
    down: Optional[int]

    @classmethod
    def make(cls, height: int, width: int, rank: int, world: int, circular: bool) -> "Layout":
        r0, r1 = row_blocks(height, world)[rank]
        up = (rank - 1) % world if (rank > 0 or circular) and world > 1 else None
        down = (rank + 1) % world if (rank < world - 1 or circular) and world > 1 else None
        return cls(height, width, rank, world, r0, r1, up, down)

    @property
    def rows(self) -> int:
        return self.r1 - self.r0


def _mask(model: NCA, segments: List[Tuple[int, int]], batch: int, width: int, seed: int, step: int,
          device) -> torch.Tensor:
    """The update mask of a strip made of global row ranges ``(first row, rows)``."""
    parts = [rng.update_mask(batch, n, width, seed=seed, step=step, fire_rate=model.spec.fire_rate,
                             origin=(g0, 0), device=device) for g0, n in segments]
    return torch.cat(parts, dim=2)


def _advance(model: NCA, strip: torch.Tensor, segments, steps: int, seed: int, start_step: int,
             backend: str) -> torch.Tensor:
    """``steps`` steps of a strip of rows (its outer rows go stale as they go: callers keep the inner ones)."""
    B, _, _, W = strip.shape
    for s in range(steps):
        mask = _mask(model, segments, B, W, seed, start_step + s, strip.device)
        strip = model.step(strip, update_mask=mask, backend=backend)
    return strip


def _exchange(block: torch.Tensor, lay: Layout, h: int, group) -> Tuple[list, Optional[torch.Tensor],
                                                                          Optional[torch.Tensor], list]:
    """Post the sends of this block's edge rows and the receives of the halos as one batch of
    point-to-point operations; returns (requests, top halo buffer, bottom halo buffer, the send
    buffers, to keep until the requests complete). One batch on NCCL, which runs a batch's sends and
    receives together, where ops issued one by one on two ranks that both send first would wait on
    each other; gloo posts them one by one.
    NCCL pairs two ranks' messages by order, not by tag, so the bottom edge is sent before the top
    edge and the top halo received before the bottom one: two ranks that are each other's up and down
    neighbour (2 ranks, circular) then pair them right (gloo checks the tags as well). Buffers are
    contiguous: gloo and NCCL take no others, and the fused path's blocks are channels-last."""
    sends, recvs, top, bot = [], [], None, None
    if lay.down is not None:
        sends.append((block[:, :, -h:].contiguous(), lay.down, 2))
    if lay.up is not None:
        sends.append((block[:, :, :h].contiguous(), lay.up, 1))
        top = torch.empty_like(block[:, :, :h], memory_format=torch.contiguous_format)
        recvs.append((top, lay.up, 2))
    if lay.down is not None:
        bot = torch.empty_like(block[:, :, -h:], memory_format=torch.contiguous_format)
        recvs.append((bot, lay.down, 1))
    ops = [dist.P2POp(dist.isend, t, peer, group=group, tag=tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group=group, tag=tag) for t, peer, tag in recvs]
    if dist.get_backend(group) == "nccl":
        works = dist.batch_isend_irecv(ops)
    else:  # (gloo: one by one, in the same order; a dead peer's error then reaches wait(), tested)
        works = [op.op(op.tensor, op.peer, op.group, op.tag) for op in ops]
    return works, top, bot, [t for t, _, _ in sends]


def sharded_rollout(model: NCA, block: torch.Tensor, lay: Layout, steps: int, *, seed: int = 0,
                    start_step: int = 0, backend: str = "cpu", steps_per_exchange_: Optional[int] = None,
                    group=None, stats: Optional[dict] = None) -> torch.Tensor:
    """``steps`` steps of this rank's ``block`` ``[B, C, lay.rows, lay.width]``; every rank of
    ``group`` calls it with its own block and the same arguments. Returns the new block.
    ``stats`` (a dict) receives the exchange rounds, rows and bytes sent by this rank, added to
    those it already holds (one dict over a run's segments counts them all)."""
    check_int("steps", steps, 0)
    if tuple(block.shape[2:]) != (lay.rows, lay.width):
        raise ValueError(f"rank {lay.rank}'s block must be [B, C, {lay.rows}, {lay.width}], got {tuple(block.shape)}")
    spec = model.spec
    radius = step_radius(spec)
    kmax = max_steps_per_exchange(spec, lay.height, lay.world)
    k = steps_per_exchange(spec, lay.width, lay.height, lay.world) if steps_per_exchange_ is None else \
        min(check_int("steps_per_exchange", steps_per_exchange_, 1), kmax)
    H, n = lay.height, lay.rows
    done, rounds, sent = 0, 0, 0
    with torch.no_grad():
        while done < steps:
            kk = min(k, steps - done)
            h = kk * radius
            t = start_step + done
            if lay.up is None and lay.down is None:  # one rank: the grid's own padding
                block = _advance(model, block, [(lay.r0, n)], kk, seed, t, backend)
                done += kk
                continue
            reqs, top, bot, outgoing = _exchange(block, lay, h, group)
            rounds += 1
            sent += len(outgoing) * h
            # The interior, while the halos travel: rows at least h from an edge that has a neighbour.
            lo, hi = (h if lay.up is not None else 0), (n - h if lay.down is not None else n)
            inner = _advance(model, block, [(lay.r0, n)], kk, seed, t, backend)[:, :, lo:hi]
            for r in reqs:
                r.wait()
            del outgoing
            parts = []
            if top is not None:  # halo (h) + the block's first 2h rows; rows [h, 2h) come out right
                strip = torch.cat([top, block[:, :, :2 * h]], dim=2)
                segs = [((lay.r0 - h) % H, h), (lay.r0, 2 * h)]
                parts.append(_advance(model, strip, segs, kk, seed, t, backend)[:, :, h:2 * h])
            parts.append(inner)
            if bot is not None:
                strip = torch.cat([block[:, :, n - 2 * h:], bot], dim=2)
                segs = [(lay.r0 + n - 2 * h, 2 * h), (lay.r1 % H, h)]
                parts.append(_advance(model, strip, segs, kk, seed, t, backend)[:, :, h:2 * h])
            block = torch.cat(parts, dim=2)
            done += kk
    if stats is not None:
        added = dict(rounds=rounds, halo_rows_sent=sent,
                     bytes_sent=sent * block.shape[0] * block.shape[1] * lay.width * block.element_size())
        stats.update({key: stats.get(key, 0) + v for key, v in added.items()}, steps_per_exchange=k)
    return block


def block_of(x: torch.Tensor, lay: Layout) -> torch.Tensor:
    """This rank's rows of a whole grid ``x`` (tests and small grids)."""
    return x[:, :, lay.r0:lay.r1].contiguous()


def seed_block(model: NCA, batch: int, lay: Layout, device=None, dtype=torch.float32) -> torch.Tensor:
    """This rank's rows of ``model.seed(batch, height, width)``, without building the whole grid."""
    x = torch.zeros(batch, model.spec.channels, lay.rows, lay.width, device=device, dtype=dtype)
    if model.spec.seed_kind == "center" and lay.r0 <= lay.height // 2 < lay.r1:
        first = 3 if model.spec.alive_channel is None else model.spec.alive_channel
        x[:, first:, lay.height // 2 - lay.r0, lay.width // 2] = 1.0
    return x
