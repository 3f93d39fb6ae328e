"""Launchers: a spec (or configuration), packed weights and tensors in, kernel launches out.

State tensors are ``[B, C, H, W]`` in channels-last memory (``torch.channels_last``). Nothing here
allocates state buffers or knows about modules; the op (``op.py``), the rollouts (``rollout.py``)
and the decode dispatch (``nca_fast.decoders.decode``) own the buffers.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch

from .. import rng
from ..spec import NCASpec
from . import decode as decode_kernels
from .config import (
    BACKWARD_BW,
    BACKWARD_WARPS,
    FP_FUSION,
    INT32_MAX,
    PERCEIVE_VJP_BW,
    REDUCE_BLOCK,
    HeadConfig,
    StepConfig,
    dot_types,
    lppn_launch,
    perceive_vjp_constexprs,
    ps_decode_launch,
)
from .step import nca_finalize_kernel, nca_step_kernel
from .step_backward import nca_step_backward_kernel, perceive_vjp_kernel, reduce_partials_kernel


def capability(device: torch.device) -> Tuple[int, int]:
    """The compute capability kernels compile for on ``device`` (the interpreter's CPU: Hopper's choices)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


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


def on_device(launcher):
    """Run ``launcher`` with the CUDA device of its first tensor argument current: Triton launches on
    the current device (and that device's current stream), not on its tensors' device, so a model on
    ``cuda:1`` would otherwise launch on ``cuda:0`` with ``cuda:1``'s pointers."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or not t.is_cuda:
            return launcher(*args, **kwargs)
        with torch.cuda.device(t.device):
            return launcher(*args, **kwargs)
    return run


# The most elements a launch of the step or finalize kernel may index: their border and finalize
# programs address cell * C in 32 bits (the interior kernel in 64), so a batch of more elements is
# launched in slices of images, each from its own base pointer (batch_offset keeps its masks).
MAX_LAUNCH_ELEMENTS = INT32_MAX


def batch_slices(B: int, per_image: int):
    """Slices of at most ``MAX_LAUNCH_ELEMENTS // per_image`` images covering ``range(B)``
    (``per_image`` <= the limit: ``config.step_problem``)."""
    n = max(1, MAX_LAUNCH_ELEMENTS // per_image)
    return [slice(b0, min(B, b0 + n)) for b0 in range(0, B, n)]


def _part(t: Optional[torch.Tensor], sl: slice) -> Optional[torch.Tensor]:
    return None if t is None else t[sl]


_DUMMIES: dict = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor of ``dtype`` for a pointer argument the launch leaves unused, typed as
    ``nca-fast kernels`` compiles that argument (a pointer's type is part of the compiled binary: the
    binary the report describes is the one that runs). Made once per device, before any capture."""
    key = (device, dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(16, dtype=dtype, device=device)
    return _DUMMIES[key]


def _no_head(state: torch.Tensor):
    """The decode head's arguments of a launch without one: frame and weights in the state's dtype,
    biases fp32 (as catalogue.py types them)."""
    f32 = _dummy(state.device, torch.float32)
    return state, state, f32, state, f32


def _clamp_args(spec: NCASpec):
    out = []
    for r in (spec.perception_clamp, spec.hidden_clamp, spec.update_clamp, spec.state_clamp):
        out += list(r) if r is not None else [0.0, 0.0]
    return out


def _check_channels_last(*states) -> None:
    for s in states:
        if not s.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"the fused kernels take channels-last states, got strides {s.stride()} for "
                             f"shape {tuple(s.shape)}")


def tma_descriptor(cfg: StepConfig, src: torch.Tensor):
    """A tensor descriptor of the channels-last state ``src`` as ``[B*H, W, C]`` in boxes of one
    interior tile's channel chunk, ``[1, BW, CC]`` (channels from C on read as zeros), or None where
    the interior loads plainly: LOADS is not "tma", the device has no tensor memory accelerator
    (before sm_90) or the strides are not multiples of 16 bytes (e.g. 12 fp16 channels)."""
    if cfg.LOADS != "tma":
        return None
    if capability(src.device) < (9, 0):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, C, H, W = src.shape
    if (C * src.element_size()) % 16 or src.data_ptr() % 16:
        return None
    return TensorDescriptor(src, [B * H, W, C], [W * C, C, 1], [1, cfg.BW, cfg.CC])


def regions(cfg: StepConfig, H: int, W: int, pending: bool) -> Tuple[int, int, int, int]:
    """(top, bot, left, right): the interior rectangle, the cells ``margin`` or more from the border,
    which the interior kernel steps in row tiles of ``BW`` (each row's last tile ends at ``right``,
    overlapping the one before); empty (top = bot = H) when the grid is too small for one tile."""
    m = cfg.margin(pending)
    if H - 2 * m < 1 or W - 2 * m < cfg.BW:
        return H, H, 0, W
    return m, H - m, m, W - m


def interior_tiles(cfg: StepConfig, B: int, top: int, bot: int, left: int, right: int) -> int:
    return B * (bot - top) * -(-(right - left) // cfg.BW)


def interior_programs(cfg: StepConfig, n_tiles: int, left: int, right: int, device: torch.device) -> int:
    """The interior kernel's grid: about ``grid_programs``, a multiple of the segments a row has, so
    that each program keeps one column of segments (step.py; a row wider than that many segments
    gets a program per segment). ``n_tiles`` is itself a multiple."""
    per_row = -(-(right - left) // cfg.BW)
    return min(n_tiles, per_row * max(1, grid_programs(n_tiles, device) // per_row))


@on_device
def launch_step(cfg: StepConfig, spec: NCASpec, packed, src, src_pre, dst, dst_pre, ctr, *,
                step_offset: int = 0, origin=(0, 0), batch_offset: int = 0, fire_rate: float,
                update_mask: Optional[torch.Tensor] = None, pending: bool = False,
                head: Optional[HeadConfig] = None, head_weights=(), image=None) -> None:
    """One fused step ``src -> dst`` (channels-last ``[B, C, H, W]`` tensors; ``dst_pre`` the alive
    bytes of alive models): the interior kernel, then the border kernel. ``pending``: src is in the
    pending form (see step.py) with its alive bytes in ``src_pre``. ``head`` (models without alive
    masks only) also decodes ``dst`` into ``image`` in the same pass."""
    if head is not None and cfg.ALIVE:
        raise ValueError("an alive model's frame is decoded by launch_finalize (its true state)")
    _check_channels_last(src, dst)
    B, C, H, W = src.shape
    slices = batch_slices(B, C * H * W)
    if len(slices) > 1:
        for sl in slices:
            launch_step(cfg, spec, packed, src[sl], _part(src_pre, sl), dst[sl], _part(dst_pre, sl), ctr,
                        step_offset=step_offset, origin=origin, batch_offset=batch_offset + sl.start,
                        fire_rate=fire_rate, update_mask=_part(update_mask, sl), pending=pending, head=head,
                        head_weights=head_weights, image=_part(image, sl))
        return
    top, bot, left, right = regions(cfg, H, W, pending)
    w1, wb, w2, b2, fscale = packed
    want = (2 if cfg.SPLIT else 1) * cfg.F * cfg.CP * cfg.HP
    if w1.numel() != want:
        raise ValueError(f"packed w1 holds {w1.numel()} values, the {cfg.PRECISION} step kernel reads {want}: "
                         "weights packed (pack.pack_step) for another precision or model")
    u8 = _dummy(src.device, torch.uint8)
    mask = update_mask.contiguous().view(torch.uint8) if update_mask is not None else u8
    dec_args = (image, *head_weights) if head is not None else _no_head(src)
    head_ce = dict(DECODE=True, **head.constexprs()) if head is not None else {}
    ring = top * W + (H - bot) * W + (bot - top) * (left + W - right)
    n_interior, n_ring = interior_tiles(cfg, B, top, bot, left, right), B * ring
    # (a fused pixel-shuffle head loads the interior with cp.async rather than TMA: the head's tiles
    # beside the boxes spilled, texture tf32 with a hidden head 16 B; STAGES stays 2: "prefetch")
    desc = tma_descriptor(cfg, src) if n_interior and head is None else None
    for interior, n_items, n_tiles in ((True, n_interior, n_interior),
                                       (False, n_ring, -(-n_ring // cfg.BORDER_BW))):
        if n_tiles == 0:
            continue
        programs = (interior_programs(cfg, n_tiles, left, right, src.device) if interior else
                    grid_programs(n_tiles, src.device))
        nca_step_kernel[(programs,)](
            src, src_pre if src_pre is not None else u8, dst, dst_pre if dst_pre is not None else u8,
            mask, ctr, desc if interior and desc is not None else src, w1, wb, w2, b2, fscale, *dec_args,
            H, W, n_items, -(-n_tiles // programs), top, bot, left, right,
            step_offset, i32(origin[0]), i32(origin[1]), i32(batch_offset), rng.fire_threshold(fire_rate),
            float(spec.alive_threshold), float(spec.step_size), *_clamp_args(spec),
            **cfg.launch_options(interior, head is not None), **FP_FUSION,
            **cfg.constexprs(pending, update_mask is not None, interior, tma=desc is not None), **head_ce)


class BackwardBuffers(NamedTuple):
    """The fused backward's scratch for batches of up to ``batch`` images of one size: ``gp`` (the
    perception gradients, a slab per hidden chunk), ``part`` (the tile streams' weight-gradient
    partial sums, zeroed: launches add into it), ``gd`` (dL/d(update) between the update and MLP
    passes, or None) and the number of tile streams."""
    batch: int
    gp: torch.Tensor
    part: torch.Tensor
    gd: Optional[torch.Tensor]
    streams: int


def backward_buffers(cfg: StepConfig, shape, device) -> BackwardBuffers:
    """Scratch for ``launch_step_backward`` on states of ``shape`` ``[B, C, H, W]`` (or fewer images)."""
    B, _, H, W = shape
    n = B * H * W
    n_tiles = -(-n // BACKWARD_BW)
    n_chunks = -(-cfg.HP // cfg.backward_chunk())  # programs per tile stream in the MLP pass
    # one wave: the backward keeps 2 CTAs an SM resident (nca-fast kernels), grid_programs plans 4
    streams = max(1, min(n_tiles, grid_programs(n_tiles, device) // 2 // n_chunks))
    F, CP, HP = cfg.F, cfg.CP, cfg.HP
    gp = torch.empty(n_chunks * n * F * CP, dtype=torch.float32, device=device)
    part = torch.zeros(streams, F * CP * HP + HP * CP + HP + CP, dtype=torch.float32, device=device)
    gd = torch.empty(n, CP, dtype=torch.float32, device=device) if 1 in cfg.backward_passes() else None
    return BackwardBuffers(B, gp, part, gd, streams)


@on_device
def launch_step_backward(cfg: StepConfig, spec: NCASpec, packed, x, life, g, gy, bufs: BackwardBuffers, ctr, *,
                         step_offset: int = 0, origin=(0, 0), batch_offset: int = 0, fire_rate: float,
                         update_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The backward of one (non-pending) step ``x -> y`` given ``g = dL/dy`` (fp32; both channels-last)
    and, for alive models, ``life`` (u8 ``[B, H, W]``, from ``launch_finalize``): writes ``gy`` (fp32
    channels-last like ``x``: the state gradient's residual path; may not be ``g``), adds the weight
    gradients' partial sums into ``bufs.part`` and returns the perception gradients
    ``[NCH, B, H, W, F*CP]`` (in ``bufs.gp``; padding channels unwritten) for ``launch_perceive_vjp``.
    ``packed``: fp32 weights."""
    _check_channels_last(x, g, gy)
    B, _, H, W = x.shape
    if B > bufs.batch:
        raise ValueError(f"launch_step_backward: {B} images, scratch for {bufs.batch}")
    if g.dtype != torch.float32 or gy.dtype != torch.float32:
        raise ValueError(f"launch_step_backward takes fp32 gradients, got {g.dtype} and {gy.dtype}")
    if g.data_ptr() == gy.data_ptr():  # (a stream's chunk programs read g after its chunk 0 wrote gy)
        raise ValueError("launch_step_backward: gy may not be g")
    n = B * H * W
    w1, wb, w2, b2, fscale = packed
    n_tiles = -(-n // BACKWARD_BW)
    n_chunks = -(-cfg.HP // cfg.backward_chunk())
    streams = min(bufs.streams, n_tiles)
    gp = bufs.gp[:n_chunks * n * cfg.F * cfg.CP].view(n_chunks, B, H, W, cfg.F * cfg.CP)
    u8 = _dummy(x.device, torch.uint8)
    mask = update_mask.contiguous().view(torch.uint8) if update_mask is not None else u8
    for pass_ in cfg.backward_passes():  # (one stream's part row gets gb2 from pass 1 and the rest from pass 2)
        nca_step_backward_kernel[(streams * (1 if pass_ == 1 else n_chunks),)](
            x, life if life is not None else u8, mask, ctr, g, w1, wb, w2, b2, fscale, gy, gp, bufs.part,
            bufs.gd if bufs.gd is not None else _dummy(x.device, torch.float32),
            H, W, n, -(-n_tiles // streams), step_offset, i32(origin[0]), i32(origin[1]), i32(batch_offset),
            rng.fire_threshold(fire_rate), float(spec.step_size), *_clamp_args(spec),
            num_warps=BACKWARD_WARPS, num_stages=1, **FP_FUSION,
            **cfg.backward_constexprs(update_mask is not None, pass_))
    return gp


def weight_gradient_buffers(cfg: StepConfig, device) -> Tuple[torch.Tensor, ...]:
    """fp32 buffers for the weight gradients in the packed weights' layouts: gW1 [(2,) F, CP, HP], its
    bias rows [(2,) 16, HP], gW2 [(2,) HP, CP], gb2 [CP] (the leading 2 with SPLIT)."""
    F, CP, HP = cfg.F, cfg.CP, cfg.HP
    split = (2,) if cfg.SPLIT else ()
    return tuple(torch.empty(split + shape, dtype=torch.float32, device=device)
                 for shape in ((F, CP, HP), (16, HP), (HP, CP))) + (torch.empty(CP, dtype=torch.float32,
                                                                               device=device),)


@on_device
def launch_reduce_partials(cfg: StepConfig, part: torch.Tensor, out=None):
    """The weight gradients (gW1, gW1's bias rows, gW2, gb2) in the packed weights' layouts, fp32 (into
    ``out``, buffers from ``weight_gradient_buffers``, when given): the rows of ``part`` added in a
    fixed order."""
    F, CP, HP = cfg.F, cfg.CP, cfg.HP
    grads = out if out is not None else weight_gradient_buffers(cfg, part.device)
    npart = part.shape[1]
    reduce_partials_kernel[(-(-npart // REDUCE_BLOCK),)](part, *grads, part.shape[0], F=F, CP=CP, HP=HP,
                                                        SPLIT=cfg.SPLIT, BLOCK=REDUCE_BLOCK, num_warps=4, num_stages=1,
                                                        **FP_FUSION)
    return grads


@on_device
def launch_perceive_vjp(cfg: StepConfig, gp: torch.Tensor, gy: torch.Tensor, fscale: torch.Tensor) -> torch.Tensor:
    """Add the transposed perception of ``gp`` (the backward's slabs, [NCH, B, H, W, F*CP] fp32) into
    ``gy`` (fp32 ``[B, C, H, W]`` channels-last) in place; returns ``gy``, now dL/dx."""
    _check_channels_last(gy)
    B, _, H, W = gy.shape
    n = B * H * W
    bw = PERCEIVE_VJP_BW
    perceive_vjp_kernel[(-(-n // bw),)](
        gp, tap_table(cfg, gy.device), fscale, gy, H, W, n,
        **perceive_vjp_constexprs(cfg, gp.shape[0]), num_warps=4, num_stages=1, **FP_FUSION)
    return gy


_TAP_TABLES: dict = {}


def tap_table(cfg: StepConfig, device) -> torch.Tensor:
    """``cfg.TAPS`` as a [9, F] fp32 tensor on ``device`` (built once): the transposed perception
    loops over the taps at run time."""
    key = (cfg.TAPS, cfg.F, str(device))
    if key not in _TAP_TABLES:
        _TAP_TABLES[key] = torch.tensor(cfg.TAPS, dtype=torch.float32).view(cfg.F, 9).t().contiguous().to(device)
    return _TAP_TABLES[key]


@on_device
def launch_finalize(cfg: StepConfig, spec: NCASpec, src, src_pre, dst, head: Optional[HeadConfig] = None,
                    head_weights=(), image=None, life: Optional[torch.Tensor] = None) -> None:
    """Pending form ``(src, src_pre)`` -> the true state in ``dst`` (and its frame with ``head``; each
    cell's alive decision in ``life``, u8 ``[B, H, W]``, when given)."""
    _check_channels_last(src, dst)
    B, C, H, W = src.shape
    slices = batch_slices(B, C * H * W)
    if len(slices) > 1:
        for sl in slices:
            launch_finalize(cfg, spec, src[sl], src_pre[sl], dst[sl], head, head_weights, _part(image, sl),
                            _part(life, sl))
        return
    n_items = B * H * W
    n_tiles = -(-n_items // cfg.BW)
    dec_args = (image, *head_weights) if head is not None else _no_head(dst)
    programs = grid_programs(n_tiles, src.device)
    nca_finalize_kernel[(programs,)](
        src, src_pre, dst, life if life is not None else src_pre, *dec_args, H, W, n_items, -(-n_tiles // programs),
        float(spec.alive_threshold), **cfg.finalize_constexprs(), LIFE=life is not None,
        num_warps=4 if head is None else cfg.num_warps, num_stages=cfg.num_stages, **FP_FUSION,
        **(dict(DECODE=True, **head.constexprs()) if head is not None else {}))


@on_device
def launch_pixel_shuffle(head: HeadConfig, head_weights, precision: str, x: torch.Tensor, image: torch.Tensor) -> None:
    """Decode ``x [B, C, H, W]`` (float32, channels-last) into ``image [B, K, H*R, W*R]``."""
    B, C, H, W = x.shape
    tile = ps_decode_launch(head, precision, capability(x.device))
    BH, BW = tile["BH"], tile["BW"]
    n_tw, n_th = -(-W // BW), -(-H // BH)
    decode_kernels.pixel_shuffle_kernel[(B * n_th * n_tw,)](
        x, image, *head_weights, H, W, n_tw, n_th * n_tw, C=C, CP=head.CP, BH=BH, BW=BW,
        **{**head.constexprs(), "NB": tile["NB"]}, DHC=tile["DHC"],
        **dict(zip(("DOT_T", "PREC"), dot_types(precision))), num_warps=tile["num_warps"], num_stages=1,
        **FP_FUSION)


@on_device
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
        num_warps=launch["num_warps"], num_stages=launch["num_stages"], **FP_FUSION)
