"""Weight packing: ``nn.Linear``-layout weights -> the kernels' layouts (transposed to ``[in, out]``,
zero padded to the tile sizes, matrices in the dot dtype, biases in fp32), one packer per layout, and
one cache that keeps a module's packed weights until its parameters change."""
from __future__ import annotations

from typing import Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch

from ..spec import NCASpec
from .config import LPPN_HIDDEN_SIZES, HeadConfig, filter_scales, hidden_chunks, pow2

_DOT_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


def dot_dtype(precision: str) -> torch.dtype:
    """The torch dtype of packed matrices for a kernel precision (``config.kernel_precision``)."""
    return _DOT_DTYPE.get(precision, torch.float32)


def cached(owner: torch.nn.Module, key: tuple, pack: Callable[[], object]):
    """``pack()``, cached on ``owner`` under ``key`` until any of its parameters is changed in place
    or replaced (the key includes each parameter's storage and version counter: optimizers,
    ``load_state_dict`` and in-place ops under ``torch.no_grad()`` count; writes through ``.data``,
    which PyTorch does not version, do not: call :func:`forget_packed` after them). Under
    ``torch.compile`` packing is traced into the graph instead (it is small)."""
    if torch.compiler.is_compiling():
        return pack()
    full = key + tuple((p.data_ptr(), p._version) for p in owner.parameters())
    cache = owner.__dict__.setdefault("_nca_fast_packed", {})
    if full not in cache:
        for k in [k for k in cache if k[:len(key)] == key]:  # stale versions of this packing
            del cache[k]
        with torch.no_grad():
            cache[full] = pack()
    return cache[full]


def forget_packed(owner: torch.nn.Module) -> None:
    """Drop ``owner``'s packed weights (and its submodules'): the next fused call packs them again."""
    for m in owner.modules():
        m.__dict__.pop("_nca_fast_packed", None)


def _tf32_split(w: torch.Tensor) -> torch.Tensor:
    """[2, *w.shape]: w's TF32 part (low 13 mantissa bits cleared) and the exact remainder; gradients
    reach ``w`` through the remainder (the TF32 part is a constant of the bit mask)."""
    hi = (w.detach().view(torch.int32) & -8192).view(torch.float32)
    return torch.stack([hi, w - hi])


def pack_step(params: Mapping[str, torch.Tensor], spec: NCASpec, precision: str, device,
              dtype: Optional[torch.dtype] = None):
    """Step weights: w1 [F, CP, HP], the bias block wb [16, HP] (row 0: b1, multiplied by a column
    of ones on the tensor cores) and w2 [HP, CP] in ``dtype`` (default: the dot dtype; float32 for
    training, which the op casts for its forward), zero padded (HP: see config.hidden_chunks; for
    "ieee" each as [2, ...]: its TF32 part, then the remainder, see step._mma); b2 [CP] and the filter
    scales [F] in fp32. Differentiable: under autograd the packed tensors carry the parameters'
    gradients back (the fused backward)."""
    C, F_, CP = spec.channels, spec.n_filters, pow2(spec.channels)
    HP = hidden_chunks(spec.hidden, CP, precision)[1]
    f32 = dict(dtype=torch.float32, device=device)
    wt = dict(dtype=dtype or dot_dtype(precision), device=device)
    w1 = torch.zeros(F_, CP, HP, **wt)
    w1[:, :C, :spec.hidden] = params["w1"].to(**wt).t().reshape(F_, C, spec.hidden)
    w2 = torch.zeros(HP, CP, **wt)
    w2[:spec.hidden, :C] = params["w2"].to(**wt).t()
    wb = torch.zeros(16, HP, **wt)
    b2 = torch.zeros(CP, **f32)
    if "b1" in params:
        wb[0, :spec.hidden] = params["b1"].to(**wt)
    if "b2" in params:
        b2[:C] = params["b2"].to(**f32)
    fscale = torch.tensor(filter_scales(spec), **f32)
    if precision == "ieee":
        w1, wb, w2 = (_tf32_split(w) for w in (w1, wb, w2))
    return w1, wb, w2, b2, fscale


class PackedHead(NamedTuple):
    """A pixel-shuffle head packed for the step's epilogue (or the decode-only kernel)."""

    config: HeadConfig
    weights: Tuple[torch.Tensor, ...]  # dw0, db0, dw1, db1


def pack_pixel_shuffle(dspec, params: Mapping[str, torch.Tensor], head: HeadConfig, precision: str,
                       device) -> Tuple[torch.Tensor, ...]:
    """The pixel-shuffle head for ``pixel_shuffle.pixel_shuffle_out``: dw0 [CP, max(DH, 16)],
    db0 [max(DH, 16)] (hidden head only), dw1 [DH or CP, NPAD], db1 [NPAD]."""
    p = {k: v.detach().to(device, torch.float32) for k, v in params.items()}
    C, N = dspec.channels, head.N
    last = "w1" if dspec.layers else "w0"
    dw1 = torch.zeros(head.DH or head.CP, head.NPAD, device=device)
    dw1[:dspec.hidden or C, :N] = p[last].t()
    db1 = torch.zeros(head.NPAD, device=device)
    db1[:N] = p["b" + last[1:]]
    dw0 = torch.zeros(head.CP, max(head.DH, 16), device=device)
    db0 = torch.zeros(max(head.DH, 16), device=device)
    if dspec.layers:
        dw0[:C, :dspec.hidden] = p["w0"].t()
        db0[:dspec.hidden] = p["b0"]
    wdt = dot_dtype(precision)
    return dw0.to(wdt), db0, dw1.to(wdt), db1


def lppn_hidden(hidden: int) -> int:
    """The padded hidden width the LPPN kernel runs a decoder of ``hidden`` at."""
    for s in LPPN_HIDDEN_SIZES:
        if hidden <= s:
            return s
    raise ValueError(f"LPPN hidden width {hidden} exceeds the largest supported {LPPN_HIDDEN_SIZES[-1]}")


def pack_lppn(dspec, params: Mapping[str, torch.Tensor], precision: str, device, k_pad: int) -> Dict:
    """The LPPN for ``decode.lppn_kernel``: layer 0 split into its state part (applied per cell by
    the launcher) and coordinate rows, omega folded into every sine layer, hidden padded."""
    p = {k: v.detach().to(device, torch.float32) for k, v in params.items()}
    hid = lppn_hidden(dspec.hidden)
    wdt = dot_dtype(precision)
    E, h, L = dspec.coord_features, dspec.hidden, dspec.layers
    w0 = p["w0"] * dspec.first_omega                      # [h, E + C], omega folded in
    b0 = p["b0"] * dspec.first_omega
    state_w = torch.zeros(hid, dspec.channels, device=device)
    state_w[:h] = w0[:, E:]
    state_b = torch.zeros(hid, device=device)
    state_b[:h] = b0
    coord_w = torch.zeros(E, hid, device=device)
    coord_w[:, :h] = w0[:, :E].t()
    wh = torch.zeros(max(L - 1, 1), hid, hid, device=device)
    bh = torch.zeros(max(L - 1, 1), hid, device=device)
    for i in range(1, L):
        wh[i - 1, :h, :h] = p[f"w{i}"].t() * dspec.hidden_omega
        bh[i - 1, :h] = p[f"b{i}"] * dspec.hidden_omega
    wo = torch.zeros(hid, k_pad, device=device)
    wo[:h, :dspec.out_channels] = p[f"w{L}"].t()
    bo = torch.zeros(k_pad, device=device)
    bo[:dspec.out_channels] = p[f"b{L}"]
    return dict(hid=hid, state_w=state_w, state_b=state_b, w0=coord_w.contiguous(),
                wh=wh.to(wdt).contiguous(), bh=bh, wo=wo.to(wdt).contiguous(), bo=bo)
