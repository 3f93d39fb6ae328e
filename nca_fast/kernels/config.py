"""What selects a compiled kernel: the constexprs and launch shapes of the step, finalize and decode
kernels, and whether the fused path can run a given model and state at all."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton.language as tl

from ..precision import PRECISIONS
from ..spec import NCASpec

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CHANNELS, MAX_HIDDEN = 64, 256
PAD_CODES = {"zeros": 0, "circular": 1, "replicate": 2}
APAD_CODES = {"ignore": 0, "circular": 1, "replicate": 2}


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET, parsed as Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


def kernel_precision(precision: str) -> str:
    """The precision a kernel is compiled for: the interpreter has no bf16 arithmetic, so there a
    bf16 state runs its MLP in fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return "ieee" if precision == "bf16" and interpreting() else precision


def dot_types(precision: str):
    """(operand dtype, ``input_precision``) of ``tl.dot`` for a precision. "ieee" runs fp32 operands
    as three TF32 passes on tensor cores (about fp32 accuracy) instead of on the FP32 units."""
    return {"tf32": (tl.float32, "tf32"), "ieee": (tl.float32, "tf32x3"), "fp16": (tl.float16, "tf32"),
            "bf16": (tl.bfloat16, "tf32")}[precision]


def device_problem(x: torch.Tensor) -> str:
    """Why no fused kernel can run on ``x``'s device ('' when one can)."""
    if x.device.type == "cuda":
        cap = torch.cuda.get_device_capability(x.device)
        if cap < (8, 0):
            return f"the fused kernels need compute capability >= 8.0, {x.device} has {cap}"
        return ""
    if x.device.type == "cpu" and interpreting():
        return ""
    return (f"state on {x.device.type}: the fused kernels need CUDA "
            "(or CPU tensors under TRITON_INTERPRET=1)")


def step_problem(spec: NCASpec, x: torch.Tensor) -> str:
    """Why the fused step cannot run ``spec`` on state ``x`` ('' when it can)."""
    problem = device_problem(x)
    if problem:
        return problem
    if x.dtype not in KERNEL_DTYPES:
        return f"state dtype {x.dtype} (the fused kernels take float32, float16 or bfloat16)"
    if not 1 <= spec.channels <= MAX_CHANNELS:
        return f"{spec.channels} channels (the fused kernels take 1-{MAX_CHANNELS})"
    if not 1 <= spec.hidden <= MAX_HIDDEN:
        return f"hidden width {spec.hidden} (the fused kernels take 1-{MAX_HIDDEN})"
    if spec.channels * x.shape[2] * x.shape[3] >= 2**31:
        return f"a {spec.channels}x{x.shape[2]}x{x.shape[3]} image exceeds the kernels' 32-bit indexing"
    return ""


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def bytes_per_cell_update(spec: NCASpec, dtype: torch.dtype) -> int:
    """The memory floor of one cell-update: the state read once and written once."""
    return 2 * spec.channels * torch.empty((), dtype=dtype).element_size()


# ---- the step ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepConfig:
    """Everything that selects one compiled step kernel (constexprs) plus its launch shape."""

    C: int
    CP: int
    HP: int
    F: int
    NG: int  # filter groups of four
    TAPS: Tuple[float, ...]  # [NG*4 filters][9 taps], zero padded
    LOADS: Tuple[int, ...]  # [NG][9]: 0 nothing to load, 1 the neighbour's state, 2 only its alpha
    PAD: int
    APAD: int
    ALPHA: int
    ALIVE: bool
    HAS_B1: bool
    HAS_B2: bool
    P_CLAMP: bool
    H_CLAMP: bool
    U_CLAMP: bool
    S_CLAMP: bool
    PRECISION: str
    BH: int
    BW: int
    num_warps: int
    # No software pipelining across the persistent loop's tiles: with 2 stages Triton double-buffers
    # all nine neighbour loads and the weights in shared memory (160-680 KB: beyond a Hopper SM's
    # 227 KB for the larger configurations); with 1 the growing model's step needs 8 KB.
    num_stages: int = 1

    def dot_constexprs(self) -> dict:
        dot_t, prec = dot_types(self.PRECISION)
        return dict(DOT_T=dot_t, PREC=prec)

    def constexprs(self, pending: bool, has_mask: bool) -> dict:
        d = {k: getattr(self, k) for k in ("C", "CP", "HP", "F", "NG", "TAPS", "LOADS", "PAD", "APAD", "ALPHA", "ALIVE",
                                           "HAS_B1", "HAS_B2", "P_CLAMP", "H_CLAMP", "U_CLAMP",
                                           "S_CLAMP", "BH", "BW")}
        d.update(PENDING=pending and self.ALIVE, HAS_MASK=has_mask, **self.dot_constexprs())
        return d

    def finalize_constexprs(self) -> dict:
        return dict(C=self.C, CP=self.CP, ALPHA=self.ALPHA, PAD=self.PAD, APAD=self.APAD, BH=self.BH, BW=self.BW,
                    **self.dot_constexprs())


def tile_shape(CP: int, HP: int) -> Tuple[int, int, int]:
    """(BH, BW, num_warps): 32 cells along a row keep each channel's loads in whole 128-byte lines;
    M = BH*BW cells are sized so the fp32 hidden accumulator [M, HP] stays at <= 64 registers per
    thread (M*HP <= 64 * 32 * num_warps)."""
    M = 128 if HP <= 128 else 64
    if CP >= 64 and HP >= 128:
        M = 64
    num_warps = 4 if M * HP <= 8192 else 8
    return M // 32, 32, num_warps


def step_config(spec: NCASpec, precision: str) -> StepConfig:
    """The step kernel configuration for ``spec`` with its MLP in ``precision``."""
    CP, HP = pow2(spec.channels), pow2(spec.hidden)
    BH, BW, warps = tile_shape(CP, HP)
    NG = -(-spec.n_filters // 4)
    taps = [float(v) for f in spec.filters for row in f.taps for v in row]
    taps += [0.0] * (NG * 36 - len(taps))
    alive = spec.alive_channel is not None
    loads = []
    for g in range(NG):
        for k in range(9):
            has_tap = any(taps[(4 * g + f) * 9 + k] != 0.0 for f in range(4))
            loads.append(1 if has_tap else (2 if alive and g == 0 else 0))
    return StepConfig(
        C=spec.channels, CP=CP, HP=HP, F=spec.n_filters, NG=NG, TAPS=tuple(taps), LOADS=tuple(loads),
        PAD=PAD_CODES[spec.padding], APAD=APAD_CODES[spec.alive_pool_padding], ALPHA=spec.alive_channel if alive else 0,
        ALIVE=alive, HAS_B1=spec.hidden_bias, HAS_B2=spec.update_bias,
        P_CLAMP=spec.perception_clamp is not None, H_CLAMP=spec.hidden_clamp is not None,
        U_CLAMP=spec.update_clamp is not None, S_CLAMP=spec.state_clamp is not None,
        PRECISION=kernel_precision(precision), BH=BH, BW=BW, num_warps=warps)


# ---- the decoders -----------------------------------------------------------------------------
DECODE_MAX_CHANNELS = 128  # decoder input channels (the state tile [cells, CP] is one dot operand)
DECODE_MAX_HIDDEN = 128
LPPN_MAX_OUT = 16  # = decode.K_PAD
LPPN_HIDDEN_SIZES = (32, 64, 128)  # padded hidden widths the LPPN kernel is specialised for
INT32_MAX = 2**31 - 1


def out_size(dspec, H: int, W: int, size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """The decoded image size: the decoder's scale, or ``size`` (pixel shuffle: only its own)."""
    if size is None:
        return dspec.output_size(H, W)
    Ho, Wo = (int(v) for v in size)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"output size must be positive, got {tuple(size)}")
    if dspec.kind == "pixel_shuffle" and (Ho, Wo) != dspec.output_size(H, W):
        raise ValueError(f"a pixel_shuffle decoder renders exactly {dspec.output_size(H, W)}, "
                         f"got size={(Ho, Wo)}")
    return Ho, Wo


def decode_problem(dspec, x: torch.Tensor, size=None) -> str:
    """Why the fused decode cannot run decoder spec ``dspec`` on ``x`` ('' when it can)."""
    problem = device_problem(x)
    if problem:
        return problem
    if x.dtype not in KERNEL_DTYPES:
        return f"state dtype {x.dtype} (kernels take float32/float16/bfloat16)"
    if dspec.channels > DECODE_MAX_CHANNELS:
        return f"{dspec.channels} input channels > {DECODE_MAX_CHANNELS}"
    if dspec.hidden > DECODE_MAX_HIDDEN:
        return f"hidden width {dspec.hidden} > {DECODE_MAX_HIDDEN}"
    if dspec.kind == "lppn" and dspec.out_channels > LPPN_MAX_OUT:
        return f"{dspec.out_channels} output channels > {LPPN_MAX_OUT}"
    B, C, H, W = x.shape
    Ho, Wo = out_size(dspec, H, W, size)
    if max(B * C * H * W, B * dspec.out_channels * Ho * Wo, 2 * Ho * H + Ho, 2 * Wo * W + Wo,
           H * W * 128) > INT32_MAX:
        return "grid or image too large for 32-bit indexing"
    return ""


def lppn_launch(hid: int) -> dict:
    """BLOCK_P / num_warps for a padded hidden width (keeps the [BLOCK_P, HID] tiles in registers)."""
    return {32: dict(BLOCK_P=128, num_warps=4, num_stages=2), 64: dict(BLOCK_P=128, num_warps=8, num_stages=2),
            128: dict(BLOCK_P=64, num_warps=8, num_stages=1)}[hid]  # 2 stages: 256 KB of smem


@dataclass(frozen=True)
class HeadConfig:
    """The pixel-shuffle head's constexprs (``pixel_shuffle.pixel_shuffle_out``) for a model of
    ``CP`` padded channels: hidden width DH (0: linear head), NB outputs per dot, NPAD padded."""

    CP: int
    R: int
    K: int
    N: int
    DH: int
    NPAD: int
    NB: int

    def constexprs(self) -> dict:
        return dict(R=self.R, K=self.K, N=self.N, DH=self.DH, NPAD=self.NPAD, NB=self.NB)


def head_config(dspec, CP: int) -> HeadConfig:
    N = dspec.head_outputs
    NB = min(64, pow2(N))
    return HeadConfig(CP=CP, R=dspec.scale, K=dspec.out_channels, N=N, DH=pow2(dspec.hidden) if dspec.layers else 0,
                      NPAD=-(-N // NB) * NB, NB=NB)


def head_problem(dspec, spec: NCASpec, shape) -> str:
    """Why a decoder cannot run as the step's epilogue for ``spec`` on states of ``shape``."""
    if dspec.kind != "pixel_shuffle":
        return f"only pixel_shuffle decoders fuse into the step, got {dspec.kind!r}"
    if dspec.channels != spec.channels:
        return f"decoder takes {dspec.channels} channels, the model has {spec.channels}"
    if dspec.layers and dspec.hidden > DECODE_MAX_HIDDEN:
        return f"fused pixel-shuffle heads take hidden <= {DECODE_MAX_HIDDEN}, got {dspec.hidden}"
    B, _, H, W = shape
    R = dspec.scale
    if B * dspec.out_channels * H * R * W * R > INT32_MAX:
        return (f"a {dspec.out_channels}x{H * R}x{W * R} frame exceeds the fused epilogue's 32-bit indexing; "
                "decode in tiles of the grid")
    return ""


PS_DECODE_TILE = (2, 32, 4)  # (BH, BW, num_warps) of the decode-only pixel-shuffle kernel
