"""``nca-fast train TARGET.png --out model.safetensors``: train a growing NCA on an image as Distill's
*Growing Neural Cellular Automata* does (sample pool, damage, 64-95 steps, Adam with a step
schedule), with a progress bar, atomic resumable checkpoints (``--checkpoint``, ``--resume``) and
the model written in nca_fast's format (``nca_fast.load`` reads it)."""
from __future__ import annotations

import math

from ..backend import BACKENDS
from ..io import save
from ..spec import growing_spec
from ..train import GrowingConfig, load_target, train_growing
from ..utils.checks import device_arg
from ..utils.files import check_output, same_file


def add_parser(sub) -> None:
    d = GrowingConfig()
    p = sub.add_parser("train", help="train a growing NCA on a target image", description=__doc__)
    p.add_argument("target", help="target image (png/jpg; transparent pixels are empty cells)")
    p.add_argument("--out", required=True, help="the trained model (.safetensors)")
    p.add_argument("--checkpoint", help="training state (.safetensors), written every --checkpoint-interval "
                                        "iterations and at the end")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint when it exists")
    p.add_argument("--checkpoint-interval", type=int, default=100, metavar="N")
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--size", type=int, default=d.target_size,
                   help=f"the target image's longer side is shrunk to at most this many cells ({d.target_size})")
    p.add_argument("--padding", type=int, default=d.padding, help=f"empty cells around it ({d.padding})")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--pool", type=int, default=d.pool, help=f"sample pool size ({d.pool}; 0: always from the seed)")
    p.add_argument("--damage", type=int, default=d.damage, help=f"damaged samples per batch ({d.damage})")
    p.add_argument("--steps", type=int, nargs=2, default=(d.min_steps, d.max_steps), metavar=("MIN", "MAX"),
                   help=f"rollout length range ({d.min_steps} {d.max_steps})")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-decay-at", type=int, default=d.lr_decay_at, metavar="N",
                   help=f"iteration after which the learning rate is 10x smaller ({d.lr_decay_at})")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seed", type=int, default=d.seed, help="weights init, sampling, damage and update masks")
    p.add_argument("--device", default="auto", help="torch device (auto: cuda when available)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    # Every check before the target is read or anything trained.
    out = check_output(args.out, (".safetensors",), "--out")
    if args.checkpoint is not None:
        ck = check_output(args.checkpoint, (".safetensors",), "--checkpoint")
        if same_file(out, ck):
            raise ValueError("--out and --checkpoint name the same file")
    for path in filter(None, (args.out, args.checkpoint)):
        if same_file(path, args.target):
            raise ValueError(f"{path} is the target image: refusing to replace an input")
    if args.resume and args.checkpoint is None:
        raise ValueError("--resume needs --checkpoint")
    if args.channels < 4 or args.hidden < 1:
        raise ValueError(f"--channels must be >= 4 (RGBA, then hidden channels) and --hidden >= 1, got "
                         f"{args.channels} and {args.hidden}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite positive number, got {args.lr}")
    config = GrowingConfig(target_size=args.size, padding=args.padding, batch=args.batch, pool=args.pool,
                           damage=args.damage, min_steps=args.steps[0], max_steps=args.steps[1], lr=args.lr,
                           lr_decay_at=args.lr_decay_at, iterations=args.iterations, seed=args.seed)
    spec = growing_spec(channels=args.channels, hidden=args.hidden, name=out.stem)
    device = device_arg(args.device)
    target = load_target(args.target, config.target_size, config.padding)
    result = train_growing(target, config, spec=spec, device=device, backend=args.backend,
                           checkpoint=args.checkpoint, checkpoint_interval=args.checkpoint_interval,
                           resume=args.resume, progress=not args.quiet)
    save(result.model, out)
    first, last = result.losses[0], sum(result.losses[-10:]) / len(result.losses[-10:])
    print(f"wrote {out}: {len(result.losses)} iterations, loss {first:.3e} -> {last:.3e} "
          f"(mean of the last {min(10, len(result.losses))})")
    return 0
