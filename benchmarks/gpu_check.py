"""The device script: GPU correctness of the fused kernels, then a short throughput table.

    PYTHONPATH=. python benchmarks/gpu_check.py OUT_DIR [--quick]
    PYTHONPATH=. python benchmarks/gpu_check.py OUT_DIR --dry-run   # CPU + Triton interpreter, tiny sizes

Runs in one call of under five minutes on an H100/H200. Correctness: the fused step in every state
dtype and MLP precision against a float64 reference (relative error), update masks bit-identical, a
50-step rollout; throughput: reference eager, torch.compile of the reference, and the fused rollout
step and single step in fp32 (TF32 MLP) and fp16, growing and texture models, at 1024^2, 2048^2 and
4096^2, with cell-updates/s, peak memory, the fraction of the memory floor (bytes per cell-update /
measured copy bandwidth) and how long each first call (compilation) took; training: the fused
backward's gradients against the reference (and bit-identical run to run), a differentiable
rollout's (CUDA-graphed, against its plain launches and the reference) and one Distill growing
training iteration timed for the reference, torch.compile and the fused path; the interior tiles'
opt-in loads (prefetch, tma) against the plain kernel (growing, 2048^2); the decoders. Only what is
checked or timed is compiled.
OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md are written after every section: a section that
raises is recorded with its traceback and the next one runs, and what would start past
``--deadline`` seconds (default 420 on a GPU, none in a dry run) is skipped and listed, so that the
one device call always brings its measurements back, and fails naming what failed.
``--dry-run`` runs every line of it on a CPU under the Triton interpreter at tiny
sizes (CI does), so that GPU minutes are not spent finding a Python error.
Before the sections, ``--workers`` processes (default: the CPU cores, at most 16) run every fused
path the sections launch at a tiny size, compiling its kernels in parallel into Triton's on-disk
cache (the kernels' integer arguments are not specialised: a tiny grid compiles the binaries a large
one runs); the sections then load them instead of compiling ~80 kernels one at a time.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nca_fast as nf  # noqa: E402
from nca_fast import reference, rng  # noqa: E402
from nca_fast.bench import timing  # noqa: E402
from nca_fast.bench.train import run_train, train_table  # noqa: E402
from nca_fast.decoders import build_decoder, decode, lppn_spec, pixel_shuffle_spec  # noqa: E402
from nca_fast.kernels import launch  # noqa: E402
from nca_fast.kernels.config import INTERIOR_LOADS, bytes_per_cell_update  # noqa: E402
from nca_fast.kernels.rollout_grad import captured  # noqa: E402
from nca_fast.precision import TOLERANCE, relative_error  # noqa: E402
from nca_fast.utils.files import atomic_write_bytes  # noqa: E402

DEV = "cpu" if DRY else "cuda"
# Sizes: (GPU, dry run).
CORRECT_GRID = (257, 131) if not DRY else (9, 37)
MASK_GRID = (1031, 517) if not DRY else (13, 21)
ROLLOUT = (96, 50) if not DRY else (12, 3)
DECODE_GRID = (270, 480) if not DRY else (6, 10)
LOADS_GRID = (2048, 2048) if not DRY else (7, 71)  # (the dry run's: 2 interior tiles a row)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, min_time=0.3, max_reps=200):
    """(median, min, max) seconds per call of ``fn`` (CUDA events, after one warm-up call)."""
    t = timing.measure(lambda k: fn(), device=torch.device(DEV), sync=sync, warmup=1,
                       min_time=min_time if not DRY else 0.0, max_repeats=max_reps if not DRY else 1)
    return t.median, t.min, t.max


def grown_state(model, B, H, W, dtype):
    """A fully alive, structured state (no backend gets an easy all-zeros case)."""
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.rand(B, model.spec.channels, H, W, generator=g, device=DEV) - 0.5
    if model.spec.alive_channel is not None:
        x[:, model.spec.alive_channel] = 0.2 + 0.5 * x[:, model.spec.alive_channel].abs()
    return x.to(dtype)


# The models the step's correctness covers, with the (state dtype, fp32 MLP precision) pairs of each.
EVERY = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "tf32"), (torch.bfloat16, "tf32")]
CHECKED = {"growing": (nf.growing_spec(), EVERY), "texture": (nf.texture_spec(), EVERY[1:3]),
           "growing-replicate-64x256": (nf.growing_spec(channels=64, hidden=256, padding="replicate"), EVERY[1:3])}


@torch.no_grad()
def correctness(report):
    rows = []
    for name, (spec, variants) in CHECKED.items():
        model = nf.NCA(spec, init_seed=1).to(DEV)
        x64 = grown_state(model, 3, *CORRECT_GRID, torch.float64)
        ref = model.step(x64, seed=3, step=9, backend="reference")
        for dtype, mm in variants:
            model.fp32_matmul = mm
            y = model.step(x64.to(dtype), seed=3, step=9, backend="triton").double()
            rows.append({"model": name, "dtype": str(dtype).replace("torch.", ""), "precision": model.precision(dtype),
                         "rel_error": relative_error(y, ref), "max_abs": (y - ref).abs().max().item(),
                         "finite": bool(torch.isfinite(y).all())})
    # masks: w = 0, b2 = 1 -> the update equals the fire mask
    spec = nf.NCASpec(channels=4, hidden=16, alive_channel=None, hidden_bias=False, fire_rate=0.5)
    m = nf.NCA(spec, {"w1": torch.zeros(16, 12), "w2": torch.zeros(4, 16), "b2": torch.ones(4)}).to(DEV)
    x = torch.zeros(2, 4, *MASK_GRID, device=DEV)
    same = True
    for seed, step in [(0, 0), (123, 77), (2**63 + 5, 2**32 - 1)]:
        y = m.step(x, seed=seed, step=step, origin=(5, -9), backend="triton")
        mask = rng.update_mask(2, *MASK_GRID, seed=seed, step=step, fire_rate=0.5, origin=(5, -9), device=DEV)
        same &= bool(torch.equal(y[:, :1] != 0, mask))
    # rollout: 50 steps fused fp32 (ieee) vs float64 reference
    model = nf.NCA(nf.growing_spec(), init_seed=2).to(DEV)
    model.fp32_matmul = "ieee"
    x = grown_state(model, 2, ROLLOUT[0], ROLLOUT[0], torch.float32)
    a = model.rollout(x, ROLLOUT[1], seed=1, backend="triton").double()
    b = model.rollout(x.double(), ROLLOUT[1], seed=1, backend="reference")
    report["correctness"] = {"step": rows, "masks_bit_identical": same,
                             "rollout50_rel_error": relative_error(a, b)}


# ---- the warm-up: every kernel the sections launch, compiled in parallel worker processes -------
# A Triton kernel compiles in ~2-5 s on one core, holding the GIL for most of it, and the sections
# launch ~80 of them one after another: minutes of the one device call. The kernels' integer
# arguments are not specialised (step.STEP_INTS), so a tiny grid compiles the very binaries a 4096^2
# grid runs: each task below runs one part of the check's fused paths at WARM_GRID in a worker
# process, which writes Triton's on-disk cache; the sections then load those binaries (~10 ms each).
# A kernel the tasks miss compiles in its section as before: the warm-up saves time, never results.
# (on a GPU: interior tiles and the border ring for every tile width; a dry run compiles nothing and
# checks only that the tasks run: the interpreter would take minutes a task at the GPU's size)
WARM_GRID = (12, 300) if not DRY else (4, 6)
WARM_LIMIT_S = 180.0
_LOADS = os.environ.get("NCA_FAST_INTERIOR_LOADS")  # (the sections' default interior loads)
_CAP = os.environ.get("NCA_FAST_REGISTER_CAP")  # (and register cap)
# The interior-loads section's variants, "loads" or "loads@cap": INTERIOR_LOADS, and the plain kernel
# under a register cap of 128 (4 CTAs an SM: whether occupancy pays for spills; config.register_cap).
LOAD_VARIANTS = tuple(INTERIOR_LOADS) + ("plain@128",)


def _set_loads(variant) -> None:
    """NCA_FAST_INTERIOR_LOADS and NCA_FAST_REGISTER_CAP for ``variant`` ("loads" or "loads@cap");
    None: the run's own settings."""
    loads, _, cap = variant.partition("@") if variant else (_LOADS, "", _CAP)
    for name, value in (("NCA_FAST_INTERIOR_LOADS", loads), ("NCA_FAST_REGISTER_CAP", cap)):
        if value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)


def warm_tasks() -> list:
    """``(kind, *args)`` tuples for :func:`warm`: the step's forward per model, dtype, precision and
    interior loads; the backward (a step and a CUDA-graphed rollout) per model and precision; the
    decoders per dtype; the mask check's model."""
    tasks = [("forward", name, str(dtype), precision, None)  # (None: the interior loads' default)
             for name, (_, variants) in CHECKED.items() for dtype, precision in variants]
    tasks += [("forward", "growing", str(dtype), "tf32", loads) for loads in LOAD_VARIANTS if loads != "plain"
              for dtype in (torch.float32, torch.float16)]
    tasks += [("backward", name, precision) for name in ("growing", "texture") for precision in ("tf32", "ieee")]
    tasks += [("decode", str(dtype)) for dtype in (torch.float32, torch.float16)] + [("masks",)]
    if DRY:  # (one task of each kind)
        tasks = [t for i, t in enumerate(tasks) if t[0] not in {u[0] for u in tasks[:i]}]
    return tasks


def warm(task: tuple) -> tuple:
    """Run ``task`` (from :func:`warm_tasks`) at a tiny size: ``(task, seconds, error or None)``."""
    t0 = time.time()
    try:
        kind, *args = task
        # (a worker runs several tasks: each starts from the settings the sections see)
        _set_loads(args[3] if kind == "forward" else None)
        if kind == "forward":
            name, dtype, precision, _ = args
            model = nf.NCA(CHECKED[name][0], init_seed=0).to(DEV).requires_grad_(False)
            model.fp32_matmul = precision
            x = grown_state(model, 1 if DRY else 2, *WARM_GRID, getattr(torch, dtype.replace("torch.", "")))
            with torch.no_grad():
                model.step(x, seed=0, step=1, backend="triton")
                model.rollout(x, 3, seed=0, backend="triton")
                xc = x.contiguous(memory_format=torch.channels_last)
                model.fused_rollout(xc.shape, xc.dtype, steps=3)(xc, seed=0)
        elif kind == "backward":
            name, precision = args
            model = nf.NCA(CHECKED[name][0], init_seed=3).to(DEV)
            model.fp32_matmul = precision
            x = grown_state(model, 1 if DRY else 2, *WARM_GRID, torch.float32).requires_grad_(True)
            model.step(x, seed=1, backend="triton").sum().backward()
            model.rollout(x, 8, seed=2, every=4, backend="triton")[:, :, :4].square().sum().backward()
        elif kind == "decode":
            dtype = getattr(torch, args[0].replace("torch.", ""))
            model = nf.NCA(nf.texture_spec(), init_seed=0).to(DEV).requires_grad_(False)
            x = grown_state(model, 1, *WARM_GRID, dtype)
            ps = build_decoder(pixel_shuffle_spec(12, scale=8, out_channels=3)).to(DEV)
            lppn = build_decoder(lppn_spec(12, scale=8, out_channels=3, hidden=32, layers=3)).to(DEV)
            with torch.no_grad():
                state = model.fused_rollout(x.shape, dtype, steps=1)(x, seed=0)
                model.fused_rollout(x.shape, dtype, steps=1, decoder=ps)(x, seed=0)
                decode(lppn, state, backend="triton", precision="fp16")
        elif kind == "masks":
            spec = nf.NCASpec(channels=4, hidden=16, alive_channel=None, hidden_bias=False, fire_rate=0.5)
            m = nf.NCA(spec, {"w1": torch.zeros(16, 12), "w2": torch.zeros(4, 16), "b2": torch.ones(4)}).to(DEV)
            with torch.no_grad():
                m.step(torch.zeros(2, 4, *WARM_GRID, device=DEV), seed=0, step=0, origin=(5, -9), backend="triton")
        else:
            raise ValueError(f"unknown warm-up task {task!r}")
        sync()
        return task, time.time() - t0, None
    except Exception as e:  # noqa: BLE001 (reported; the section then compiles what this missed)
        return task, time.time() - t0, f"{type(e).__name__}: {e}"


def precompile(report, workers: int, limit_s: float = WARM_LIMIT_S) -> None:
    """:func:`warm_tasks` on ``workers`` spawned processes (their CUDA contexts apart from this one),
    for at most ``limit_s`` seconds (then the stragglers are stopped: their kernels compile in their
    sections). Records the wall time and each task's seconds and error."""
    import multiprocessing

    tasks = warm_tasks()
    workers = max(1, min(workers, len(tasks)))
    rows = report["precompile"] = {"workers": workers, "tasks": []}
    t0 = time.time()
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        results = pool.imap_unordered(warm, tasks)
        for _ in tasks:
            task, secs, error = results.next(timeout=max(0.1, limit_s - (time.time() - t0)))
            rows["tasks"].append({"task": "/".join(map(str, task)), "s": secs, "error": error})
            print(f"precompile {rows['tasks'][-1]}", flush=True)
    except multiprocessing.TimeoutError:
        rows["stopped_after_s"] = limit_s
        print(f"gpu_check: precompile stopped after {limit_s:.0f} s", flush=True)
    finally:
        pool.terminate()
        pool.join()
    rows["wall_s"] = time.time() - t0
    rows["errors"] = [r for r in rows["tasks"] if r["error"]]


def _first_call(fn) -> float:
    """Seconds of ``fn()``'s first call: Triton's JIT (or torch.compile) compiles on it."""
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


@torch.no_grad()
def throughput(report, sizes, steps):
    """Per model and grid: eager reference and torch.compile (up to 2048^2: a 4096^2 hidden tensor is
    8.6 GB per step), then the fused kernels timed two ways: a rollout step (``FusedRollout``, the
    pending alive form, finalize amortised over ``steps``) and a single ``model.step`` on a
    channels-last state. Compiles only what it times; ``compile_s`` is each provider's first call."""
    bw = timing.copy_bandwidth(torch.device(DEV))
    report["copy_bandwidth_GBps"] = bw / 1e9
    rows = report["throughput"] = []  # (filled as measured: a later failure keeps these rows)
    for mname, spec in [("growing-16x128", nf.growing_spec()), ("texture-12x96", nf.texture_spec())]:
        model = nf.NCA(spec, init_seed=0).to(DEV).requires_grad_(False)
        model.fp32_matmul = "tf32"
        params = model.params()
        step_c = torch.compile(lambda x, mask: reference.step(x, params, spec, mask))
        for n in sizes:
            if past_deadline(report, f"throughput {mname} {n}^2"):
                continue
            x32 = grown_state(model, 1, n, n, torch.float32)
            providers = {"reference": torch.float32, "compile": torch.float32}
            for dt, tag in ((torch.float32, "tf32"), (torch.float16, "fp16")):
                providers[f"triton-{tag} rollout"] = providers[f"triton-{tag} step"] = dt
            for pname, dtype in providers.items():
                if pname in ("reference", "compile") and n > 2048:
                    continue
                if pname == "compile" and (DRY or n not in (2048, max(sizes))):
                    continue  # minutes of compilation: one size on a GPU, none on a CPU
                if past_deadline(report, f"throughput {mname} {n}^2 {pname}"):
                    continue
                x = x32.to(dtype).contiguous(memory_format=torch.channels_last)
                per_call = steps
                if pname == "reference":
                    fn = lambda: model.rollout(x, steps, backend="reference")
                elif pname == "compile":
                    masks = [rng.update_mask(1, n, n, seed=0, step=k, fire_rate=0.5, device=DEV) for k in range(steps)]

                    def fn():
                        y = x
                        for m in masks:
                            y = step_c(y, m)
                        return y
                elif pname.endswith("rollout"):
                    roll = model.fused_rollout(x.shape, dtype, steps=steps)
                    fn = lambda: roll(x, seed=0)
                else:
                    per_call = 1
                    fn = lambda: model.step(x, seed=0, step=3, backend="triton")
                if DEV == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                compile_s = _first_call(fn)
                med, lo, hi = timed(fn)
                cells = n * n * per_call
                bytes_per = bytes_per_cell_update(spec, dtype)
                rows.append({"model": mname, "provider": pname, "size": n, "steps_per_call": per_call,
                             "s_per_step": med / per_call, "min": lo / per_call, "max": hi / per_call,
                             "cell_updates_per_s": cells / med, "bytes_per_cell_update": bytes_per,
                             "fraction_of_memory_floor": (cells / med) / (bw / bytes_per),
                             "peak_memory_MB": torch.cuda.max_memory_allocated() / 2**20 if DEV == "cuda" else 0,
                             "compile_s": max(0.0, compile_s - med)})
                print(f"{mname:16} {pname:20} {n:5}^2 {cells / med / 1e9:8.3f} G/s "
                      f"{rows[-1]['fraction_of_memory_floor']:.2f} of floor, first call {compile_s:.1f} s", flush=True)
                checkpoint(report)
    for r in rows:
        base = next((q for q in rows if q["model"] == r["model"] and q["size"] == r["size"]
                     and q["provider"] == "reference"), None)
        r["speedup_vs_reference"] = base["s_per_step"] / r["s_per_step"] if base else None
    report["compile_s"] = sum(r["compile_s"] for r in rows)


@torch.no_grad()
def interior_loads(report, steps):
    """The interior tiles' loads (``NCA_FAST_INTERIOR_LOADS``: plain, prefetch, tma; and the plain
    kernel under ``NCA_FAST_REGISTER_CAP`` 128) side by side: a growing-model rollout on LOADS_GRID per
    state dtype, each against the plain kernel's result (the same arithmetic: expected bit for bit),
    and whether the tensor descriptor was taken. Decides the default: ``nca-fast kernels`` shows the
    copies cost instructions and barriers and the cap spills, only a GPU shows whether the overlap or
    the occupancy pays for them."""
    model = nf.NCA(nf.growing_spec(), init_seed=0).to(DEV).requires_grad_(False)
    model.fp32_matmul = "tf32"
    rows = report["interior_loads"] = []
    try:
        for dtype, tag in ((torch.float32, "tf32"), (torch.float16, "fp16")):
            x = grown_state(model, 1, *LOADS_GRID, dtype).contiguous(memory_format=torch.channels_last)
            plain = None
            for loads in LOAD_VARIANTS:
                if past_deadline(report, f"interior loads {loads} {tag}"):
                    continue
                _set_loads(loads)
                roll = model.fused_rollout(x.shape, dtype, steps=steps)  # (reads the settings once)
                fn = lambda: roll(x, seed=0)
                compile_s = _first_call(fn)
                out = roll(x, seed=0).clone()
                plain = out if plain is None else plain
                med, lo, hi = timed(fn)
                cells = x.shape[2] * x.shape[3] * steps
                rows.append({"loads": loads, "dtype": tag, "grid": f"{x.shape[3]}x{x.shape[2]}",
                             "cell_updates_per_s": cells / med, "s_per_step": med / steps,
                             "tma_used": launch.tma_descriptor(roll.cfg, x) is not None,
                             "bit_identical_to_plain": bool(torch.equal(out, plain)),
                             "rel_diff_to_plain": relative_error(out.double(), plain.double()),
                             "compile_s": max(0.0, compile_s - med)})
                print(rows[-1], flush=True)
                checkpoint(report)
    finally:
        _set_loads(None)
    for r in rows:
        base = next((q for q in rows if q["dtype"] == r["dtype"] and q["loads"] == "plain"), None)
        r["speedup_vs_plain"] = base["s_per_step"] / r["s_per_step"] if base else None


@torch.no_grad()
def decoders(report):
    """Issue-5 goals: 3840x2160 frames from a 480x270 grid (scale 8) at >= 1000 frames/s including one
    NCA step per frame (LPPN, 3 sine layers of 32), and step+pixel-shuffle <= 1.2x a plain step."""
    rows = report["decoders"] = []
    model = nf.NCA(nf.texture_spec(), init_seed=0).to(DEV)
    for dtype in (torch.float32, torch.float16):
        if past_deadline(report, f"decoders {dtype}"):
            continue
        x = grown_state(model, 1, *DECODE_GRID, dtype)
        plain = model.fused_rollout(x.shape, dtype, steps=1)
        ps = build_decoder(pixel_shuffle_spec(12, scale=8, out_channels=3)).to(DEV)
        fused = model.fused_rollout(x.shape, dtype, steps=1, decoder=ps)
        if DEV == "cuda":
            plain.capture()
            fused.capture()
        t_plain = timed(lambda: plain(x, seed=0))[0]
        t_fused = timed(lambda: fused(x, seed=0))[0]
        lppn = build_decoder(lppn_spec(12, scale=8, out_channels=3, hidden=32, layers=3)).to(DEV)
        t_lppn = timed(lambda: decode(lppn, plain(x, seed=0), backend="triton", precision="fp16"))[0]
        H, W = DECODE_GRID
        rows.append({"dtype": str(dtype).replace("torch.", ""), "grid": f"{W}x{H}", "output": f"{8 * W}x{8 * H}",
                     "plain_step_ms": t_plain * 1e3, "step_plus_pixel_shuffle_ms": t_fused * 1e3,
                     "pixel_shuffle_ratio": t_fused / t_plain, "step_plus_lppn_ms": t_lppn * 1e3,
                     "lppn_frames_per_s": 1.0 / t_lppn})
        print(rows[-1], flush=True)
        checkpoint(report)


def reference_grads(model, x, loss) -> list:
    """The reference's autograd gradients ``[dL/dx, dL/dw...]`` of ``loss(model, x)``, in float64: an
    fp32 reference would run its convolutions in TF32 on a GPU (cuDNN's default), ~1e-2 from exact
    there, which is no yardstick for the "ieee" kernels (~1e-5)."""
    ref = copy.deepcopy(model).double()
    xx = x.detach().double().requires_grad_(True)
    loss(ref, xx).backward()
    return [xx.grad] + [p.grad for p in ref.parameters()]


def training(report):
    """The fused backward against the reference's autograd (growing and texture, tf32 and ieee; the
    gradients bit-identical across two runs), then one training iteration of the Distill growing setup
    (64 steps, batch 8, 72^2) timed for the reference, torch.compile and the fused path."""
    rows = report["backward"] = []
    for name, spec in (("growing", nf.growing_spec()), ("texture", nf.texture_spec())):
        for precision in ("tf32", "ieee"):
            model = nf.NCA(spec, init_seed=3).to(DEV)
            model.fp32_matmul = precision
            x = grown_state(model, 2, *CORRECT_GRID, torch.float32)
            gout = torch.randn(x.shape, generator=torch.Generator(device=DEV).manual_seed(1), device=DEV)

            def grads(backend):
                model.zero_grad()
                xx = x.clone().requires_grad_(True)
                (model.step(xx, seed=1, backend=backend) * gout).sum().backward()
                return [xx.grad] + [p.grad.clone() for p in model.parameters()]

            a, b = grads("triton"), grads("triton")
            want = reference_grads(model, x, lambda m, xx: (m.step(xx, seed=1, backend="reference") * gout).sum())
            err = max(relative_error(g, w) for g, w in zip(a, want))
            rows.append({"model": name, "precision": precision, "grad_rel_error": err,
                         "bit_identical": all(torch.equal(u, v) for u, v in zip(a, b))})
            print(rows[-1], flush=True)
            checkpoint(report)
    if past_deadline(report, "differentiable rollout"):
        return
    # a differentiable rollout: one autograd node, its launches CUDA-graphed, against the same launches
    # uncaptured (bit for bit), itself (run to run) and the reference's autograd
    model = nf.NCA(nf.growing_spec(), init_seed=4).to(DEV)
    model.fp32_matmul = "ieee"
    x = grown_state(model, 2, ROLLOUT[0], ROLLOUT[0], torch.float32)

    def rollout_grads(backend, graphs=True):
        model.cuda_graphs = graphs
        model.zero_grad()
        xx = x.clone().requires_grad_(True)
        model.rollout(xx, 8, seed=2, every=4, backend=backend)[:, :, :4].square().sum().backward()
        return [xx.grad] + [p.grad.clone() for p in model.parameters()]

    a, b = rollout_grads("triton"), rollout_grads("triton")
    graphed = captured(model) or DRY  # (the interpreter runs no CUDA graphs)
    plain = rollout_grads("triton", graphs=False)
    want = reference_grads(model, x, lambda m, xx: m.rollout(xx, 8, seed=2, every=4, backend="reference")
                           [:, :, :4].square().sum())
    report["rollout_grad"] = {"captured": graphed,
                              "rel_error": max(relative_error(g, w) for g, w in zip(a, want)),
                              "bit_identical": all(torch.equal(u, v) for u, v in zip(a, b)),
                              "graphs_equal_launches": all(torch.equal(u, v) for u, v in zip(a, plain))}
    print(report["rollout_grad"], flush=True)
    if past_deadline(report, "training iteration"):
        return
    train = run_train(nf.NCA(nf.growing_spec(), init_seed=0), torch.device(DEV), size=72 if not DRY else 8,
                      batch=8 if not DRY else 1, steps=64 if not DRY else 2, iterations=10 if not DRY else 1,
                      providers=("reference", "compile", "triton", "triton-launches"),
                      log=lambda m: print(m, flush=True))
    report["train"] = train


def failures(report) -> list:
    c = report.get("correctness", {})
    out = [f"{e['section']} raised {e['error']}" for e in report.get("errors", [])]
    out += [f"{r['model']} {r['dtype']}/{r['precision']}: rel. error {r['rel_error']:.2e} > "
           f"{TOLERANCE[r['precision']]:g}" for r in c.get("step", [])
           if not (r["finite"] and r["rel_error"] <= TOLERANCE[r["precision"]])]
    if c and not c.get("masks_bit_identical"):
        out.append("in-kernel update masks differ from nca_fast.rng")
    if c and not c.get("rollout50_rel_error", 1.0) <= 50 * TOLERANCE["ieee"]:
        out.append(f"50-step fp32 rollout rel. error {c.get('rollout50_rel_error')} > {50 * TOLERANCE['ieee']:g}")
    for r in report.get("backward", []):
        if not r["grad_rel_error"] <= 10 * TOLERANCE[r["precision"]] or not r["bit_identical"]:
            out.append(f"backward {r['model']}/{r['precision']}: gradient rel. error {r['grad_rel_error']:.2e}, "
                       f"bit-identical {r['bit_identical']}")
    for r in report.get("interior_loads", []):
        if not r["rel_diff_to_plain"] <= TOLERANCE[r["dtype"]]:
            out.append(f"interior loads {r['loads']} ({r['dtype']}): rel. difference to the plain kernel "
                       f"{r['rel_diff_to_plain']:.2e}")
    rg = report.get("rollout_grad")
    if rg and not (rg["rel_error"] <= 80 * TOLERANCE["ieee"] and rg["bit_identical"] and rg["graphs_equal_launches"]
                   and rg["captured"]):
        out.append(f"differentiable 8-step rollout: gradient rel. error {rg['rel_error']:.2e}, bit-identical "
                   f"{rg['bit_identical']}, captured {rg['captured']}, CUDA graphs equal to plain launches "
                   f"{rg['graphs_equal_launches']}")
    return out


def markdown(report) -> str:
    lines = [f"# gpu_check — {report['device']} — {report['date']}", "",
             f"torch {report['torch']}, triton {report['triton']}, copy bandwidth "
             f"{report.get('copy_bandwidth_GBps', 0):.0f} GB/s", "", "## Correctness (vs float64 reference)", "",
             "| model | dtype | MLP precision | rel. error | max abs | finite |", "|---|---|---|---|---|---|"]
    c = report.get("correctness", {})
    for r in c.get("step", []):
        lines.append(f"| {r['model']} | {r['dtype']} | {r['precision']} | {r['rel_error']:.2e} | {r['max_abs']:.2e} "
                     f"| {r['finite']} |")
    lines += ["", "**FAILED:** " + "; ".join(report["failures"]) if report.get("failures") else "all checks passed"]
    if report.get("skipped"):
        lines += ["", f"**Not run** (past the {report['deadline_s']:.0f} s deadline): " + "; ".join(report["skipped"])]
    for e in report.get("errors", []):
        lines += ["", f"**{e['section']} raised** (the other sections ran):", "", "```", e["traceback"].rstrip(), "```"]
    pre = report.get("precompile")
    if pre:
        lines += ["", f"precompile: {len(pre['tasks'])} tasks on {pre['workers']} processes in "
                      f"{pre.get('wall_s', 0):.0f} s"
                  + (f", stopped after {pre['stopped_after_s']:.0f} s" if "stopped_after_s" in pre else "")
                  + "".join(f"; {r['task']} raised {r['error']}" for r in pre.get("errors", []))]
    lines += ["", f"compiling (first calls of the throughput table"
              f"{', kernels loaded from the precompile' if pre else ''}): {report.get('compile_s', 0):.0f} s; "
              f"whole run {report.get('wall_s', 0):.0f} s"]
    lines += ["", f"masks bit-identical: {c.get('masks_bit_identical')}; 50-step rollout (fp32 ieee) rel. error "
              f"{c.get('rollout50_rel_error', float('nan')):.2e}", "", "## Throughput", "",
              "| model | provider | grid | G cell-updates/s | ms/step | vs reference | of memory floor | peak MB "
              "| first call s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("throughput", []):
        sp = f"{r['speedup_vs_reference']:.1f}x" if r.get("speedup_vs_reference") else "—"
        lines.append(f"| {r['model']} | {r['provider']} | {r['size']}² | {r['cell_updates_per_s'] / 1e9:.3f} | "
                     f"{r['s_per_step'] * 1e3:.3f} | {sp} | {r['fraction_of_memory_floor']:.2f} | "
                     f"{r['peak_memory_MB']:.0f} | {r['compile_s']:.1f} |")
    if report.get("interior_loads"):
        r0 = report["interior_loads"][0]
        lines += ["", f"## Interior loads (growing rollout step, {r0['grid']}; NCA_FAST_INTERIOR_LOADS, "
                  "@cap: NCA_FAST_REGISTER_CAP)", "",
                  "| loads | state | G cell-updates/s | vs plain | TMA used | bit-identical to plain | first call s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['loads']} | {r['dtype']} | {r['cell_updates_per_s'] / 1e9:.3f} | "
                  f"{r.get('speedup_vs_plain', float('nan')):.2f}x | {r['tma_used']} | {r['bit_identical_to_plain']} | "
                  f"{r['compile_s']:.1f} |"
                  for r in report["interior_loads"]]
    if report.get("decoders"):
        r0 = report["decoders"][0]
        lines += ["", f"## High-resolution output (texture model, {r0['grid']} grid -> {r0['output']})", "",
                  "| state | step ms | step + pixel-shuffle ms | ratio | step + LPPN (3x32, fp16) ms | LPPN frames/s |",
                  "|---|---|---|---|---|---|"]
        for r in report["decoders"]:
            lines.append(f"| {r['dtype']} | {r['plain_step_ms']:.3f} | {r['step_plus_pixel_shuffle_ms']:.3f} | "
                         f"{r['pixel_shuffle_ratio']:.2f} | {r['step_plus_lppn_ms']:.3f} | "
                         f"{r['lppn_frames_per_s']:.0f} |")
    if report.get("backward"):
        lines += ["", "## Training", "", "| model | MLP precision | gradient rel. error | bit-identical |",
                  "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['precision']} | {r['grad_rel_error']:.2e} | {r['bit_identical']} |"
                  for r in report["backward"]]
    if report.get("rollout_grad"):
        rg = report["rollout_grad"]
        lines += ["", f"8-step differentiable rollout (growing, ieee): gradient rel. error {rg['rel_error']:.2e}, "
                  f"bit-identical {rg['bit_identical']}, captured as CUDA graphs {rg['captured']}, equal to plain "
                  f"launches {rg['graphs_equal_launches']}"]
    if report.get("train"):
        lines += ["", train_table(report["train"])]
    return "\n".join(lines) + "\n"


def past_deadline(report, what: str) -> bool:
    """Whether the run is past its deadline (``what`` is then listed as not run)."""
    if time.time() < report.get("deadline", float("inf")):
        return False
    report.setdefault("skipped", []).append(what)
    print(f"gpu_check: past the deadline, {what} not run", flush=True)
    return True


OUT = None  # the output folder of this run (set by run_sections): checkpoint() writes there


def checkpoint(report) -> None:
    """The report on disk as it stands, mid-section (a run killed later keeps each measured row)."""
    if OUT is not None:
        write(report, OUT)


def write(report, out: Path) -> None:
    """gpu_check.json and gpu_check.md as they stand (after every section: a run killed later keeps
    what was measured)."""
    report["failures"] = failures(report)
    atomic_write_bytes(out / "gpu_check.json", json.dumps(report, indent=1).encode())
    atomic_write_bytes(out / "gpu_check.md", markdown(report).encode())


def run_sections(report, sections, out: Path) -> None:
    """Run ``sections`` (``(name, fn)`` pairs) in order: one that raises is recorded in
    ``report["errors"]`` with its traceback and the next runs (a GPU session's single call keeps every
    measurement that did not depend on the failure; after a CUDA error the rest fail fast); one that
    would start past ``report["deadline"]`` is listed as not run. The report is written after each."""
    global OUT
    OUT = out
    for name, fn in sections:
        if not past_deadline(report, name):
            t0 = time.time()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 (every failure is recorded, and fails the run)
                report.setdefault("errors", []).append({"section": name, "error": f"{type(e).__name__}: {e}",
                                                        "traceback": traceback.format_exc(limit=-12)})
                traceback.print_exc()
            report.setdefault("section_s", {})[name] = time.time() - t0
        write(report, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--quick", action="store_true", help="sizes 256 and 1024 only")
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny sizes")
    ap.add_argument("--deadline", type=float, default=None if DRY else 420.0,
                    help="seconds: sections (and throughput grid sizes) not started by then are skipped and "
                         "listed, so that one device call returns its results (default 420; none in a dry run)")
    ap.add_argument("--workers", type=int, default=2 if DRY else min(16, os.cpu_count() or 1),
                    help="processes compiling the kernels in parallel before the sections (0: none; "
                         "default: the CPU cores, at most 16; 2 in a dry run)")
    args = ap.parse_args()
    if args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")
    if not DRY and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (--dry-run runs it on the CPU)")
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "CPU (dry run, Triton interpreter)",
              "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    t0 = time.time()
    if args.deadline is not None:
        report["deadline_s"] = args.deadline
        report["deadline"] = t0 + args.deadline
    sizes = [16] if DRY else [256, 1024] if args.quick else [1024, 2048, 4096]
    steps = 2 if DRY else 10
    # (in the order the open goals need them: correctness, then the step's throughput, training,
    # the interior loads' default and the decoders)
    warmup = [("precompile", lambda: precompile(report, args.workers))] if args.workers else []
    run_sections(report, warmup + [("correctness", lambda: correctness(report)),
                          ("throughput", lambda: throughput(report, sizes, steps)),
                          ("training", lambda: training(report)),
                          ("interior_loads", lambda: interior_loads(report, steps)),
                          ("decoders", lambda: decoders(report))], args.out)
    report["wall_s"] = time.time() - t0
    write(report, args.out)
    print(markdown(report))
    if report["failures"]:
        sys.exit("gpu_check FAILED: " + "; ".join(report["failures"]))


if __name__ == "__main__":
    main()
