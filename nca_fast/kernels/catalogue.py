"""Every kernel configuration the dispatchers can pick, as :class:`compile.KernelConfig`s: what
``nca-fast kernels`` compiles for sm_80 and sm_90a without a GPU."""
from __future__ import annotations

from typing import List

import torch

from ..decoders.spec import pixel_shuffle_spec
from ..spec import NCASpec, growing_spec, texture_spec
from . import decode, step
from .compile import KernelConfig
from .config import LPPN_HIDDEN_SIZES, PS_DECODE_TILE, dot_types, head_config, lppn_launch, step_config

_STEP_I32 = ("H", "W", "n_tiles_w", "tiles_per_image", "n_tiles", "tiles_per_program", "step_offset",
             "row0", "col0", "batch0", "fire_threshold")
_STEP_F32 = ("threshold", "step_size", "p_lo", "p_hi", "h_lo", "h_hi", "u_lo", "u_hi", "s_lo", "s_hi")
_PTR = {"fp16": "*fp16", "bf16": "*bf16"}
_STATE = {"tf32": torch.float32, "ieee": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# One spec per tile_shape branch (CP, HP) -> (BH, BW, warps).
SPECS = {
    "growing-16x128": growing_spec(),
    "texture-12x96": texture_spec(),
    "min-4x16": NCASpec(channels=4, hidden=16, padding="replicate"),
    "mid-32x64": texture_spec(channels=32, hidden=64),
    "max-64x256": growing_spec(channels=64, hidden=256, padding="circular",
                               perception_clamp=(-2, 2), update_clamp=(-1, 1), state_clamp=(-3, 3)),
}
HEADS = {"": None, "+ps8": (8, 0), "+ps4h32": (4, 32)}  # pixel-shuffle epilogues (scale, hidden)


def _pointers(ptr: str, names) -> dict:
    return {n: ("*u8" if n.endswith("pre") or n == "fire_mask" else "*i64" if n == "ctr" else
                "*fp32" if n in ("b1", "b2", "db0", "db1") else ptr) for n in names}


def step_configs() -> List[KernelConfig]:
    """The step in its most demanding variant (pending alive form, all clamps) for every tile shape
    and precision, finalize, and the pixel-shuffle epilogue (in the step, or in finalize for alive
    models) on the published architectures."""
    configs = []
    for sname, spec in SPECS.items():
        for precision in ("tf32", "ieee", "fp16", "bf16"):
            cfg = step_config(spec, precision)
            ptr = _PTR.get(precision, "*fp32")
            for hname, h in HEADS.items():
                if h and (sname not in ("growing-16x128", "texture-12x96") or precision == "ieee"):
                    continue  # epilogues: on the published architectures, every tensor-core precision
                ce_head = dict(DECODE=True, **head_config(pixel_shuffle_spec(spec.channels, scale=h[0], hidden=h[1]),
                                                          cfg.CP).constexprs()) if h else {}
                if not cfg.ALIVE or not h:  # alive models decode in finalize
                    sig = _pointers(ptr, ("src", "src_pre", "dst", "dst_pre", "fire_mask", "ctr", "w1", "b1",
                                          "w2", "b2", "img", "dw0", "db0", "dw1", "db1"))
                    sig.update({n: "i32" for n in _STEP_I32})
                    sig.update({n: "fp32" for n in _STEP_F32})
                    ce = {**cfg.constexprs(pending=True, has_mask=False), **ce_head}
                    sig.update({n: "constexpr" for n in ce})
                    configs.append(KernelConfig(f"step/{sname}/{precision}{hname}", step.nca_step_kernel, sig, ce,
                                                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                                note=f"tile {cfg.BH}x{cfg.BW}"))
                if cfg.ALIVE and precision != "ieee":  # finalize: only the pointer type varies by dtype
                    fsig = _pointers(ptr, ("src", "src_pre", "dst", "img", "dw0", "db0", "dw1", "db1"))
                    fsig.update({"H": "i32", "W": "i32", "n_tiles_w": "i32", "tiles_per_image": "i32",
                                 "n_tiles": "i32", "tiles_per_program": "i32", "threshold": "fp32"})
                    fce = {**cfg.finalize_constexprs(), **ce_head}
                    fsig.update({n: "constexpr" for n in fce})
                    configs.append(KernelConfig(f"finalize/{sname}/{precision}{hname}", step.nca_finalize_kernel,
                                                fsig, fce, num_warps=cfg.num_warps if h else 4,
                                                num_stages=cfg.num_stages, note=f"tile {cfg.BH}x{cfg.BW}"))
    return configs


def decode_configs() -> List[KernelConfig]:
    """The decode-only kernels: every padded hidden width x precision."""
    cfgs = []
    for precision in ("ieee", "fp16"):
        wdt = _PTR.get(precision, "*fp32")
        dot_t, prec = dot_types(precision)
        for hid in LPPN_HIDDEN_SIZES:
            launch = lppn_launch(hid)
            sig = {"proj_ptr": "*fp32", "out_ptr": wdt, "w0_ptr": "*fp32",
                   "wh_ptr": wdt, "bh_ptr": "*fp32", "wo_ptr": wdt, "bo_ptr": "*fp32",
                   "H": "i32", "W": "i32", "Ho": "i32", "Wo": "i32", "K": "i32",
                   "N_FREQ": "i32", "N_HID_LAYERS": "i32", "CIRCULAR": "i32",
                   "HID": "constexpr", "BLOCK_P": "constexpr", "DOT_T": "constexpr", "PREC": "constexpr"}
            cfgs.append(KernelConfig(f"lppn/h{hid}/{precision}", decode.lppn_kernel, sig,
                                     dict(HID=hid, BLOCK_P=launch["BLOCK_P"], DOT_T=dot_t, PREC=prec),
                                     num_warps=launch["num_warps"], num_stages=launch["num_stages"]))
        BH, BW, warps = PS_DECODE_TILE
        for hidden in (0, 32, 128):
            head = head_config(pixel_shuffle_spec(12, scale=8, hidden=hidden), 16)
            sig = {n: ("*fp32" if n in ("x", "db0", "db1") else wdt) for n in ("x", "img", "dw0", "db0", "dw1", "db1")}
            sig.update({n: "i32" for n in ("H", "W", "n_tiles_w", "tiles_per_image")})
            ce = dict(C=12, CP=16, BH=BH, BW=BW, **head.constexprs(), DOT_T=dot_t, PREC=prec)
            sig.update({n: "constexpr" for n in ce})
            cfgs.append(KernelConfig(f"pixel_shuffle/h{hidden}/{precision}", decode.pixel_shuffle_kernel, sig, ce,
                                     num_warps=warps, num_stages=1, note=f"tile {BH}x{BW}"))
    return cfgs


def compile_configs() -> List[KernelConfig]:
    return step_configs() + decode_configs()
