"""Every kernel configuration the dispatchers can pick, as :class:`compile.KernelConfig`s: what
``nca-fast kernels`` compiles for sm_80 and sm_90a without a GPU."""
from __future__ import annotations

from typing import List

from ..decoders.spec import pixel_shuffle_spec
from ..spec import NCASpec, growing_spec, texture_spec
from . import decode, step, step_backward
from .compile import TARGETS, KernelConfig
from .config import (
    BACKWARD_BW,
    BACKWARD_WARPS,
    LPPN_HIDDEN_SIZES,
    PERCEIVE_VJP_BW,
    REDUCE_BLOCK,
    dot_types,
    head_config,
    lppn_launch,
    perceive_vjp_constexprs,
    ps_decode_launch,
    step_config,
)

_STEP_I32 = step.STEP_INTS
_STEP_F32 = ("threshold", "step_size", "p_lo", "p_hi", "h_lo", "h_hi", "u_lo", "u_hi", "s_lo", "s_hi")
_PTR = {"fp16": "*fp16", "bf16": "*bf16"}
# The published architectures (the budgets of `nca-fast kernels` are set on these), then one spec per
# shape class the kernels specialise on: smallest, mid, largest (8 warps, weights streamed).
PUBLISHED = {"growing-16x128": growing_spec(), "texture-12x96": texture_spec()}
SHAPES = {
    "min-4x16": NCASpec(channels=4, hidden=16, padding="replicate"),
    "mid-32x64": texture_spec(channels=32, hidden=64),
    "max-64x256": growing_spec(channels=64, hidden=256, padding="circular", alive_padding="ignore",
                               perception_clamp=(-2, 2), update_clamp=(-1, 1), state_clamp=(-3, 3)),
}
HEADS = {"+ps8": (8, 0), "+ps4h32": (4, 32)}  # pixel-shuffle epilogues (scale, hidden)


# What a step may cost on sm_90a (triton 3.9), read from the SASS of its persistent loop: (model, phase,
# precisions) -> (warp-instructions per cell, barriers per tile, resident CTAs per SM at least). Where
# the interior kernel exists, it is the one these apply to (it runs 96-99 % of a large grid's tiles).
# Set 0.3-2 above the counts and below those before each of: the update mask drawn one cell a thread;
# (growing rollout) an fp32 state's alive window split over a cell's four threads; (texture) the hidden
# clamp's lower bound dropped after the ReLU; the filter scales folded into the taps, and (fp32 rollout)
# the neighbours' alive bits too; (16-bit) the alive window's maxima and the taps' FMAs as inline PTX
# that LLVM cannot re-pair (step._max3, step._fma2).
BUDGETS = {
    ("growing-16x128", "rollout", ("fp16", "bf16")): (30, 8, 4),
    ("growing-16x128", "rollout", ("tf32",)): (48, 10, 4),
    ("growing-16x128", "single", ("fp16", "bf16")): (23, 6, 4),
    ("growing-16x128", "single", ("tf32",)): (34, 8, 3),  # (3 CTAs: with an explicit mask, 140 registers)
    ("texture-12x96", "rollout", ("fp16", "bf16")): (34, 8, 5),
    ("texture-12x96", "rollout", ("tf32",)): (54, 8, 4),
}

def budget(meta: dict):
    """The (warp-instructions per cell, barriers, resident CTAs) budget of a configuration, or None.
    The opt-in interior loads ("prefetch", "tma") are reported beside the plain kernel, not held to
    it: they trade instructions for latency (config.INTERIOR_LOADS)."""
    if meta.get("kernel") != "step" or not meta.get("interior") or meta.get("head") or \
            meta.get("loads", "plain") != "plain":
        return None
    for (model, phase, dtypes), limits in BUDGETS.items():
        if meta.get("model") == model and meta.get("phase") == phase and meta.get("dtype") in dtypes:
            return limits
    return None


# Spills a configuration may have (bytes, sm_90a): none, except where 255 registers cannot hold the
# tile. "ieee" keeps a TF32 and a low part of every weight tile (their wgmma descriptors alone take ~60
# registers) and splits the hidden layer in registers; the largest shape class, 64 channels x 256 hidden,
# streams its weights from L2 each tile. Both are reported, and held to these ceilings.
SPILL_LIMITS = {"ieee": 256, "max-64x256": 640}


# The backward spreads its weight-gradient sums over one program per hidden chunk (each holds
# (F + 1) * HC * CP fp32: 32 registers a thread); what a 64-cell tile's recomputed forward then leaves
# over spills. Measured (triton 3.9): sm_90a growing none, texture 8-24 B; sm_80 growing 8-24 B,
# texture 16-24 B; "ieee" (three TF32 products per dot) 72-696 B; the smallest models none.
BACKWARD_SPILL_LIMITS = {"ieee": 768, "": 32}


# What a spill costs is its traffic in the loop: outside it, ptxas parks a few index values live across
# the loop once a program (the backward's 8-24 B above, measured). Inside the persistent loop (or a
# decode kernel's body) no configuration may load or store local memory, but the two that spill by
# design (above); on sm_80 three texture kernels with a pixel-shuffle head have 1-2 such instructions.
LOOP_SPILLS_ALLOWED = ("ieee", "max-64x256")


def loop_spills_allowed(meta: dict) -> bool:
    return meta.get("dtype") in LOOP_SPILLS_ALLOWED or meta.get("model") in LOOP_SPILLS_ALLOWED


def backward_spill_limit(meta: dict) -> int:
    return BACKWARD_SPILL_LIMITS["ieee" if meta.get("dtype") == "ieee" else ""]


def spill_limit(meta: dict) -> int:
    return max([0] + [v for k, v in SPILL_LIMITS.items() if k in (meta.get("dtype"), meta.get("model"))])


def budget_problems(meta: dict, res: dict) -> List[str]:
    """Why a compiled configuration fails its gate: a step or backward that spills more than its
    limit (above), a transposed perception that spills at all, any kernel with spill traffic in its
    loop (but LOOP_SPILLS_ALLOWED), and the budgets of the published models."""
    problems = []
    if meta.get("kernel") == "step" and res["spill_bytes"] > spill_limit(meta):
        problems.append(f"spills {res['spill_bytes']} B (limit {spill_limit(meta)} B)")
    if meta.get("kernel") == "step_backward" and res["spill_bytes"] > backward_spill_limit(meta):
        problems.append(f"spills {res['spill_bytes']} B (limit {backward_spill_limit(meta)} B)")
    if meta.get("kernel") == "perceive_vjp" and res["spill_bytes"]:
        problems.append(f"spills {res['spill_bytes']} B (none allowed)")
    if res.get("loop_spills") and not loop_spills_allowed(meta):
        problems.append(f"{res['loop_spills']} local-memory loads / stores (spills) in its loop (none allowed)")
    limits = budget(meta)
    if limits:
        wi, bars, ctas = limits
        if res["warp_instructions_per_cell"] > wi:
            problems.append(f"{res['warp_instructions_per_cell']:.1f} warp-instructions per cell > {wi}")
        if res["barriers"] > bars:
            problems.append(f"{res['barriers']} barriers per tile > {bars}")
        if res["resident_ctas"] < ctas:
            problems.append(f"{res['resident_ctas']} resident CTAs per SM < {ctas}")
    return problems


def _pointers(ptr: str, names) -> dict:
    return {n: ("*u8" if n.endswith("pre") or n in ("fire_mask", "life") else "*i64" if n == "ctr" else
                "*fp32" if n in ("b2", "fscale", "db0", "db1") else ptr) for n in names}


def _step(name, model, spec, precision, *, interior, pending, has_mask=False, head=None,
          loads="plain") -> KernelConfig:
    cfg = step_config(spec, precision, loads)
    sig = _pointers(_PTR.get(precision, "*fp32"), ("src", "src_pre", "dst", "dst_pre", "fire_mask", "ctr", "desc", "w1",
                                                   "wb", "w2", "b2", "fscale", "img", "dw0", "db0", "dw1", "db1"))
    sig.update({n: "i32" for n in _STEP_I32})
    sig.update({n: "fp32" for n in _STEP_F32})
    tma = loads == "tma" and interior
    ce = cfg.constexprs(pending=pending, has_mask=has_mask, interior=interior, tma=tma)
    if tma:  # (the launch passes launch.tma_descriptor's; the plain kernels get the state pointer)
        sig["desc"] = f"tensordesc<{sig['src'][1:]}[1,{cfg.BW},{cfg.CC}]>"
    if head:
        ce.update(DECODE=True, **head_config(pixel_shuffle_spec(spec.channels, scale=head[0], hidden=head[1]),
                                             cfg.CP).constexprs())
    sig.update({n: "constexpr" for n in ce})
    phase = "rollout" if pending and cfg.ALIVE or not cfg.ALIVE else "single"
    meta = dict(kernel="step", model=model, dtype=precision, phase=phase if not has_mask else "single",
                interior=interior, cells_per_tile=cfg.tile(interior), head=bool(head), mask=has_mask, loads=loads)
    return KernelConfig(name, step.nca_step_kernel, sig, ce, **cfg.launch_options(interior, bool(head)),
                        note=f"{'interior' if interior else 'border'} {cfg.tile(interior)}", meta=meta,
                        targets=("sm_90a",) if tma else tuple(TARGETS))


def _finalize(name, model, spec, precision, head=None, life=False) -> KernelConfig:
    cfg = step_config(spec, precision)
    sig = _pointers(_PTR.get(precision, "*fp32"), ("src", "src_pre", "dst", "life", "img", "dw0", "db0", "dw1",
                                                   "db1"))
    sig.update({"H": "i32", "W": "i32", "n_items": "i32", "items_per_program": "i32", "threshold": "fp32"})
    ce = dict(cfg.finalize_constexprs(), LIFE=life)  # LIFE: the op's forward, which keeps alive bytes
    if head:
        ce.update(DECODE=True, **head_config(pixel_shuffle_spec(spec.channels, scale=head[0], hidden=head[1]),
                                             cfg.CP).constexprs())
    sig.update({n: "constexpr" for n in ce})
    meta = dict(kernel="finalize", model=model, dtype=precision, phase="rollout", interior=False,
                cells_per_tile=cfg.BW)
    return KernelConfig(name, step.nca_finalize_kernel, sig, ce, num_warps=cfg.num_warps if head else 4,
                        num_stages=cfg.num_stages, note=f"cells {cfg.BW}", meta=meta)


def step_configs() -> List[KernelConfig]:
    """The step as every dispatch reaches it: interior and border kernels, a rollout's steps (the
    pending alive form) and a single step, an explicit mask, the pixel-shuffle epilogue (in the step,
    or in finalize for alive models), and finalize, on the published architectures in every
    precision; the other shape classes in their most demanding variant."""
    configs = []
    for model, spec in {**PUBLISHED, **SHAPES}.items():
        published = model in PUBLISHED
        alive = spec.alive_channel is not None
        for precision in ("tf32", "ieee", "fp16", "bf16"):
            if not published and precision in ("ieee", "bf16"):
                continue  # (the same code as tf32 / fp16 but for the operand type)
            base = f"step/{model}/{precision}"
            # the opt-in interior loads (config.INTERIOR_LOADS) beside every plain interior kernel of the
            # models they apply to ("tma" where a cell's channels are a multiple of 16 bytes)
            elt = 4 if precision == "tf32" else 2
            loads_variants = (() if precision == "ieee" or step_config(spec, precision, "tma").LOADS == "plain" else
                              ("prefetch", "tma") if spec.channels * elt % 16 == 0 else ("prefetch",))

            def add(name, interior, **kw):
                configs.append(_step(name, model, spec, precision, interior=interior, **kw))
                for loads in loads_variants if interior else ():
                    if loads == "tma" and kw.get("head"):
                        continue  # (a head takes the prefetch loads: launch.launch_step)
                    configs.append(_step(f"{name}/{loads}", model, spec, precision, interior=True, loads=loads, **kw))

            for interior in (True, False):
                where = "interior" if interior else "border"
                add(f"{base}/{where}", interior, pending=True)
                if alive and published:
                    add(f"{base}/{where}/single", interior, pending=False)
            if published:  # an explicit update mask (model.step(update_mask=...)): interior and border
                add(f"{base}/interior/mask", True, pending=False, has_mask=True)
                add(f"{base}/border/mask", False, pending=False, has_mask=True)
            if published and precision != "ieee":
                for hname, h in HEADS.items():
                    if alive:
                        configs.append(_finalize(f"finalize/{model}/{precision}{hname}", model, spec, precision, h))
                    else:
                        for interior in (True, False):
                            add(f"{base}/{'interior' if interior else 'border'}{hname}", interior, pending=False,
                                head=h)
            if alive and (published or precision != "ieee"):
                configs.append(_finalize(f"finalize/{model}/{precision}", model, spec, precision))
            if alive and published:  # model.step through the op: finalize also writes the alive bytes
                configs.append(_finalize(f"finalize/{model}/{precision}/life", model, spec, precision, life=True))
    return configs


_BACKWARD_I32 = ("H", "W", "n_items", "items_per_program", "step_offset", "row0", "col0", "batch0",
                 "fire_threshold")
_BACKWARD_F32 = ("step_size", "p_lo", "p_hi", "h_lo", "h_hi", "u_lo", "u_hi", "s_lo", "s_hi")


_PASS_NAMES = {0: "", 1: "/update", 2: "/mlp"}


def _backward(name, model, spec, precision, has_mask=False) -> List[KernelConfig]:
    """The backward's launches for one model and precision (one, or the update and MLP passes)."""
    cfg = step_config(spec, precision)
    sig = _pointers(_PTR.get(precision, "*fp32"), ("src", "life", "fire_mask", "ctr", "gout", "w1", "wb", "w2", "b2",
                                                   "fscale"))
    # the backward's weights and gradients, the incoming one included, are fp32 whatever the state's dtype
    sig.update({n: "*fp32" for n in ("gout", "w1", "wb", "w2", "gx", "gp", "part", "gd")})
    sig.update({n: "i32" for n in _BACKWARD_I32})
    sig.update({n: "fp32" for n in _BACKWARD_F32})
    configs = []
    for pass_ in cfg.backward_passes():
        ce = cfg.backward_constexprs(has_mask, pass_)
        programs = 1 if pass_ == 1 else -(-cfg.HP // ce["HC"])  # (per tile: one per hidden chunk)
        meta = dict(kernel="step_backward", model=model, dtype=precision, phase="backward", interior=False,
                    cells_per_tile=BACKWARD_BW, programs_per_tile=programs, head=False, mask=has_mask,
                    backward_pass=pass_)
        configs.append(KernelConfig(name + _PASS_NAMES[pass_], step_backward.nca_step_backward_kernel,
                                    {**sig, **{n: "constexpr" for n in ce}}, ce, num_warps=BACKWARD_WARPS,
                                    num_stages=1, note=f"cells {BACKWARD_BW}, {programs} programs a tile",
                                    meta=meta))
    return configs


def backward_configs() -> List[KernelConfig]:
    """The step's backward for every model it takes (up to 16 channels and 128 hidden units; wider ones
    go to the reference's VJP), in every precision, and with an explicit mask."""
    configs = []
    for model, spec in {**PUBLISHED, **SHAPES}.items():
        for precision in ("tf32", "ieee", "fp16", "bf16"):
            if step_config(spec, precision).backward_problem():
                continue
            configs += _backward(f"backward/{model}/{precision}", model, spec, precision)
        if not step_config(spec, "tf32").backward_problem() and model in PUBLISHED:
            configs += _backward(f"backward/{model}/tf32/mask", model, spec, "tf32", has_mask=True)
        configs += _perceive_vjp(model, spec) + _reduce_partials(model, spec)
    return configs


def _reduce_partials(model, spec) -> List[KernelConfig]:
    """The weight gradients' reduction: one per packed layout the precisions give (split or not)."""
    configs = []
    cfgs = [step_config(spec, p) for p in ("tf32", "ieee", "fp16", "bf16")]
    for split, hp in sorted({(c.SPLIT, c.HP) for c in cfgs if not c.backward_problem()}):
        cfg = next(c for c in cfgs if (c.SPLIT, c.HP) == (split, hp))
        ce = dict(F=cfg.F, CP=cfg.CP, HP=hp, SPLIT=split, BLOCK=REDUCE_BLOCK)
        sig = {**{n: "*fp32" for n in ("part", "gw1", "gwb", "gw2", "gb2")}, "streams": "i32",
               **{n: "constexpr" for n in ce}}
        meta = dict(kernel="reduce_partials", model=model, dtype="fp32", phase="backward", interior=False,
                    cells_per_tile=None, head=False, mask=False)
        name = f"backward/{model}/reduce/{'split' if split else 'plain'}-{hp}"
        configs.append(KernelConfig(name, step_backward.reduce_partials_kernel, sig, ce, num_warps=4, num_stages=1,
                                    note="weight gradients", meta=meta))
    return configs


def _perceive_vjp(model, spec) -> List[KernelConfig]:
    """The transposed perception after the backward: one per number of slabs its precisions give."""
    configs = []
    for n_chunks in sorted({-(-c.HP // c.backward_chunk()) for c in (step_config(spec, p) for p in
                                                                      ("tf32", "ieee", "fp16", "bf16"))
                            if not c.backward_problem()}):
        ce = perceive_vjp_constexprs(step_config(spec, "tf32"), n_chunks)
        sig = {**{n: "*fp32" for n in ("gp", "taps", "fscale", "gx")}, **{n: "i32" for n in ("H", "W", "n_items")},
               **{n: "constexpr" for n in ce}}
        meta = dict(kernel="perceive_vjp", model=model, dtype="fp32", phase="backward", interior=False,
                    cells_per_tile=PERCEIVE_VJP_BW, head=False, mask=False)
        configs.append(KernelConfig(f"backward/{model}/perceive_vjp/{n_chunks}", step_backward.perceive_vjp_kernel,
                                    sig, ce, num_warps=4, num_stages=1, note=f"{n_chunks} slabs", meta=meta))
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
                                     num_warps=launch["num_warps"], num_stages=launch["num_stages"],
                                     meta=dict(kernel="lppn", model=f"lppn-h{hid}", dtype=precision,
                                               phase="decode", interior=False, cells_per_tile=launch["BLOCK_P"])))
        for hidden in (0, 32, 64, 128):
            head = head_config(pixel_shuffle_spec(12, scale=8, hidden=hidden), 16)
            sig = {n: ("*fp32" if n in ("x", "db0", "db1") else wdt) for n in ("x", "img", "dw0", "db0", "dw1", "db1")}
            sig.update({n: "i32" for n in ("H", "W", "n_tiles_w", "tiles_per_image")})
            # the launch's tile and head split per target family (config.ps_decode_launch)
            tiles = {t: ps_decode_launch(head, precision, (TARGETS[t] // 10, 0)) for t in TARGETS}
            for tile in sorted({tuple(v.items()) for v in tiles.values()}):
                tile = dict(tile)
                targets = tuple(t for t in TARGETS if tiles[t] == tile)
                ce = dict(C=12, CP=16, BH=tile["BH"], BW=tile["BW"], **{**head.constexprs(), "NB": tile["NB"]},
                          DHC=tile["DHC"], DOT_T=dot_t, PREC=prec)
                name = f"pixel_shuffle/h{hidden}/{precision}" + ("" if "sm_90a" in targets else f"/{'+'.join(targets)}")
                cfgs.append(KernelConfig(name, decode.pixel_shuffle_kernel, {**sig, **{n: "constexpr" for n in ce}}, ce,
                                         num_warps=tile["num_warps"], num_stages=1,
                                         note=f"tile {tile['BH']}x{tile['BW']}, NB {tile['NB']}, DHC {tile['DHC']}",
                                         targets=targets,
                                         meta=dict(kernel="pixel_shuffle", model=f"ps-h{hidden}", dtype=precision,
                                                   phase="decode", interior=False,
                                                   cells_per_tile=tile["BH"] * tile["BW"])))
    return cfgs


def compile_configs() -> List[KernelConfig]:
    return step_configs() + backward_configs() + decode_configs()
