"""Launchers for the fused step kernels, the ``nca_fast::fused_step`` torch op, and fused rollouts.

Layers: ``kernels/step.py`` (Triton only) -> this file (validation, weight packing, tile choice,
buffers, the torch.library op) -> ``NCA.step/rollout(backend="triton")``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch

from . import rng
from .spec import NCASpec

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CHANNELS, MAX_HIDDEN = 64, 256
_DOT_CODES = {"tf32": 0, "ieee": 1}
_PAD_CODES = {"zeros": 0, "circular": 1, "replicate": 2}


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET, parsed as Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


_TRITON_PROBLEM: Optional[str] = None


def _triton_problem() -> str:
    global _TRITON_PROBLEM
    if _TRITON_PROBLEM is None:
        try:
            import triton  # noqa: F401
            from .kernels import step  # noqa: F401
            _TRITON_PROBLEM = ""
        except Exception as e:  # pragma: no cover - depends on the installation
            _TRITON_PROBLEM = f"triton is not usable: {e}"
    return _TRITON_PROBLEM


def unavailable_reason(model, x: torch.Tensor) -> str:
    """Why the fused path cannot run ``model`` on state ``x`` ('' when it can)."""
    problem = _triton_problem()
    if problem:
        return problem
    if x.device.type == "cuda":
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return f"the fused kernels need compute capability >= 8.0, {x.device} has " \
                   f"{torch.cuda.get_device_capability(x.device)}"
    elif not (x.device.type == "cpu" and interpreting()):
        return f"state on {x.device.type}: the fused kernels run on CUDA devices " \
               "(or on the CPU under TRITON_INTERPRET=1)"
    spec = model.spec
    if x.dtype not in KERNEL_DTYPES:
        return f"state dtype {x.dtype} (the fused kernels take float32, float16 or bfloat16)"
    if not 1 <= spec.channels <= MAX_CHANNELS:
        return f"{spec.channels} channels (the fused kernels take 1-{MAX_CHANNELS})"
    if not 1 <= spec.hidden <= MAX_HIDDEN:
        return f"hidden width {spec.hidden} (the fused kernels take 1-{MAX_HIDDEN})"
    if spec.channels * x.shape[2] * x.shape[3] >= 2**31:
        return f"a {spec.channels}x{x.shape[2]}x{x.shape[3]} image exceeds the kernels' 32-bit indexing"
    return ""


# ---- configuration ---------------------------------------------------------------------------
def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


@dataclass(frozen=True)
class StepConfig:
    """Everything that selects one compiled kernel (constexprs) plus its launch shape."""

    C: int
    CP: int
    HP: int
    F: int
    NG: int  # filter groups of four
    TAPS: Tuple[float, ...]  # [NG*4 filters][9 taps], zero padded
    LOADS: Tuple[int, ...]  # [NG][9]: 0 nothing to load, 1 the neighbour's state, 2 only its alpha
    PAD: int
    ALPHA: int
    ALIVE: bool
    HAS_B1: bool
    HAS_B2: bool
    P_CLAMP: bool
    H_CLAMP: bool
    U_CLAMP: bool
    S_CLAMP: bool
    DOT: int
    BH: int
    BW: int
    num_warps: int
    # No software pipelining across the persistent loop's tiles: with 2 stages Triton double-buffers
    # all nine neighbour loads and the weights in shared memory (160-680 KB: beyond a Hopper SM's
    # 227 KB for the larger configurations); with 1 the growing model's step needs 8 KB.
    num_stages: int = 1

    def constexprs(self, pending: bool, has_mask: bool) -> dict:
        from .kernels.step import dot_types

        d = {k: getattr(self, k) for k in ("C", "CP", "HP", "F", "NG", "TAPS", "LOADS", "PAD", "ALPHA", "ALIVE",
                                           "HAS_B1", "HAS_B2", "P_CLAMP", "H_CLAMP", "U_CLAMP",
                                           "S_CLAMP", "BH", "BW")}
        d.update(PENDING=pending and self.ALIVE, HAS_MASK=has_mask)
        d["DOT_T"], d["PREC"] = dot_types(self.DOT)
        return d


def dot_code(dtype: torch.dtype, fp32_matmul: str = "tf32") -> int:
    """0: fp32 operands, TF32 dot; 1: full fp32; 2: fp16 operands; 3: bf16 operands (fp32 accumulate).
    The interpreter has no bf16 arithmetic: there a bf16 state runs its MLP in fp32."""
    if dtype == torch.float16:
        return 2
    if dtype == torch.bfloat16:
        return 1 if interpreting() else 3
    if fp32_matmul not in _DOT_CODES:
        raise ValueError(f"fp32_matmul must be 'tf32' or 'ieee', got {fp32_matmul!r}")
    return _DOT_CODES[fp32_matmul]


def tile_shape(CP: int, HP: int) -> Tuple[int, int, int]:
    """(BH, BW, num_warps): 32 cells along a row keep each channel's loads in whole 128-byte lines;
    M = BH*BW cells are sized so the fp32 hidden accumulator [M, HP] stays at <= 64 registers per
    thread (M*HP <= 64 * 32 * num_warps)."""
    M = 128 if HP <= 128 else 64
    if CP >= 64 and HP >= 128:
        M = 64
    num_warps = 4 if M * HP <= 8192 else 8
    return M // 32, 32, num_warps


def step_config(spec: NCASpec, dtype: torch.dtype, fp32_matmul: str = "tf32") -> StepConfig:
    CP, HP = _pow2(spec.channels), _pow2(spec.hidden)
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
        PAD=_PAD_CODES[spec.padding], ALPHA=spec.alive_channel if spec.alive_channel is not None else 0,
        ALIVE=spec.alive_channel is not None, HAS_B1=spec.hidden_bias, HAS_B2=spec.update_bias,
        P_CLAMP=spec.perception_clamp is not None, H_CLAMP=spec.hidden_clamp is not None,
        U_CLAMP=spec.update_clamp is not None, S_CLAMP=spec.state_clamp is not None,
        DOT=dot_code(dtype, fp32_matmul), BH=BH, BW=BW, num_warps=warps)


def pack_weights(params: Dict[str, torch.Tensor], spec: NCASpec, dot: int, device):
    """Kernel layout: w1 [F, CP, HP] and w2 [HP, CP] in the dot dtype (zero padded), biases fp32."""
    C, F_, CP, HP = spec.channels, spec.n_filters, _pow2(spec.channels), _pow2(spec.hidden)
    wdt = {2: torch.float16, 3: torch.bfloat16}.get(dot, torch.float32)
    w1 = torch.zeros(F_, CP, HP, dtype=wdt, device=device)
    w1[:, :C, :spec.hidden] = params["w1"].detach().t().reshape(F_, C, spec.hidden)
    w2 = torch.zeros(HP, CP, dtype=wdt, device=device)
    w2[:spec.hidden, :C] = params["w2"].detach().t()
    b1 = torch.zeros(HP, dtype=torch.float32, device=device)
    b2 = torch.zeros(CP, dtype=torch.float32, device=device)
    if "b1" in params:
        b1[:spec.hidden] = params["b1"].detach()
    if "b2" in params:
        b2[:C] = params["b2"].detach()
    return w1, b1, w2, b2


def _grid_programs(n_tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: one persistent program
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, sms * 4))


def _seed_word(seed: int) -> int:
    return seed - 2**64 if seed >= 2**63 else seed  # the same 64 bits as a signed int64


def counter_tensor(seed: int, step: int, device) -> torch.Tensor:
    """int64 [2] = (seed, base step): read by the kernel, so captured graphs can be re-pointed."""
    return torch.tensor([_seed_word(seed), step], dtype=torch.int64, device=device)


def _i32(v: int) -> int:
    """``v`` mod 2**32 as a signed 32-bit kernel argument: Philox counters only see the low 32 bits."""
    return (int(v) + 2**31) % 2**32 - 2**31


def _clamp_args(spec: NCASpec):
    out = []
    for r in (spec.perception_clamp, spec.hidden_clamp, spec.update_clamp, spec.state_clamp):
        out += list(r) if r is not None else [0.0, 0.0]
    return out


@dataclass(frozen=True)
class FusedDecode:
    """A pixel-shuffle head fused into the pass that produces the true state, and its frame.

    ``weights``: dw0 [CP, DH], db0 [DH] (hidden head only), dw1 [DH or CP, NPAD], db1 [NPAD] (fp32
    biases, matrices in the dot dtype, zero padded); ``image`` [B, K, H*R, W*R] in the state dtype."""

    image: torch.Tensor
    weights: Tuple[torch.Tensor, ...]
    R: int
    K: int
    N: int
    DH: int
    NPAD: int
    NB: int

    def args(self):
        return (self.image, *self.weights)

    def constexprs(self) -> dict:
        return dict(DECODE=True, R=self.R, K=self.K, N=self.N, DH=self.DH, NPAD=self.NPAD, NB=self.NB)


def decode_epilogue(decoder, cfg: StepConfig, shape, dtype, device) -> FusedDecode:
    """Pack a pixel-shuffle decoder for the step/finalize epilogue and allocate its frame."""
    spec = decoder.spec
    if spec.kind != "pixel_shuffle":
        raise ValueError(f"only pixel_shuffle decoders fuse into the step, got {spec.kind!r}")
    if spec.channels != cfg.C:
        raise ValueError(f"decoder takes {spec.channels} channels, the model has {cfg.C}")
    if spec.layers and spec.hidden > 128:
        raise ValueError(f"fused pixel-shuffle heads take hidden <= 128, got {spec.hidden}")
    wdt = {2: torch.float16, 3: torch.bfloat16}.get(cfg.DOT, torch.float32)
    p = {k: v.detach().to(device, torch.float32) for k, v in decoder.params().items()}
    R, K, N = spec.scale, spec.out_channels, spec.head_outputs
    NB = min(64, _pow2(N))
    NPAD = -(-N // NB) * NB
    DH = _pow2(spec.hidden) if spec.layers else 0
    last = "w1" if spec.layers else "w0"
    dw1 = torch.zeros(DH or cfg.CP, NPAD, device=device)
    dw1[:spec.hidden or spec.channels, :N] = p[last].t()
    db1 = torch.zeros(NPAD, device=device)
    db1[:N] = p["b" + last[1:]]
    dw0 = torch.zeros(cfg.CP, max(DH, 16), device=device)
    db0 = torch.zeros(max(DH, 16), device=device)
    if spec.layers:
        dw0[:spec.channels, :spec.hidden] = p["w0"].t()
        db0[:spec.hidden] = p["b0"]
    B, _, H, W = shape
    if K * H * R * W * R >= 2**31:
        raise ValueError(f"a {K}x{H * R}x{W * R} frame exceeds the fused epilogue's 32-bit indexing; "
                         "decode in tiles of the grid")
    image = torch.empty(B, K, H * R, W * R, dtype=dtype, device=device)
    return FusedDecode(image, (dw0.to(wdt), db0, dw1.to(wdt), db1), R, K, N, DH, NPAD, NB)


def launch_step(cfg: StepConfig, spec: NCASpec, packed, src, src_pre, dst, dst_pre, ctr, *,
                step_offset: int = 0, origin=(0, 0), batch_offset: int = 0, fire_rate: float,
                update_mask: Optional[torch.Tensor] = None, pending: bool = False,
                decode: Optional[FusedDecode] = None) -> None:
    """One fused step ``src -> dst`` (and alive ``dst_pre`` for alive models). ``pending``: src is
    in the pending form (see kernels/step.py) with its alive bytes in ``src_pre``. ``decode``
    (models without alive masks only) also writes the frame of ``dst`` in the same pass."""
    from .kernels.step import nca_step_kernel

    if decode is not None and cfg.ALIVE:
        raise ValueError("an alive model's frame is decoded by launch_finalize (its true state)")
    B, C, H, W = src.shape
    n_tw, n_th = -(-W // cfg.BW), -(-H // cfg.BH)
    n_tiles = B * n_th * n_tw
    w1, b1, w2, b2 = packed
    dummy = dst_pre if dst_pre is not None else ctr
    mask = update_mask.contiguous().view(torch.uint8) if update_mask is not None else dummy
    dec_args = decode.args() if decode is not None else (dummy,) * 5
    programs = _grid_programs(n_tiles, src.device)
    nca_step_kernel[(programs,)](
        src, src_pre if src_pre is not None else dummy, dst, dst_pre if dst_pre is not None else dummy,
        mask, ctr, w1, b1, w2, b2, *dec_args,
        H, W, n_tw, n_th * n_tw, n_tiles, -(-n_tiles // programs),
        step_offset, _i32(origin[0]), _i32(origin[1]), _i32(batch_offset), rng.fire_threshold(fire_rate),
        float(spec.alive_threshold), float(spec.step_size), *_clamp_args(spec),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs(pending, update_mask is not None),
        **(decode.constexprs() if decode is not None else {}))


def launch_finalize(cfg: StepConfig, spec: NCASpec, src, src_pre, dst,
                    decode: Optional[FusedDecode] = None) -> None:
    """Pending form ``(src, src_pre)`` -> the true state in ``dst`` (and its frame with ``decode``)."""
    from .kernels.step import dot_types, nca_finalize_kernel

    B, C, H, W = src.shape
    n_tw, n_th = -(-W // cfg.BW), -(-H // cfg.BH)
    n_tiles = B * n_th * n_tw
    dec_args = decode.args() if decode is not None else (dst,) * 5
    programs = _grid_programs(n_tiles, src.device)
    nca_finalize_kernel[(programs,)](
        src, src_pre, dst, *dec_args, H, W, n_tw, n_th * n_tw, n_tiles, -(-n_tiles // programs),
        float(spec.alive_threshold),
        C=cfg.C, CP=cfg.CP, ALPHA=cfg.ALPHA, PAD=cfg.PAD, BH=cfg.BH, BW=cfg.BW,
        **dict(zip(("DOT_T", "PREC"), dot_types(cfg.DOT))),
        num_warps=4 if decode is None else cfg.num_warps, num_stages=cfg.num_stages,
        **(decode.constexprs() if decode is not None else {}))


# ---- the torch op ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _spec_from_json(spec_json: str) -> NCASpec:
    return NCASpec.from_json(spec_json)


@torch.library.custom_op("nca_fast::fused_step", mutates_args=())
def fused_step_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, ctr: torch.Tensor, update_mask: Optional[torch.Tensor],
                  spec_json: str, fire_rate: float, row0: int, col0: int, fp32_matmul: str) -> torch.Tensor:
    """One fused step of the NCA described by ``spec_json`` with packed weights (see pack_weights);
    ``ctr`` = int64 [seed, step] on x's device. Works under torch.compile(fullgraph) and CUDA graphs."""
    spec = _spec_from_json(spec_json)
    cfg = step_config(spec, x.dtype, fp32_matmul)
    x = x.contiguous()
    out = torch.empty_like(x)
    packed = (w1, b1, w2, b2)
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
def _(x, w1, b1, w2, b2, ctr, update_mask, spec_json, fire_rate, row0, col0, fp32_matmul):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- entry points used by NCA ----------------------------------------------------------------
def packed_weights(model, dtype: torch.dtype):
    """Packed weights for a ``dtype`` state, cached on the model until its parameters change."""
    params = model.params()
    dot = dot_code(dtype, model.fp32_matmul)
    if torch.compiler.is_compiling():  # traced: packing becomes part of the graph (cheap, C*hidden)
        return pack_weights(params, model.spec, dot, model.w1.device)
    key = (dot, model.w1.device, tuple((p.data_ptr(), p._version) for p in params.values()))
    cache = model.__dict__.setdefault("_packed_cache", {})
    if key not in cache:
        cache.clear()
        cache[key] = pack_weights(params, model.spec, dot, model.w1.device)
    return cache[key]


def fused_step(model, x, *, seed: int, step: int, update_mask, fire_rate: float, origin) -> torch.Tensor:
    w1, b1, w2, b2 = packed_weights(model, x.dtype)
    ctr = counter_tensor(seed, step, x.device)
    return fused_step_op(x, w1, b1, w2, b2, ctr, update_mask, model.spec.json, float(fire_rate),
                         int(origin[0]), int(origin[1]), model.fp32_matmul)


class FusedRollout:
    """Buffers and launches of a fused rollout of ``steps`` steps for states of one shape and dtype.

    Two state buffers (ping-pong) and, for alive models, two mask-byte buffers are allocated once;
    each step is one launch, a frame one more (``finalize``) for alive models. The seed and the base
    step live in a device tensor (``ctr``), so the whole rollout can be captured in a CUDA graph and
    replayed with new seeds and step counters::

        r = FusedRollout(model, x.shape, x.dtype, x.device, steps=8)
        r.capture()                       # CUDA only; optional
        y = r(x, seed=0, start_step=0)    # -> r.out (reused by the next call)

    With a pixel-shuffle ``decoder`` every frame is also decoded into ``r.decode.image`` in the pass
    that produces the true state (the step itself, or finalize for alive models).
    """

    def __init__(self, model, shape, dtype, device, steps: int, origin=(0, 0), decoder=None):
        self.model, self.spec, self.steps, self.origin = model, model.spec, int(steps), origin
        self.cfg = step_config(model.spec, dtype, model.fp32_matmul)
        self.packed = packed_weights(model, dtype)
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.ctr = torch.zeros(2, dtype=torch.int64, device=device)
        self.bufs = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]
        B, _, H, W = shape
        self.pres = ([torch.empty(B, H, W, dtype=torch.uint8, device=device) for _ in range(2)]
                     if self.cfg.ALIVE else [None, None])
        self.out = torch.empty_like(self.bufs[0]) if self.cfg.ALIVE else None
        self.x = None  # the static input of __call__ / capture, allocated on first use
        self.graph = None
        self.decode = None if decoder is None else decode_epilogue(decoder, self.cfg, shape, dtype, device)

    def launch(self, k: int, src, src_pre, frame: bool = False, dst=None):
        """Step ``k`` of the rollout from ``src`` into ``dst`` (default: a ping-pong buffer); returns
        the buffers it wrote (pending form). ``frame``: decode this step's state (models without
        alive masks decode in this pass)."""
        dst, dst_pre = (self.bufs[k % 2] if dst is None else dst), self.pres[k % 2]
        decode = self.decode if frame and not self.cfg.ALIVE else None
        launch_step(self.cfg, self.spec, self.packed, src, src_pre, dst, dst_pre, self.ctr, step_offset=k,
                    origin=self.origin, fire_rate=self.spec.fire_rate, pending=k > 0, decode=decode)
        return dst, dst_pre

    def materialise(self, src, src_pre) -> torch.Tensor:
        """The true state of ``src`` in ``self.out`` (alive models: and its frame, if decoding)."""
        if self.cfg.ALIVE:
            launch_finalize(self.cfg, self.spec, src, src_pre, self.out, self.decode)
            return self.out
        if self.out is None:
            self.out = torch.empty_like(src)
        return self.out if src is self.out else self.out.copy_(src)

    def _run(self):
        if self.steps == 0:
            return self.out.copy_(self.x)
        src, src_pre = self.x, None
        for k in range(self.steps):
            last = k == self.steps - 1  # without alive masks the last step writes the result itself
            src, src_pre = self.launch(k, src, src_pre, frame=last,
                                       dst=self.out if last and not self.cfg.ALIVE else None)
        return self.materialise(src, src_pre)

    def capture(self):
        """Record the launches in a CUDA graph (replayed by ``__call__``)."""
        if self.device.type != "cuda":
            raise RuntimeError("FusedRollout.capture needs a CUDA device")
        self._static_input()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run()  # warm-up: compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._run()
        return self

    def _static_input(self):
        if self.x is None:
            self.x = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if self.out is None:
            self.out = torch.empty_like(self.x)
        return self.x

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, *, seed: int, start_step: int = 0) -> torch.Tensor:
        if tuple(x.shape) != self.shape or x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"FusedRollout was built for {self.shape} {self.dtype} on {self.device}, "
                             f"got {tuple(x.shape)} {x.dtype} on {x.device}")
        rng.check_seed(seed)
        if isinstance(start_step, bool) or not isinstance(start_step, int) or \
                not 0 <= start_step <= 2**32 - max(self.steps, 1):
            raise ValueError(f"start_step must be an int with 0 <= start_step and start_step + steps <= 2**32, "
                             f"got {start_step!r}")
        self._static_input().copy_(x)
        self.ctr.copy_(counter_tensor(seed, start_step, "cpu"))
        if self.graph is not None:
            self.graph.replay()
            return self.out
        return self._run()


def _fused_stream(model, x, steps, *, seed, start_step, every, origin, decoder=None):
    r = FusedRollout(model, x.shape, x.dtype, x.device, steps, origin, decoder)
    r.ctr.copy_(counter_tensor(seed, start_step, "cpu"))
    src, src_pre = x.contiguous(), None
    for k in range(steps):
        frame = (k + 1) % every == 0
        src, src_pre = r.launch(k, src, src_pre, frame)
        if frame:
            state = r.materialise(src, src_pre) if r.cfg.ALIVE else src
            yield k + 1, state, (r.decode.image if r.decode is not None else None)


@torch.no_grad()
def fused_frames(model, x, steps: int, *, seed: int, start_step: int, every: int,
                 origin) -> Iterator[Tuple[int, torch.Tensor]]:
    """Stream a fused rollout: one launch per step, one ``finalize`` per yielded frame for alive
    models. The yielded tensor is reused by later steps."""
    for k, state, _ in _fused_stream(model, x, steps, seed=seed, start_step=start_step, every=every,
                                     origin=origin):
        yield k, state


@torch.no_grad()
def fused_render(model, decoder, x, steps: int, *, seed: int = 0, start_step: int = 0, every: int = 1,
                 origin=(0, 0)) -> Iterator[Tuple[int, torch.Tensor]]:
    """Stream ``(steps_done, frame [B, K, H*R, W*R])`` of a rollout decoded by a pixel-shuffle head in
    the same pass as the step (finalize for alive models). The frame buffer is reused."""
    for k, _, image in _fused_stream(model, x, steps, seed=seed, start_step=start_step, every=every,
                                     origin=origin, decoder=decoder):
        yield k, image
