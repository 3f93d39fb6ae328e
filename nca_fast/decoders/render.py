"""Rendering rollouts through a decoder."""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import torch


def render_frames(model, decoder, x: torch.Tensor, steps: int, *, every: int = 1, seed: int = 0,
                  backend: str = "auto", size=None,
                  precision: str = "fp32") -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(steps_done, image [B, K, Ho, Wo])`` after every ``every``-th step of ``model.frames``.

    ``backend`` drives both the steps and the decode. On the fused path a pixel-shuffle decoder runs
    in the same pass as the step (``nca_fast.ops.fused_render``): its image has the state's dtype, is
    computed with the step's MLP precision (``model.fp32_matmul``), and its buffer is reused by the
    next frame (copy it to keep it). Arguments are checked at the call.
    """
    from ..ops import fused_render
    from ..ops_decode import PRECISIONS

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if decoder.spec.channels != model.spec.channels:
        raise ValueError(f"decoder takes {decoder.spec.channels} channels, the model has "
                         f"{model.spec.channels}")
    decoder.check_state(x)
    frames = model.frames(x, steps, seed=seed, every=every, backend=backend)  # checks the rest
    fusable = (decoder.spec.kind == "pixel_shuffle" and size is None and precision == "fp32"
               and decoder.spec.hidden <= 128 and x.dtype != torch.float64)
    if fusable and model._resolve_backend(backend, x) == "triton":
        return fused_render(model, decoder, x, steps, seed=seed, every=every)
    return _decoded(frames, decoder, backend, size, precision)


def _decoded(frames, decoder, backend, size, precision):
    from ..ops_decode import decode

    for k, state in frames:
        yield k, decode(decoder, state, backend=backend, size=size, precision=precision)


def to_uint8(image: torch.Tensor, channels: Sequence[int] = (0, 1, 2)) -> torch.Tensor:
    """``[B, K, H, W]`` float image -> ``[B, H, W, len(channels)]`` uint8 (clipped to [0, 1])."""
    if image.dim() != 4 or max(channels) >= image.shape[1]:
        raise ValueError(f"image must be [B, K, H, W] with K > {max(channels)}, got {tuple(image.shape)}")
    img = image[:, list(channels)].float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).contiguous()
