"""The ``nca_fast::fused_step`` torch op: one fused step as an operator that ``torch.compile``
(``fullgraph=True``) and CUDA graphs can hold."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from ..spec import NCASpec
from .config import step_config
from .launch import counter_tensor, launch_finalize, launch_step


@functools.lru_cache(maxsize=64)
def _spec_from_json(spec_json: str) -> NCASpec:
    return NCASpec.from_json(spec_json)


@torch.library.custom_op("nca_fast::fused_step", mutates_args=())
def fused_step_op(x: torch.Tensor, w1: torch.Tensor, wb: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, fscale: torch.Tensor, ctr: torch.Tensor, update_mask: Optional[torch.Tensor],
                  spec_json: str, fire_rate: float, row0: int, col0: int, precision: str) -> torch.Tensor:
    """One fused step of the NCA described by ``spec_json`` with packed weights (``pack.pack_step``
    in ``precision``); ``ctr`` = int64 [seed, step] on x's device. The result is channels-last (a
    contiguous NCHW ``x`` is converted on the way in)."""
    spec = _spec_from_json(spec_json)
    cfg = step_config(spec, precision)
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x)
    packed = (w1, wb, w2, b2, fscale)
    if cfg.ALIVE:
        y = torch.empty_like(x)
        pre = torch.empty(x.shape[0], x.shape[2], x.shape[3], dtype=torch.uint8, device=x.device)
        launch_step(cfg, spec, packed, x, None, y, pre, ctr, origin=(row0, col0), fire_rate=fire_rate,
                    update_mask=update_mask)
        launch_finalize(cfg, spec, y, pre, out)
    else:
        launch_step(cfg, spec, packed, x, None, out, None, ctr, origin=(row0, col0),
                    fire_rate=fire_rate, update_mask=update_mask)
    return out


@fused_step_op.register_fake
def _(x, w1, wb, w2, b2, fscale, ctr, update_mask, spec_json, fire_rate, row0, col0, precision):
    return torch.empty_like(x, memory_format=torch.channels_last)


def fused_step(spec: NCASpec, packed, x: torch.Tensor, *, seed: int, step: int,
               update_mask: Optional[torch.Tensor], fire_rate: float, origin: Tuple[int, int],
               precision: str) -> torch.Tensor:
    """One fused step of ``x`` (weights packed for ``precision``) through the op."""
    ctr = counter_tensor(seed, step, x.device)
    return fused_step_op(x, *packed, ctr, update_mask, spec.json, float(fire_rate),
                         int(origin[0]), int(origin[1]), precision)
