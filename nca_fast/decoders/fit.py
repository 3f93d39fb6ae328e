"""fit_decoder: train a decoder for a frozen NCA so that its grown state renders a target image."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..media import load_image
from .build import build_decoder
from .lppn import lppn_inputs, siren
from .spec import DecoderSpec, lppn_spec, pixel_shuffle_spec


class FitResult(NamedTuple):
    decoder: torch.nn.Module
    losses: List[float]      # MSE per optimisation step
    target: torch.Tensor     # [1, K, H*s, W*s] the resized target
    states: torch.Tensor     # [n_states, C, H, W] the frozen NCA states it was fitted on


def _as_target(image) -> torch.Tensor:
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a path or a [K, H, W] tensor, got {type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float [K, H, W] tensor, got {image.dtype} {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError(f"image has {int((~torch.isfinite(image)).sum())} NaN or inf values")
    return image.float()


def fit_decoder(model, image, scale: int, *, kind: str = "lppn", spec: Optional[DecoderSpec] = None,
                decoder=None, grid: Optional[Tuple[int, int]] = None, grow_steps: int = 128,
                n_states: int = 4, state_stride: int = 8, seed: int = 0, steps: int = 400,
                lr: Optional[float] = None, hidden: Optional[int] = None,
                layers: Optional[int] = None, frequencies: int = 0, padding: Optional[str] = None,
                callback: Optional[Callable[[int, float], None]] = None) -> FitResult:
    """Fit a decoder (``kind`` "lppn" or "pixel_shuffle", or ``spec``/``decoder`` to start from).

    The NCA grows from its seed on a ``grid`` (default: image size / ``scale``) for ``grow_steps``
    steps (seed ``seed``, reference backend); the last ``n_states`` states, ``state_stride`` steps
    apart, are frozen, so the decoder learns to render the stationary regime rather than one frame.
    Adam minimises the MSE between decoded states and the target resized (antialiased bilinear) to
    ``H*s x W*s``, with cosine learning-rate decay; the output bias starts at the target's mean
    colour. ``callback(step, loss)`` is called after every step.
    """
    target = _as_target(image)
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}")
    for what, v in (("steps", steps), ("grow_steps", grow_steps), ("n_states", n_states),
                    ("state_stride", state_stride)):
        if not isinstance(v, int) or v < (0 if what in ("steps", "grow_steps") else 1):
            raise ValueError(f"{what} must be a non-negative int, got {v!r}")
    if n_states > 1 and (n_states - 1) * state_stride > grow_steps:
        raise ValueError(f"{n_states} states {state_stride} steps apart need grow_steps (--grow-steps) >= "
                         f"{(n_states - 1) * state_stride}, got {grow_steps}")
    K, Hi, Wi = target.shape
    H, W = grid if grid is not None else (max(1, round(Hi / scale)), max(1, round(Wi / scale)))
    C = model.spec.channels
    if decoder is None:
        if spec is None:
            pad = padding or (model.spec.padding if model.spec.padding != "zeros" else "replicate")
            if kind == "lppn":
                spec = lppn_spec(C, scale, K, hidden or 32, 3 if layers is None else layers,
                                 padding=pad, frequencies=frequencies)
            elif kind == "pixel_shuffle":
                spec = pixel_shuffle_spec(C, scale, K, hidden or 0)
            else:
                raise ValueError(f"kind must be 'lppn' or 'pixel_shuffle', got {kind!r}")
        decoder = build_decoder(spec, init_seed=seed)
    spec = decoder.spec
    if (spec.channels, spec.out_channels, spec.scale) != (C, K, scale):
        raise ValueError(f"decoder has (channels, out, scale) = {(spec.channels, spec.out_channels, spec.scale)}, "
                         f"need {(C, K, scale)}")
    device = model.w1.device
    decoder = decoder.to(device)
    target = F.interpolate(target[None].to(device), size=(H * scale, W * scale), mode="bilinear",
                           align_corners=False, antialias=True).clamp(0, 1)

    with torch.no_grad():
        x = model.seed(1, H, W, device=device)
        states = [x] if grow_steps == 0 else [s.clone() for _, s in model.frames(
            x, grow_steps, seed=seed, every=state_stride if n_states > 1 else grow_steps,
            backend="reference")]
        states = torch.cat(states[-n_states:])
        last = f"w{spec.layers}", f"b{spec.layers}"
        mean = target.mean(dim=(0, 2, 3))
        getattr(decoder, last[1]).copy_(mean.repeat_interleave(spec.head_outputs // K))
    lr = lr if lr is not None else (2e-3 if spec.kind == "lppn" else 1e-2)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    tgt = target.expand(states.shape[0], -1, -1, -1)
    if spec.kind == "lppn":  # the interpolated inputs do not depend on the weights: build them once
        inputs = lppn_inputs(states, spec, spec.output_size(H, W))
        tgt = tgt.permute(0, 2, 3, 1)
        render = lambda: siren(inputs, decoder.params(), spec)
    else:
        render = lambda: decoder(states)
    losses: List[float] = []
    decoder.train()
    for i in range(steps):
        loss = F.mse_loss(render(), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if callback is not None:
            callback(i, losses[-1])
    decoder.eval()
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None or not all(torch.isfinite(p).all() for p in decoder.parameters()):
        raise FloatingPointError(f"the fit diverged (loss {losses[bad] if bad is not None else 'finite'} at step "
                                 f"{bad if bad is not None else steps}, weights no longer finite); try a smaller lr")
    return FitResult(decoder, losses, target, states)
