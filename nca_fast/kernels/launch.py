"""Launchers: a spec (or configuration), packed weights and tensors in, one kernel launch out.

Nothing here allocates state buffers or knows about modules; the op (``op.py``), the rollouts
(``rollout.py``) and the decode dispatch (``nca_fast.decoders.decode``) own the buffers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import rng
from ..spec import NCASpec
from . import decode as decode_kernels
from .config import PS_DECODE_TILE, HeadConfig, StepConfig, dot_types, lppn_launch
from .step import nca_finalize_kernel, nca_step_kernel


def grid_programs(n_tiles: int, device: torch.device) -> int:
    """Programs of a persistent grid: a few per SM on a GPU; one under the interpreter, which runs
    programs one after another anyway."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, sms * 4))


def _seed_word(seed: int) -> int:
    return seed - 2**64 if seed >= 2**63 else seed  # the same 64 bits as a signed int64


def counter_tensor(seed: int, step: int, device) -> torch.Tensor:
    """int64 [2] = (seed, base step): read by the kernel, so captured graphs can be re-pointed."""
    return torch.tensor([_seed_word(seed), step], dtype=torch.int64, device=device)


def i32(v: int) -> int:
    """``v`` mod 2**32 as a signed 32-bit kernel argument: Philox counters only see the low 32 bits."""
    return (int(v) + 2**31) % 2**32 - 2**31


def _clamp_args(spec: NCASpec):
    out = []
    for r in (spec.perception_clamp, spec.hidden_clamp, spec.update_clamp, spec.state_clamp):
        out += list(r) if r is not None else [0.0, 0.0]
    return out


def _tiles(cfg: StepConfig, shape) -> Tuple[int, int, int]:
    B, _, H, W = shape
    n_tw, n_th = -(-W // cfg.BW), -(-H // cfg.BH)
    return n_tw, n_th * n_tw, B * n_th * n_tw


def launch_step(cfg: StepConfig, spec: NCASpec, packed, src, src_pre, dst, dst_pre, ctr, *,
                step_offset: int = 0, origin=(0, 0), batch_offset: int = 0, fire_rate: float,
                update_mask: Optional[torch.Tensor] = None, pending: bool = False,
                head: Optional[HeadConfig] = None, head_weights=(), image=None) -> None:
    """One fused step ``src -> dst`` (and alive ``dst_pre`` for alive models). ``pending``: src is
    in the pending form (see kernels/step.py) with its alive bytes in ``src_pre``. ``head`` (models
    without alive masks only) also decodes ``dst`` into ``image`` in the same pass."""
    if head is not None and cfg.ALIVE:
        raise ValueError("an alive model's frame is decoded by launch_finalize (its true state)")
    H, W = src.shape[2], src.shape[3]
    n_tw, per_image, n_tiles = _tiles(cfg, src.shape)
    w1, b1, w2, b2 = packed
    dummy = dst_pre if dst_pre is not None else ctr
    mask = update_mask.contiguous().view(torch.uint8) if update_mask is not None else dummy
    dec_args = (image, *head_weights) if head is not None else (dummy,) * 5
    programs = grid_programs(n_tiles, src.device)
    nca_step_kernel[(programs,)](
        src, src_pre if src_pre is not None else dummy, dst, dst_pre if dst_pre is not None else dummy,
        mask, ctr, w1, b1, w2, b2, *dec_args,
        H, W, n_tw, per_image, n_tiles, -(-n_tiles // programs),
        step_offset, i32(origin[0]), i32(origin[1]), i32(batch_offset), rng.fire_threshold(fire_rate),
        float(spec.alive_threshold), float(spec.step_size), *_clamp_args(spec),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs(pending, update_mask is not None),
        **(dict(DECODE=True, **head.constexprs()) if head is not None else {}))


def launch_finalize(cfg: StepConfig, spec: NCASpec, src, src_pre, dst, head: Optional[HeadConfig] = None,
                    head_weights=(), image=None) -> None:
    """Pending form ``(src, src_pre)`` -> the true state in ``dst`` (and its frame with ``head``)."""
    H, W = src.shape[2], src.shape[3]
    n_tw, per_image, n_tiles = _tiles(cfg, src.shape)
    dec_args = (image, *head_weights) if head is not None else (dst,) * 5
    programs = grid_programs(n_tiles, src.device)
    nca_finalize_kernel[(programs,)](
        src, src_pre, dst, *dec_args, H, W, n_tw, per_image, n_tiles, -(-n_tiles // programs),
        float(spec.alive_threshold), **cfg.finalize_constexprs(),
        num_warps=4 if head is None else cfg.num_warps, num_stages=cfg.num_stages,
        **(dict(DECODE=True, **head.constexprs()) if head is not None else {}))


def launch_pixel_shuffle(head: HeadConfig, head_weights, precision: str, x: torch.Tensor, image: torch.Tensor) -> None:
    """Decode ``x [B, C, H, W]`` (float32, contiguous) into ``image [B, K, H*R, W*R]``."""
    B, C, H, W = x.shape
    BH, BW, warps = PS_DECODE_TILE
    n_tw, n_th = -(-W // BW), -(-H // BH)
    decode_kernels.pixel_shuffle_kernel[(B * n_th * n_tw,)](
        x, image, *head_weights, H, W, n_tw, n_th * n_tw, C=C, CP=head.CP, BH=BH, BW=BW,
        **head.constexprs(), **dict(zip(("DOT_T", "PREC"), dot_types(precision))), num_warps=warps, num_stages=1)


def launch_lppn(dspec, packed: dict, precision: str, x: torch.Tensor, image: torch.Tensor) -> None:
    """Decode ``x [B, C, H, W]`` into ``image [B, K, Ho, Wo]`` with the LPPN kernel."""
    B, C, H, W = x.shape
    Ho, Wo = image.shape[2], image.shape[3]
    xs = x.detach().to(torch.float32)
    # layer 0's state part per cell (exact: bilinear weights sum to 1), channels-last
    proj = torch.addmm(packed["state_b"], xs.permute(0, 2, 3, 1).reshape(-1, C), packed["state_w"].t())
    launch = lppn_launch(packed["hid"])
    grid = (-(-(Ho * Wo) // launch["BLOCK_P"]), B)
    dot_t, prec = dot_types(precision)
    decode_kernels.lppn_kernel[grid](
        proj, image, packed["w0"], packed["wh"], packed["bh"], packed["wo"], packed["bo"],
        H, W, Ho, Wo, dspec.out_channels, dspec.frequencies, dspec.layers - 1,
        int(dspec.padding == "circular"), HID=packed["hid"], BLOCK_P=launch["BLOCK_P"], DOT_T=dot_t, PREC=prec,
        num_warps=launch["num_warps"], num_stages=launch["num_stages"])
