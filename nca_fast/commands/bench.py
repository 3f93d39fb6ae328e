"""``nca-fast bench``: time every backend on the same NCA (see :mod:`nca_fast.bench`)."""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path

import torch

from .. import bench
from ..bench import cases as C
from ..bench.distributed import distributed_table, run_distributed
from ..bench.render import run_render
from ..bench.report import default_stem, unused_stem
from ..bench.suite import device_info, machine_info
from ..bench.train import TRAIN_PROVIDERS, run_train, train_table
from ..utils.checks import check_memory, device_arg
from ..utils.files import atomic_write_bytes
from . import described
from .info import load_model


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the backends (quick by default on a CPU)",
                       description=described(__doc__))
    p.add_argument("--full", action="store_true",
                   help="every provider that runs here, more sizes (GPU: 64..4096; CPU: 64..1024), longer "
                        "measurements")
    p.add_argument("--sizes", type=int, nargs="+", metavar="N", help="square grid sizes")
    p.add_argument("--providers", help="comma-separated, of " + ",".join(bench.PROVIDER_NAMES) + " (default: "
                   + ",".join(bench.DEFAULT_GPU_PROVIDERS) + " on a GPU; " + ",".join(bench.DEFAULT_CPU_PROVIDERS)
                   + " on a CPU)")
    p.add_argument("--models", default="growing,texture", help="built-in models (default: %(default)s)")
    p.add_argument("--model", metavar="FILE", help="benchmark this model file (anything nca_fast.load reads) "
                                                   "instead of the built-in models")
    p.add_argument("--model-name", metavar="NAME", help="the model to take from a --model file that holds "
                                                        "several (Distill's textures JSON, TF.js exports)")
    p.add_argument("--batches", type=int, nargs="+", metavar="B",
                   help="batch sizes; batches > 1 only up to 128x128 (default: 1 8 on a GPU or with --full, "
                        "1 on a CPU)")
    p.add_argument("--repeats", type=int, help="exactly this many timed steps per measurement")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="bench-results", help="output folder (default: %(default)s)")
    p.add_argument("--name", default="", help="file stem; overwrites files of that name (default: <device>-<date>, "
                   "with -2, -3, ... when that day's run is already there)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--no-render", action="store_true",
                   help="skip the high-resolution rendering table (step + pixel-shuffle / LPPN decode)")
    p.add_argument("--train", action="store_true",
                   help="instead: time one training iteration (64-step rollout, backward, Adam; batch 8, 72x72) "
                        "for " + ", ".join(TRAIN_PROVIDERS) + ", and compare their loss curves")
    p.add_argument("--distributed", action="store_true",
                   help="instead: strong and weak scaling of sharded rollouts on CPU ranks (gloo), --ranks")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts for --distributed (1 2)")
    p.set_defaults(func=run)


def _check_out(folder: Path) -> None:
    """The output folder, made (or found) and writable before any measurement."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--out {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to the --out folder {folder}")


def _check_args(args) -> None:
    """Every number and name checked before anything is measured or made."""
    if args.model_name is not None and not args.model:
        raise ValueError("--model-name needs --model")
    if args.name and (Path(args.name).name != args.name or args.name in (".", "..")):
        raise ValueError(f"--name {args.name!r} is a file stem, not a path (the folder is --out)")
    for flag, values, lo in (("--sizes", args.sizes, 3), ("--batches", args.batches, 1),
                             ("--ranks", args.ranks if args.distributed else None, 1)):
        if values is not None and (not values or min(values) < lo):
            raise ValueError(f"{flag} must be ints >= {lo}, got {values}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")


def _check_fits(models, sizes, batches, device: torch.device) -> None:
    """The largest case's reference step (the heaviest provider) fits in memory."""
    for name, model in models.items():
        per_cell = max(batches) * model.rollout_bytes_per_cell(torch.float32, "reference")
        check_memory(max(sizes) ** 2 * per_cell, device, f"a {max(sizes)}x{max(sizes)} step of {name} at batch "
                     f"{max(batches)}", per_cell=per_cell)


def run(args) -> int:
    _check_args(args)
    device = device_arg(args.device or "auto")
    gpu = device.type == "cuda"
    if args.train or args.distributed:
        model = load_model(args.model, args.model_name) if args.model else C.default_model("growing")
        size = args.sizes[0] if args.sizes else (72 if args.train else 256)
        batch = args.batches[0] if args.batches and args.train else (8 if args.train else 1)
        _check_fits({"the model": model}, [size], [batch], device)
        _check_out(Path(args.out))
        return _run_train(args, device, model, size, batch) if args.train else _run_distributed(args, model, size)
    if args.model:
        models = {args.model_name or Path(args.model).stem: load_model(args.model, args.model_name)}
    else:
        models = {n: C.default_model(n) for n in (m.strip() for m in args.models.split(",")) if n}
    if args.providers:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    elif args.full:
        providers = [p for p in bench.PROVIDER_NAMES if gpu or not p.startswith("triton")]
    else:
        providers = list(bench.DEFAULT_GPU_PROVIDERS if gpu else bench.DEFAULT_CPU_PROVIDERS)
    if args.sizes:
        sizes = args.sizes
    else:
        sizes = C.GPU_SIZES if gpu else (C.CPU_FULL_SIZES if args.full else C.CPU_QUICK_SIZES)
    batches = args.batches or ([1, 8] if gpu or args.full else [1])
    cases = bench.make_cases(list(models), sizes, batches)
    settings = bench.Settings.for_mode(args.full, args.repeats)
    _check_fits(models, sizes, [1] if max(sizes) > C.BATCH8_MAX_SIZE else batches, device)
    _check_out(Path(args.out))

    log = lambda s: print(s, file=sys.stderr, flush=True)
    report = bench.run(cases, models, providers, device, settings, log=log, argv=getattr(args, "argv", sys.argv[1:]))
    if not args.no_render:
        report["render"] = run_render(device, min_time=settings.min_time, log=log)
    print(bench.report.table(report))
    paths = bench.report.write_all(report, Path(args.out), args.name, plot_png=not args.no_plot)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _run_train(args, device: torch.device, model, size: int, batch: int) -> int:
    providers = [p.strip() for p in args.providers.split(",")] if args.providers else list(TRAIN_PROVIDERS)
    iterations = args.repeats or (10 if device.type == "cuda" else 3)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    report = run_train(model, device, providers, size=size, batch=batch, iterations=iterations, log=log)
    report.update(machine=machine_info(), device_info=device_info(device), created=datetime.now().isoformat())
    table = train_table(report)
    print(f"{report['device_info']['name']}\n\n{table}")
    out = Path(args.out)
    stem = args.name or unused_stem(out, default_stem({**report, "device": report["device_info"]}) + "-train")
    atomic_write_bytes(out / f"{stem}.json", json.dumps(report, indent=1).encode())
    atomic_write_bytes(out / f"{stem}.md", f"{report['device_info']['name']}\n\n{table}".encode())
    print(f"\nwrote {out / stem}.json, {out / stem}.md")
    return 0


def _run_distributed(args, model, size: int) -> int:
    log = lambda s: print(s, file=sys.stderr, flush=True)
    report = run_distributed(model.spec, args.ranks, size=size, steps=args.repeats or 16, log=log)
    info = {"machine": machine_info(), "created": datetime.now().isoformat(),
            "device": device_info(torch.device("cpu"))}
    table = distributed_table(report)
    print(f"{info['device']['name']}, gloo\n\n{table}")
    out = Path(args.out)
    stem = args.name or unused_stem(out, default_stem(info) + "-distributed")
    atomic_write_bytes(out / f"{stem}.json", json.dumps({**info, **report}, indent=1).encode())
    atomic_write_bytes(out / f"{stem}.md", f"{info['device']['name']}, gloo\n\n{table}".encode())
    print(f"\nwrote {out / stem}.json, {out / stem}.md")
    return 0
