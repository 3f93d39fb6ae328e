"""What selects a compiled kernel: the constexprs and launch shapes of the step, finalize and decode
kernels, and whether the fused path can run a given model and state at all."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
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
# How interior tiles load their 9 neighbours (NCA_FAST_INTERIOR_LOADS): "plain" (global loads issued
# when the tile starts: the default, the budgets of `nca-fast kernels` are set on it), "prefetch"
# (Triton's software pipeline issues the next tile's loads as cp.async copies to shared memory while
# this tile computes), "tma" (the same, each neighbour's [64, 16] box copied by the tensor memory
# accelerator; sm_90 and later, channels-last strides that are multiples of 16 bytes; else
# "prefetch"). Compiled for sm_90a (triton 3.9): growing fp16 rollout step 33.2 / 34.9 / 40.8
# warp-instructions a cell, 8 / 7 / 25 barriers a tile, 4 / 4 / 3 CTAs an SM: the copies trade
# instructions for latency, which only a GPU can weigh (benchmarks/gpu_check.py times all three).
# Models of up to 16 channels only (one perception chunk): a wider tile's copies outgrow shared
# memory (64 x 256: 330-670 KB) or spill (32 x 64 with TMA); they load plainly.
INTERIOR_LOADS = ("plain", "prefetch", "tma")


def interior_loads() -> str:
    """The interior tiles' loads as ``NCA_FAST_INTERIOR_LOADS`` asks (default "plain")."""
    loads = os.environ.get("NCA_FAST_INTERIOR_LOADS", "plain").strip().lower() or "plain"
    if loads not in INTERIOR_LOADS:
        raise ValueError(f"NCA_FAST_INTERIOR_LOADS must be one of {INTERIOR_LOADS}, got {loads!r}")
    return loads


def register_cap_setting() -> Optional[int]:
    """``NCA_FAST_REGISTER_CAP``: a ptxas register cap for every step kernel (a multiple of 8 from 32
    to 255), instead of ``register_cap``'s rule; unset: the rule. For weighing occupancy against
    spills on a GPU (``benchmarks/gpu_check.py`` times the growing rollout capped at 128)."""
    raw = os.environ.get("NCA_FAST_REGISTER_CAP", "").strip()
    if not raw:
        return None
    cap = int(raw) if raw.isdigit() else -1
    if not 32 <= cap <= 255 or cap % 8:
        raise ValueError(f"NCA_FAST_REGISTER_CAP must be a multiple of 8 from 32 to 255, got {raw!r}")
    return cap


BW = 64  # interior cells per tile: one row segment; wgmma's M of one warpgroup
BORDER_BW = 32  # ring cells per border tile (64 from 64 channels): fewer registers for the wrapped address math
CHANNEL_CHUNK = 16  # input channels per perception pass (layer 1's K loop)
# The backward: a program per (tile stream, hidden chunk), so that each holds one chunk's weight-gradient
# sums (32 registers a thread). 64-cell tiles on 4 warps: wgmma's M for the recomputed forward; 16- and
# 32-cell tiles cost 1.8-3x the instructions per cell, 8 warps replicate the per-tile tensors, 128 cells spill.
BACKWARD_BW = 64
BACKWARD_WARPS = 4
BACKWARD_HC = 64  # hidden units per program: M of its weight-gradient dots (hidden units along M)
# Every launch and every compile asks for fused multiply-adds: the default until triton 3.9 (which warns
# that 3.10 turns it off), and what the instruction counts and tolerances were measured with.
FP_FUSION = dict(enable_fp_fusion=True)
REDUCE_BLOCK = 1024  # weight-gradient entries per program of the partial sums' reduction
PERCEIVE_VJP_BW = 64  # cells per program of the transposed perception (128: -14 % instructions, but sm_80 spills)
W_RESIDENT_BYTES = 96 * 1024  # weights up to this size stay in shared memory for the whole launch
_STATES = {"tf32": "fp32", "ieee": "fp32", "fp16": "fp16", "bf16": "bf16"}
_PERC_T = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}


@dataclass(frozen=True)
class StepConfig:
    """Everything that selects one compiled step kernel (constexprs) plus its launch shape."""

    C: int
    CP: int
    HP: int
    F: int
    TAPS: Tuple[float, ...]  # [F][9] taps / FSCALE[f]
    FSCALE: Tuple[float, ...]  # [F] each filter's scale (folded into the taps, or a runtime argument: step.py)
    NEEDS: Tuple[int, ...]  # [9] 1 where some filter has a tap (the centre: the residual; all: alive pool)
    PAD: int
    APAD: int
    ALPHA: int
    ALIVE: bool
    HAS_B1: bool
    HAS_B2: bool
    P_CLAMP: bool
    H_CLAMP: int  # 0: none; 1: clamp(h, lo, hi); 2: min(h, hi) (lo <= 0 does nothing after the ReLU)
    U_CLAMP: bool
    S_CLAMP: bool
    PRECISION: str  # the dots' (config.kernel_precision)
    STATE: str  # the state's dtype: "fp32", "fp16" or "bf16"
    BW: int
    BORDER_BW: int
    HC: int  # hidden units per chunk of the MLP
    CC: int  # input channels per chunk of the perception
    SPLIT: bool  # "ieee": three TF32 products with the weights' low parts packed (pack.pack_step)
    num_warps: int
    W_RESIDENT: bool
    num_stages: int = 1  # no software pipelining across tiles (but the interior's with LOADS != "plain")
    LOADS: str = "plain"  # the interior tiles' neighbour loads (INTERIOR_LOADS)
    REG_CAP: Optional[int] = None  # NCA_FAST_REGISTER_CAP (None: register_cap's rule)

    def dot_constexprs(self) -> dict:
        dot_t, prec = dot_types(self.PRECISION)
        return dict(DOT_T=dot_t, PREC=prec)

    def constexprs(self, pending: bool, has_mask: bool, interior: bool, tma: bool = False) -> dict:
        """The step kernel's constexprs; ``tma``: the launch gives the interior a tensor descriptor."""
        d = {k: getattr(self, k) for k in ("C", "CP", "HP", "F", "TAPS", "FSCALE", "NEEDS", "PAD", "APAD", "ALPHA",
                                           "ALIVE", "HAS_B1", "HAS_B2", "P_CLAMP", "H_CLAMP", "U_CLAMP", "S_CLAMP",
                                           "W_RESIDENT", "HC", "CC", "SPLIT")}
        # 16-bit states compute perception in 16-bit pairs; the interpreter has no bf16 arithmetic
        perc = "fp32" if self.STATE == "bf16" and interpreting() else self.STATE
        d.update(PENDING=pending and self.ALIVE, HAS_MASK=has_mask, INTERIOR=interior, PERC_T=_PERC_T[perc],
                 BW=self.tile(interior), TMA=interior and tma, STAGES=2 if interior and self.LOADS != "plain" else 1,
                 FAST=not interpreting(), **self.dot_constexprs())
        return d

    def launch_options(self, interior: bool, head: bool = False) -> dict:
        """The step kernel's launch (and compile) options: warps, stages and, where measured free, a
        register cap (``register_cap``)."""
        cap = register_cap(self, interior, head)
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, **({"maxnreg": cap} if cap else {}))

    def finalize_constexprs(self) -> dict:
        return dict(C=self.C, CP=self.CP, ALPHA=self.ALPHA, APAD=self.APAD, BW=self.BW, **self.dot_constexprs())

    def tile(self, interior: bool) -> int:
        """Cells per tile of the interior or the border kernel."""
        return self.BW if interior else self.BORDER_BW

    def backward_problem(self) -> str:
        """Why the fused backward cannot run this configuration ('' when it can; else the op's
        backward recomputes the step in PyTorch)."""
        if self.CP > CHANNEL_CHUNK or pow2(self.HP) > 128:
            return (f"the fused backward takes up to {CHANNEL_CHUNK} channels and 128 hidden units, this model has "
                    f"{self.C} channels and {self.HP} hidden units as padded")
        return ""

    def backward_chunk(self) -> int:
        """Hidden units per program of the backward (M of its weight-gradient dots, at least 16): the
        largest of 64, 32 that divides HP, so that no chunk is padding (texture's 96 = 3 x 32)."""
        return next((hc for hc in (BACKWARD_HC, BACKWARD_HC // 2) if self.HP % hc == 0), 16)

    def backward_passes(self) -> Tuple[int, ...]:
        """The backward's launches: one (PASS 0) for models without update or state clamps; else an
        update pass (1: the full MLP once more for the clamps' masks, writes dL/d(update)) and the
        MLP pass (2: reads it), so that no hidden chunk's program recomputes the whole MLP."""
        return (1, 2) if self.U_CLAMP or self.S_CLAMP else (0,)

    def backward_constexprs(self, has_mask: bool, pass_: int = 0) -> dict:
        d = {k: getattr(self, k) for k in ("C", "CP", "HP", "F", "TAPS", "FSCALE", "NEEDS", "PAD", "ALPHA", "ALIVE",
                                           "HAS_B1", "HAS_B2", "P_CLAMP", "H_CLAMP", "U_CLAMP", "S_CLAMP", "SPLIT")}
        perc = "fp32" if self.STATE == "bf16" and interpreting() else self.STATE
        d.update(HAS_MASK=has_mask, PERC_T=_PERC_T[perc], FAST=not interpreting(), BW=BACKWARD_BW,
                 HC=self.backward_chunk(), PASS=pass_, GPREC="tf32x3" if self.SPLIT else "tf32",
                 **self.dot_constexprs())
        return d

    def margin(self, pending: bool) -> int:
        """How far from the border a tile of the interior kernel must stay: its neighbours, and in
        the pending form their neighbours (the 5x5 alpha window)."""
        return 2 if pending and self.ALIVE else 1


def _filter_scale(taps) -> float:
    """The factor a filter's taps are divided by: the largest |tap| (exactly a power of two for the
    published filters, so the division is exact)."""
    big = max([abs(v) for v in taps] + [0.0])
    return big if big > 0 else 1.0


def filter_scales(spec: NCASpec) -> Tuple[float, ...]:
    return tuple(_filter_scale([v for row in f.taps for v in row]) for f in spec.filters)


def perceive_vjp_constexprs(cfg: StepConfig, n_chunks: int) -> dict:
    """The transposed perception's constexprs for ``cfg``'s model and ``n_chunks`` g_p slabs."""
    tapmask = sum(1 << (k * cfg.F + f) for f in range(cfg.F) for k in range(9) if cfg.TAPS[f * 9 + k] != 0)
    return dict(C=cfg.C, CP=cfg.CP, F=cfg.F, NEEDS=sum(int(b) << k for k, b in enumerate(cfg.NEEDS)),
                PAD=cfg.PAD, NCH=n_chunks, BW=PERCEIVE_VJP_BW, TAPMASK=tapmask)


def hidden_chunks(hidden: int, CP: int, precision: str) -> Tuple[int, int]:
    """(HC, HP): hidden units per MLP pass (a power of two) and the padded hidden width, a multiple
    of it. Up to 128 units a pass (a [64, 128] fp32 accumulator is 64 registers a thread; 64 for 64
    input channels in 16-bit: 2 CTAs, no spills, measured with ``nca-fast kernels``), and the
    fewest padded units in at most 4 passes: hidden 96 runs as 3 x 32, not padded to 128 (but in
    "ieee", whose every weight tile comes twice: more passes spill)."""
    cap = 64 if CP >= 64 and precision in ("fp16", "bf16") else 128
    best = None
    sizes = (cap,) if precision == "ieee" else (cap, cap // 2, cap // 4)
    for hc in sorted({min(c, pow2(hidden)) for c in sizes}, reverse=True):
        n = -(-hidden // hc)
        if n <= 4 or hc == min(cap, pow2(hidden)):
            if best is None or n * hc < best[1]:
                best = (hc, n * hc)
    return best


def _hidden_clamp_code(spec: NCASpec) -> int:
    """H_CLAMP: the hidden clamp follows the ReLU, so a lower bound <= 0 is a no-op (NaN stays NaN
    either way) and only the upper bound is applied: one min a hidden value, not a max and a min
    (texture 12x96, clamp (0, 2): 48 ``FMNMX`` a thread a tile)."""
    if spec.hidden_clamp is None:
        return 0
    return 2 if spec.hidden_clamp[0] <= 0 else 1


TRITON_RELEASE = tuple(int(v) for v in triton.__version__.split(".")[:2])


def register_cap(cfg: StepConfig, interior: bool, head: bool = False) -> Optional[int]:
    """A ptxas register cap (``maxnreg``) for the step kernel, or None. Only where the SASS showed it
    free: triton 3.6-3.8 (3.6 is the device image's) build the texture model's TF32 step (16 channels
    as padded, 96 hidden) with 186-211 registers, 2 CTAs of 4 warps an SM; capped at 168 it holds 3
    with no spill and 0-3 % more instructions (3.6, sm_90a: interior 188 -> 168 registers at 50.4
    warp-instructions a cell either way, border 208 -> 165, 175.8 -> 178.9; sm_80 interior 204 ->
    168). Not with a decoder head or the opt-in interior loads (capped, they spill), nor on 3.9 (128
    registers uncapped; a cap that does not bind can still move ptxas), nor the growing model's (204
    on 3.6: capped at 128 it holds 4 CTAs but parks 32 B, 7 local loads / stores a tile: a trade for
    a GPU run to weigh)."""
    if cfg.REG_CAP:
        return cfg.REG_CAP
    if (TRITON_RELEASE < (3, 9) and cfg.PRECISION == "tf32" and (cfg.CP, cfg.HP) == (16, 96) and not head
            and (not interior or cfg.LOADS == "plain")):
        return 168
    return None


def step_config(spec: NCASpec, precision: str, loads: Optional[str] = None) -> StepConfig:
    """The step kernel configuration for ``spec`` with its MLP in ``precision``; ``loads``: the
    interior tiles' (INTERIOR_LOADS; default ``interior_loads()``)."""
    loads = interior_loads() if loads is None else loads
    if loads not in INTERIOR_LOADS:
        raise ValueError(f"loads must be one of {INTERIOR_LOADS}, got {loads!r}")
    kp = kernel_precision(precision)
    CP = pow2(spec.channels)
    if CP > CHANNEL_CHUNK:  # (see INTERIOR_LOADS)
        loads = "plain"
    HC, HP = hidden_chunks(spec.hidden, CP, kp)
    fscale = filter_scales(spec)
    taps = tuple(float(v) / fscale[n] for n, f in enumerate(spec.filters) for row in f.taps for v in row)
    alive = spec.alive_channel is not None  # the alive pool reads all 9 neighbours
    needs = tuple(int(alive or k == 4 or any(taps[f * 9 + k] != 0.0 for f in range(spec.n_filters)))
                  for k in range(9))
    elt = {"tf32": 4, "ieee": 8}.get(kp, 2)  # ieee: each fp32 matrix and its low part
    weights = (spec.n_filters * CP * HP + HP * CP + 16 * HP) * elt
    return StepConfig(
        C=spec.channels, CP=CP, HP=HP, F=spec.n_filters, TAPS=taps, FSCALE=fscale, NEEDS=needs,
        PAD=PAD_CODES[spec.padding], APAD=APAD_CODES[spec.alive_pool_padding], ALPHA=spec.alive_channel if alive else 0,
        ALIVE=alive, HAS_B1=spec.hidden_bias, HAS_B2=spec.update_bias,
        P_CLAMP=spec.perception_clamp is not None, H_CLAMP=_hidden_clamp_code(spec),
        U_CLAMP=spec.update_clamp is not None, S_CLAMP=spec.state_clamp is not None,
        PRECISION=kp, STATE=_STATES[precision], BW=BW, BORDER_BW=BW if CP >= 64 else BORDER_BW, HC=HC,
        CC=min(CP, CHANNEL_CHUNK), SPLIT=kp == "ieee", num_warps=4,
        W_RESIDENT=weights <= W_RESIDENT_BYTES, LOADS=loads, REG_CAP=register_cap_setting())


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


def ps_decode_launch(head: HeadConfig, precision: str, capability: Tuple[int, int] = (9, 0)) -> dict:
    """The decode-only pixel-shuffle kernel's tile and head split for ``head`` on a GPU of ``capability``:
    BH, BW, num_warps, NB (outputs per dot) and DHC (hidden units per chunk, 0: all). Before sm_90 an
    "ieee" head of 64+ hidden units takes 32 outputs a dot and at most 64 hidden units at a time: with
    the whole hidden layer and 64 outputs, mma.sync's register operands (a TF32 and a low part of each)
    spilled in the loop (hidden 64: 375 local loads / stores a tile; 128: 12,953), found with ``nca-fast
    kernels``. Hopper's wgmma reads the weights from shared memory and keeps the defaults."""
    BH, BW, warps = PS_DECODE_TILE
    nb, dhc = head.NB, 0
    if precision == "ieee" and head.DH >= 64 and tuple(capability) < (9, 0):
        nb, dhc = min(head.NB, 32), min(head.DH, 64)
    return dict(BH=BH, BW=BW, num_warps=warps, NB=nb, DHC=dhc)
