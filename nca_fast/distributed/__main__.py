"""``torchrun --nproc-per-node N -m nca_fast.distributed MODEL --size HxW --steps S --out DIR``: a
sharded rollout. Every rank steps its row block, writes its rows of the final state
(``DIR/state/``: a file per rank and an index) and of the image (``DIR/tiles/tile-<rank>.png``,
stacked top to bottom in rank order), and with ``--checkpoint-every N`` a sharded checkpoint at
every multiple of N steps (the last step's too) that ``--resume`` continues bit for bit, on any
number of ranks. A rank that fails or loses a peer stops the others within
``--timeout`` seconds with an error, not a hang."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..backend import BACKENDS
from ..commands import described
from ..commands.info import BUILTINS, load_model
from ..commands.run import parse_size
from ..media import to_frame, write_png
from ..utils.checks import check_int, check_memory
from ..utils.files import atomic_write_bytes
from .rollout import Layout, seed_block, sharded_rollout
from .shards import load_rows, remove_stale, save_shards


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nca_fast.distributed", description=described(__doc__))
    p.add_argument("model", help="model file, or a built-in: " + ", ".join(BUILTINS))
    p.add_argument("--name", help="model name inside a multi-model file")
    p.add_argument("--size", required=True, help="grid HxW")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (state/, tiles/, checkpoint/, run.json)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: the fused kernels on CUDA, the CPU fast path on a CPU")
    p.add_argument("--steps-per-exchange", type=int, help="k (default: from the cost model)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="write DIR/checkpoint/ every N steps")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint/")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a silent peer is an error")
    return p


def run(args) -> int:
    H, W = parse_size(args.size)
    check_int("--steps", args.steps, 0, 2**32 - 1)
    check_int("--batch", args.batch, 1)
    if args.checkpoint_every is not None:
        check_int("--checkpoint-every", args.checkpoint_every, 1)
    if args.steps_per_exchange is not None:
        check_int("--steps-per-exchange", args.steps_per_exchange, 1)
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    cuda = torch.cuda.is_available() and args.backend in ("auto", "triton")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:  # (NCCL: each rank on its own GPU before the group forms, or all would share GPU 0)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = load_model(args.model, args.name).to(device).requires_grad_(False)
    circular = model.spec.padding == "circular"
    lay = Layout.make(H, W, rank, world, circular)
    backend = args.backend if args.backend != "auto" else ("triton" if cuda else "cpu")
    per_cell = args.batch * model.spec.channels * 4
    check_memory(8 * per_cell * lay.rows * W, device, f"rank {rank}'s {lay.rows}x{W} block and its halo strips",
                 per_cell=8 * per_cell)
    out = Path(args.out)
    start = 0
    if args.resume:
        block, index = load_rows(out / "checkpoint", lay.r0, lay.r1)
        if (index["height"], index["width"], index["seed"], index["model"]) != (H, W, args.seed, model.spec.to_json()):
            raise ValueError(f"{out / 'checkpoint'} is another run (size, seed or model differ)")
        block, start = block.to(device), int(index["step"])
        if start > args.steps:
            raise ValueError(f"{out / 'checkpoint'} is at step {start}, beyond --steps {args.steps}: a resumed "
                             f"run goes on to --steps, it cannot go back")
    else:
        block = seed_block(model, args.batch, lay, device)
    every = args.checkpoint_every or args.steps
    stats: dict = {}
    t0 = datetime.datetime.now()
    done = start
    while done < args.steps:
        n = min(every - done % every, args.steps - done)
        block = sharded_rollout(model, block, lay, n, seed=args.seed, start_step=done, backend=backend,
                                steps_per_exchange_=args.steps_per_exchange, stats=stats)
        done += n
        if args.checkpoint_every and done % args.checkpoint_every == 0:
            save_shards(out / "checkpoint", block, lay, {"step": done, "seed": args.seed,
                                                         "model": model.spec.to_json()})
    meta = {"step": done, "seed": args.seed, "model": model.spec.to_json()}
    save_shards(out / "state", block, lay, meta)
    (out / "tiles").mkdir(parents=True, exist_ok=True)
    write_png(out / "tiles" / f"tile-{rank:05d}.png", to_frame(model.to_rgb(block)))
    if rank == 0:
        remove_stale(out / "tiles", "tile-", ".png", world)
        run_info = {"ranks": world, "size": [H, W], "steps": args.steps, "resumed_from": start,
                    "seconds": (datetime.datetime.now() - t0).total_seconds(), "rank0_exchange": stats}
        atomic_write_bytes(out / "run.json", json.dumps(run_info, indent=1).encode())
        print(f"wrote {out}/state ({world} shards), {out}/tiles; {stats.get('rounds', 0)} exchange rounds of "
              f"k={stats.get('steps_per_exchange')} steps")
    dist.barrier()
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError, MemoryError, FloatingPointError) as e:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        message = " ".join(str(e).split())[:500] or type(e).__name__
        print(f"nca_fast.distributed rank {rank}: error: {message}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
