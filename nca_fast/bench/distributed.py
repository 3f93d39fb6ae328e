"""``nca-fast bench --distributed``: sharded rollouts on CPU ranks (gloo processes on this machine).

Strong scaling: one grid on 1, 2, ... ranks. Weak scaling: the same rows per rank, so the grid grows
with the ranks. Each row: wall time of the rollout (the slowest rank), cell-updates/s, parallel
efficiency against one rank, the steps per exchange the cost model chose, and the halo bytes one rank
sends per step. Every rank uses one intra-op thread, so that ranks, not threads, are what scales.
"""
from __future__ import annotations

import datetime
import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..distributed import Layout, seed_block, sharded_rollout
from ..model import NCA, random_weights
from ..spec import NCASpec


def _worker(rank: int, world: int, tmp: str, spec_json: str, H: int, W: int, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    spec = NCASpec.from_json(spec_json)
    model = NCA(spec, random_weights(spec, 0)).requires_grad_(False)
    lay = Layout.make(H, W, rank, world, spec.padding == "circular")
    x = seed_block(model, 1, lay) + 0.1 * torch.rand(1, spec.channels, lay.rows, W, generator=torch.Generator()
                                                     .manual_seed(rank))
    stats: dict = {}
    sharded_rollout(model, x, lay, 2, backend="cpu")  # warm-up
    dist.barrier()
    t = time.perf_counter()
    sharded_rollout(model, x, lay, steps, backend="cpu", stats=stats)
    dist.barrier()
    stats["seconds"] = time.perf_counter() - t
    Path(f"{tmp}/rank{rank}.json").write_text(json.dumps(stats))
    dist.destroy_process_group()


def _run(spec: NCASpec, world: int, H: int, W: int, steps: int) -> Dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, tmp, spec.to_json(), H, W, steps), nprocs=world)
        ranks = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(world)]
    seconds = max(r["seconds"] for r in ranks)
    return {"ranks": world, "grid": f"{H}x{W}", "seconds": seconds, "cell_updates_per_s": H * W * steps / seconds,
            "steps_per_exchange": ranks[0]["steps_per_exchange"],
            "halo_bytes_per_step_per_rank": max(r["bytes_sent"] for r in ranks) / steps}


def run_distributed(spec: NCASpec, ranks: Sequence[int] = (1, 2), *, size: int = 256, steps: int = 16,
                    log: Callable[[str], None] = print) -> Dict[str, List[dict]]:
    """Strong and weak scaling rows (see the module docstring)."""
    out: Dict[str, List[dict]] = {"strong": [], "weak": []}
    for kind in ("strong", "weak"):
        for n in ranks:
            H = size if kind == "strong" else size * n
            row = _run(spec, n, H, size, steps)
            base = out[kind][0] if out[kind] else row
            row["efficiency"] = (row["cell_updates_per_s"] / n) / (base["cell_updates_per_s"] / base["ranks"])
            out[kind].append(row)
            log(f"distributed {kind} {row['grid']} on {n} ranks: {row['seconds']:.3f} s, "
                f"{row['cell_updates_per_s'] / 1e6:.2f} M cell-updates/s, efficiency {row['efficiency']:.2f}")
    return out


def distributed_table(report: Dict[str, List[dict]]) -> str:
    lines = ["| scaling | ranks | grid | s | M cell-updates/s | efficiency | k | halo bytes / step / rank |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, rows in report.items():
        for r in rows:
            lines.append(f"| {kind} | {r['ranks']} | {r['grid']} | {r['seconds']:.3f} | "
                         f"{r['cell_updates_per_s'] / 1e6:.2f} | {r['efficiency']:.2f} | {r['steps_per_exchange']} | "
                         f"{r['halo_bytes_per_step_per_rank']:.0f} |")
    return "\n".join(lines) + "\n"
