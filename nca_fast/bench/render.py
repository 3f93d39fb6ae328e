"""High-resolution rendering benchmark: one NCA step plus one decoded frame per sample.

The texture model on a coarse grid, decoded at scale 8 by a pixel-shuffle head (linear, K=3) and by
the Cells-to-Pixels texture-size LPPN (3 sine layers of 32). On a GPU the grid is 480x270 (frames of
3840x2160); on a CPU a small grid keeps the default run quick. Pipelines:

* ``step``: the step alone (the baseline of the ratios);
* ``step+pixel_shuffle``: fused (the head runs in the step's own pass) or reference step + decode;
* ``step+lppn``: the step, then the LPPN decode (fused kernel in fp16 on the fused backend).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from ..decoders import build_decoder, decode, lppn_spec, pixel_shuffle_spec
from ..kernels.config import step_problem
from . import timing
from .cases import default_model, realistic_state

SCALE = 8
GPU_GRID, CPU_GRID = (270, 480), (24, 40)


def _pipelines(model, x, backend: str) -> Dict[str, Callable[[int], object]]:
    ps = build_decoder(pixel_shuffle_spec(model.spec.channels, scale=SCALE), init_seed=1).to(x.device)
    lppn = build_decoder(lppn_spec(model.spec.channels, scale=SCALE, hidden=32, layers=3),
                         init_seed=2).to(x.device)
    if backend == "triton":
        plain = model.fused_rollout(x.shape, x.dtype, steps=1)
        fused = model.fused_rollout(x.shape, x.dtype, steps=1, decoder=ps)
        if x.device.type == "cuda":
            plain.capture()
            fused.capture()
        return {"step": lambda k: plain(x, seed=0, start_step=k),
                "step+pixel_shuffle": lambda k: fused(x, seed=0, start_step=k),
                "step+lppn": lambda k: decode(lppn, plain(x, seed=0, start_step=k), backend="triton",
                                              precision="fp16")}
    step = lambda k: model.step(x, seed=0, step=k, backend=backend)
    return {"step": step,
            "step+pixel_shuffle": lambda k: decode(ps, step(k), backend=backend),
            "step+lppn": lambda k: decode(lppn, step(k), backend=backend)}


@torch.no_grad()
def run_render(device: torch.device, *, min_time: float = 0.5, log: Callable[[str], None] = print) -> List[dict]:
    """Rows: backend, pipeline, grid, output size, ms per frame, frames/s, output pixels/s, ratio to
    the step alone."""
    model = default_model("texture").to(device)
    H, W = GPU_GRID if device.type == "cuda" else CPU_GRID
    x = realistic_state(model, 1, max(H, W), device=device)[:, :, :H, :W].contiguous()
    backends = ["auto"] + (["triton"] if device.type == "cuda" and not step_problem(model.spec, x) else [])
    rows = []
    log(f"render ({W}x{H} grid, frames of {W * SCALE}x{H * SCALE}):")
    for backend in backends:
        times = {}
        for name, fn in _pipelines(model, x, backend).items():
            sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
            s = timing.measure(fn, device=device, sync=sync, warmup=2, min_time=min_time, max_time=10)
            times[name] = s.median
            rows.append({"backend": backend, "pipeline": name, "grid": f"{W}x{H}",
                         "output": f"{W * SCALE}x{H * SCALE}", "ms_per_frame": s.median * 1e3,
                         "frames_per_s": 1 / s.median,
                         "output_pixels_per_s": H * W * SCALE * SCALE / s.median,
                         "vs_step": s.median / times["step"]})
            log(f"  {backend:6s} {name:20s} {s.median * 1e3:9.3f} ms/frame")
    return rows


def markdown(rows: List[dict]) -> List[str]:
    if not rows:
        return []
    out = ["", f"## Rendering at scale {SCALE} (texture model; one step + one frame per sample)", "",
           "| backend | pipeline | grid | output | ms/frame | frames/s | output Mpixel/s | vs step |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['backend']} | {r['pipeline']} | {r['grid']} | {r['output']} | {r['ms_per_frame']:.3g} | "
                   f"{r['frames_per_s']:.3g} | {r['output_pixels_per_s'] / 1e6:.3g} | {r['vs_step']:.2f} |")
    return out
