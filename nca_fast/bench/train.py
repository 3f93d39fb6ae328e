"""``nca-fast bench --train``: one training iteration of Distill's growing setup, timed per backend.

An iteration is what :mod:`nca_fast.train` runs: a rollout of ``steps`` steps from a batch of states
(``batch`` x ``size``\u00b2), the RGBA loss against a target, the backward through every step,
per-parameter gradient normalisation and an Adam step. Each provider starts from the same weights
and inputs and runs the same iterations (the same update masks), so their loss curves are compared
as well as their times:

- ``reference``: ``model.rollout(..., backend="reference")``, the plain-PyTorch path;
- ``cpu``: ``model.rollout(..., backend="cpu")``, the CPU fast path and its backward (what
  ``backend="auto"`` trains with on a CPU when the reference's graph would not fit in memory);
- ``compile``: the same reference step under ``torch.compile`` (its backward by AOTAutograd), in the
  same loop with the same masks;
- ``triton``: ``model.rollout(..., backend="triton")``, the fused step and its fused backward (CUDA),
  the rollout's launches captured as CUDA graphs;
- ``triton-launches``: the same with ``model.cuda_graphs = False`` (each kernel launched): what the
  graphs save.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

from .. import reference, rng
from ..kernels.config import interpreting
from ..model import NCA
from ..train import normalise_gradients, rgba_loss
from .cases import realistic_state
from .runner import device_sync

TRAIN_PROVIDERS = ("reference", "cpu", "compile", "triton", "triton-launches")


def _iteration_fn(name: str, model: NCA, steps: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``rollout(x0, k) -> final state`` with gradients, for provider ``name``."""
    if name in ("reference", "cpu", "triton", "triton-launches"):
        model.cuda_graphs = name == "triton"
        backend = name if name in ("reference", "cpu") else "triton"
        return lambda x0, k: model.rollout(x0, steps, seed=k, backend=backend)
    spec = model.spec
    names = list(spec.parameter_shapes())

    def one(x, mask, *ps):
        return reference.step(x, dict(zip(names, ps)), spec, mask)

    compiled = torch.compile(one, dynamic=False)

    def rollout(x0, k):
        B, _, H, W = x0.shape
        x = x0
        for i in range(steps):
            mask = rng.update_mask(B, H, W, seed=k, step=i, fire_rate=spec.fire_rate, device=x0.device)
            x = compiled(x, mask, *(getattr(model, n) for n in names))
        return x
    return rollout


def unavailable(name: str, device: torch.device) -> str:
    if name.startswith("triton") and device.type != "cuda" and not interpreting():
        return "the fused path trains on CUDA (on a CPU, backend='auto' trains with the reference)"
    if name == "cpu" and device.type != "cpu":
        return "the CPU fast path runs on a CPU only"
    return ""


def run_train(model: NCA, device: torch.device, providers: Sequence[str] = TRAIN_PROVIDERS, *, steps: int = 64,
              batch: int = 8, size: int = 72, iterations: int = 3, warmup: int = 1,
              log: Callable[[str], None] = print) -> Dict[str, object]:
    """Time ``iterations`` training iterations (after ``warmup``) per provider; returns a report with
    each provider's seconds per iteration, forward cell-updates/s, speed-up over the reference and
    the largest relative difference of its losses from the reference's."""
    for p in providers:
        if p not in TRAIN_PROVIDERS:
            raise ValueError(f"unknown training provider {p!r}; known: {TRAIN_PROVIDERS}")
    if model.spec.alive_channel != 3:
        raise ValueError("the training benchmark trains a growing model (RGBA in channels 0-3, alpha alive)")
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, size, size, generator=g).to(device)
    x0 = realistic_state(model, batch, size, seed=1, device=device)
    sync = device_sync(device)
    rows: List[dict] = []
    for name in providers:
        why = unavailable(name, device)
        if why:
            rows.append({"provider": name, "skipped": why})
            log(f"train {name}: skipped ({why})")
            continue
        m = copy.deepcopy(model).to(device).requires_grad_(True)
        opt = torch.optim.Adam(m.parameters(), lr=2e-3)
        rollout = _iteration_fn(name, m, steps)
        losses, seconds = [], []
        for k in range(warmup + iterations):
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = rgba_loss(rollout(x0, k), target).mean()
            loss.backward()
            normalise_gradients(m.parameters())
            opt.step()
            sync()
            losses.append(float(loss.detach()))
            if k >= warmup:
                seconds.append(time.perf_counter() - t0)
        t = statistics.median(seconds)
        rows.append({"provider": name, "seconds": t, "min_seconds": min(seconds), "losses": losses,
                     "cell_updates_per_s": steps * batch * size * size / t})
        log(f"train {name}: {t:.3f} s/iteration, losses {', '.join(f'{v:.5f}' for v in losses)}")
    ref = next((r for r in rows if r["provider"] == "reference" and "seconds" in r), None)
    for r in rows:
        if ref is not None and "seconds" in r:
            r["speedup_vs_reference"] = ref["seconds"] / r["seconds"]
            r["loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"]))
    return {"steps": steps, "batch": batch, "size": size, "iterations": iterations, "warmup": warmup,
            "device": str(device), "rows": rows}


def train_table(report: Dict[str, object]) -> str:
    """The training benchmark as a markdown table."""
    head = (f"Training iteration: {report['steps']}-step rollout + backward + Adam, batch {report['batch']}, "
            f"{report['size']}x{report['size']}, median of {report['iterations']} "
            f"(after {report['warmup']} warm-up)\n\n"
            "| provider | s / iteration | forward cell-updates/s | vs reference | loss curve vs reference |\n"
            "|---|---|---|---|---|\n")
    lines = []
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['provider']} | skipped: {r['skipped']} | | | |")
            continue
        ratio = f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else "-"
        diff = f"{r['loss_rel_diff']:.1e} max rel." if "loss_rel_diff" in r else "-"
        lines.append(f"| {r['provider']} | {r['seconds']:.3f} | {r['cell_updates_per_s'] / 1e6:.2f} M | {ratio} | "
                     f"{diff} |")
    return head + "\n".join(lines) + "\n"
