"""``nca-fast fit-decoder MODEL IMAGE --scale S --kind lppn --steps N --out decoder.safetensors``:
train a high-resolution decoder so that MODEL's grown state renders IMAGE (png/jpg)."""
from __future__ import annotations

import math

import torch

from ..decoders import fit_decoder, save_decoder
from ..media import load_image
from ..utils.checks import device_arg
from ..utils.files import check_output, same_file
from .info import BUILTINS, load_model
from .run import parse_size


def add_parser(sub) -> None:
    p = sub.add_parser("fit-decoder", help="fit a high-resolution decoder to a target image",
                       description=__doc__)
    p.add_argument("model", help="model file, or a built-in: " + ", ".join(BUILTINS))
    p.add_argument("image", help="target image (png/jpg; an alpha channel gives an RGBA decoder)")
    p.add_argument("--name", help="model name inside a multi-model file (Distill textures)")
    p.add_argument("--scale", type=int, default=8, help="pixels per cell side (default 8)")
    p.add_argument("--kind", choices=("lppn", "pixel_shuffle"), default="lppn")
    p.add_argument("--steps", type=int, default=400, help="optimisation steps (default 400)")
    p.add_argument("--out", default="decoder.safetensors", help="output decoder file")
    p.add_argument("--grid", help="NCA grid HxW (default: image size / scale)")
    p.add_argument("--grow-steps", type=int, default=128, help="NCA steps before fitting (default 128)")
    p.add_argument("--hidden", type=int, help="hidden width (lppn default 32; pixel_shuffle 0 = linear)")
    p.add_argument("--layers", type=int, help="lppn sine layers (default 3)")
    p.add_argument("--frequencies", type=int, default=0, help="lppn coordinate frequencies (default 0)")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the NCA rollout and the init")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run)


def _check(args) -> torch.device:
    """Every argument check, before any file is read or any work done."""
    for flag, value, lo, hi in (("--scale", args.scale, 1, 256), ("--steps", args.steps, 1, 10**7),
                                ("--grow-steps", args.grow_steps, 0, 2**32 - 1)):
        if not lo <= value <= hi:  # (--steps 0 would write an untrained decoder)
            raise ValueError(f"{flag} must be in [{lo}, {hi}], got {value}")
    if args.kind == "pixel_shuffle" and args.layers is not None:
        raise ValueError("--layers is for lppn decoders (a pixel-shuffle head has --hidden 0: linear, or one "
                         "ReLU layer of --hidden units)")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite positive number, got {args.lr}")
    out = check_output(args.out, (".safetensors",), "--out")
    for what, path in (("model", args.model), ("image", args.image)):
        if same_file(out, path):
            raise ValueError(f"--out {args.out} is the {what} file: refusing to replace an input")
    return device_arg(args.device)


def run(args) -> int:
    device = _check(args)
    grid = parse_size(args.grid, "--grid") if args.grid else None
    image = load_image(args.image)
    model = load_model(args.model, args.name).to(device)
    every = max(1, args.steps // 10)

    def report(i, loss):
        if (i + 1) % every == 0 or i == 0:
            print(f"step {i + 1}/{args.steps}: mse {loss:.5f}", flush=True)

    fit = fit_decoder(model, image, args.scale, kind=args.kind, grid=grid, grow_steps=args.grow_steps,
                      seed=args.seed, steps=args.steps, lr=args.lr, hidden=args.hidden,
                      layers=args.layers, frequencies=args.frequencies, callback=report)
    save_decoder(fit.decoder, args.out)
    s = fit.decoder.spec
    print(f"wrote {args.out} ({s.kind}, {s.channels} -> {s.out_channels} channels, scale {s.scale})")
    return 0
