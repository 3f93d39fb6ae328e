"""Rendering rollouts through a decoder."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch

from ..kernels.config import head_problem
from ..kernels.rollout import fused_stream
from .decode import check_precision, decode


def render_frames(model, decoder, x: torch.Tensor, steps: int, *, every: int = 1, seed: int = 0,
                  start_step: int = 0, backend: str = "auto", size=None,
                  precision: Optional[str] = None) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(steps_done, image [B, K, Ho, Wo])`` after every ``every``-th step of ``model.frames``.

    ``backend`` drives both the steps and the decode. On the fused path a pixel-shuffle decoder runs
    in the same pass as the step when ``precision`` is None or the step's own
    (``model.precision(x.dtype)``): its image has the state's dtype and its buffer is reused by the
    next frame (copy it to keep it). Otherwise each frame is decoded by :func:`decode` in
    ``precision`` ("ieee" when None). Arguments are checked at the call.
    """
    if precision is not None:
        check_precision(precision)
    decoder.check_state(x)
    if decoder.spec.channels != model.spec.channels:
        raise ValueError(f"decoder takes {decoder.spec.channels} channels, the model has "
                         f"{model.spec.channels}")
    frames = model.frames(x, steps, seed=seed, start_step=start_step, every=every, backend=backend)
    fusable = (size is None and x.dtype != torch.float64 and precision in (None, model.precision(x.dtype))
               and not head_problem(decoder.spec, model.spec, x.shape))
    if fusable and model._choose(backend, x, needs_grad=False) == "triton":
        r = model.fused_rollout(x.shape, x.dtype, steps, decoder=decoder)
        return (item[::2] for item in fused_stream(r, x, seed=seed, start_step=start_step, every=every))
    return _decoded(frames, decoder, backend, size, precision or "ieee")


def _decoded(frames, decoder, backend, size, precision):
    for k, state in frames:
        yield k, decode(decoder, state, backend=backend, size=size, precision=precision)


def to_uint8(image: torch.Tensor, channels: Sequence[int] = (0, 1, 2)) -> torch.Tensor:
    """``[B, K, H, W]`` float image -> ``[B, H, W, len(channels)]`` uint8 (clipped to [0, 1])."""
    if image.dim() != 4 or max(channels) >= image.shape[1]:
        raise ValueError(f"image must be [B, K, H, W] with K > {max(channels)}, got {tuple(image.shape)}")
    img = image[:, list(channels)].float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).contiguous()
