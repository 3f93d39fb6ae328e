"""Sharded states: one safetensors file per rank (its rows) and an ``index.json`` that says which rows
each file holds, at which step, for which model. A rank loads only the rows it needs, so a rollout can
restart on another number of ranks; nothing is ever gathered on one rank. Files are written atomically
and the index last (by rank 0, after every shard is written), so a crash leaves the previous
checkpoint readable."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.distributed as dist

from ..utils import weights_file
from ..utils.files import InputFileError, atomic_write_bytes, open_input, read_input
from ..utils.optional import optional_import
from .rollout import Layout

INDEX = "index.json"
MAX_SHARD_BYTES = 64 << 30


def _shard_name(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def remove_stale(folder, prefix: str, suffix: str, world: int) -> None:
    """Delete ``prefix<rank>suffix`` files of ranks >= ``world``: what a run on more ranks left in
    ``folder`` (a rerun on fewer would otherwise leave them beside its own)."""
    for path in Path(folder).glob(f"{prefix}*{suffix}"):
        digits = path.name[len(prefix):len(path.name) - len(suffix)]
        if digits.isdigit() and int(digits) >= world:
            path.unlink(missing_ok=True)


def save_shards(folder, block: torch.Tensor, lay: Layout, meta: Dict[str, object], group=None) -> None:
    """Every rank writes its block; rank 0 then writes the index (``meta`` plus the rows of each file)."""
    st = optional_import("safetensors.torch", "formats")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / _shard_name(lay.rank), st.save({"state": block.detach().cpu().contiguous()}))
    rows = [None] * lay.world
    if dist.is_initialized():
        dist.all_gather_object(rows, (lay.r0, lay.r1), group=group)
    else:
        rows = [(lay.r0, lay.r1)]
    if lay.rank == 0:
        index = dict(meta, height=lay.height, width=lay.width, batch=block.shape[0], channels=block.shape[1],
                     dtype=str(block.dtype).replace("torch.", ""),
                     shards=[{"file": _shard_name(r), "rows": list(rr)} for r, rr in enumerate(rows)])
        atomic_write_bytes(folder / INDEX, json.dumps(index, indent=1).encode())
        remove_stale(folder, "shard-", ".safetensors", lay.world)  # (after the index: it no longer names them)
    if dist.is_initialized():
        dist.barrier(group=group)


def read_index(folder) -> Dict[str, object]:
    path = Path(folder) / INDEX
    try:
        index = json.loads(read_input(path, limit=16 << 20, what="shard index"))
        index["shards"] = [(s["file"], int(s["rows"][0]), int(s["rows"][1])) for s in index["shards"]]
        for key in ("height", "width", "batch", "channels", "step"):
            int(index[key])
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, InputFileError):
            raise
        raise InputFileError(path, f"not a shard index ({type(e).__name__}: {str(e)[:200]})") from None
    return index


def load_rows(folder, r0: int, r1: int) -> Tuple[torch.Tensor, Dict[str, object]]:
    """Rows ``[r0, r1)`` of a sharded state (from whichever files hold them) and its index."""
    index = read_index(folder)
    parts = []
    for name, a, b in index["shards"]:
        lo, hi = max(a, r0), min(b, r1)
        if lo >= hi:
            continue
        if Path(name).name != name:
            raise InputFileError(Path(folder) / INDEX, f"shard file {name!r} is not a plain file name")
        path = Path(folder) / name
        with open_input(path, limit=MAX_SHARD_BYTES, what="state shard") as f:
            tensors, _ = weights_file.parse(path, f.read())
        if "state" not in tensors:
            raise InputFileError(path, "not a state shard (no 'state' tensor)")
        t = tensors["state"]
        if t.shape[2] != b - a:
            raise InputFileError(path, f"holds {t.shape[2]} rows, the index says {b - a}")
        parts.append(t[:, :, lo - a:hi - a])
    got = sum(p.shape[2] for p in parts)
    if got != r1 - r0:
        raise InputFileError(Path(folder) / INDEX, f"the shards hold {got} of rows {r0}..{r1 - 1}")
    return torch.cat(parts, dim=2), index
