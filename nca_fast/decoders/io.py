"""Save / load decoders (safetensors + spec JSON) and import Cells-to-Pixels checkpoints.

Native format: a safetensors file holding ``w0, b0, ...`` (float32) with metadata
``{"format": "nca_fast.decoder/1", "spec": DecoderSpec JSON}``; written atomically.

Cells-to-Pixels (TheDevilWillBeBee/Cells2Pixels) saves ``siren.pth`` = ``Siren.state_dict()`` and
``model.pth`` = the NCA's state dict (``training/common.py``), read here with
``torch.load(weights_only=True)`` only. Key names (``models/siren.py``, ``models/nca2d.py``):

* Siren: ``net.0.linear.{weight,bias}`` (first sine layer, input ``[coords_enc; state]``),
  ``net.i.linear.*`` (hidden sine layers), ``net.L.{weight,bias}`` (linear output,
  ``outermost_linear=True``). Not recoverable from the weights, so passed in (defaults = their
  configs): ``first_omega_0``/``hidden_omega_0`` (10), ``renderer.scale_factor`` (8),
  ``renderer.padding``; ``num_frequencies`` is inferred from ``channels`` when given.
  Assumed: ``fx="linear"``, ``activation="sin"``, ``disable=disable_coords=False``.
* NCA: ``w1.weight [fc, 4C, 1, 1]``, ``w1.bias``, ``w2.weight [C, fc, 1, 1]`` (no bias). Their
  perception is interleaved per channel (identity, Sobel-x, Sobel-y, Laplacian of channel 0, ...),
  unscaled Sobel ``[[-1,0,1],[-2,0,2],[-1,0,1]]`` and Laplacian ``[[1,2,1],[2,-12,2],[1,2,1]]``;
  ``w1`` is permuted here to nca_fast's blocked order.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Tuple

import torch

from .spec import DecoderSpec

FORMAT = "nca_fast.decoder/1"


def _safetensors():
    try:
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError('saving/loading decoders needs safetensors: pip install "nca-fast[formats]"') from e
    return safetensors.torch, safe_open


def save_decoder(decoder, path) -> Path:
    """Write ``decoder`` to ``path`` (safetensors); atomic (temp file + rename)."""
    st, _ = _safetensors()
    path = Path(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in decoder.params().items()}
    meta = {"format": FORMAT, "spec": decoder.spec.to_json()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        st.save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_decoder(path, device=None):
    """Read a decoder written by :func:`save_decoder`."""
    from . import build_decoder

    _, safe_open = _safetensors()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no decoder file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an nca_fast decoder (format tag {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    try:
        spec = DecoderSpec.from_json(meta["spec"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt decoder spec metadata: {e}") from e
    dec = build_decoder(spec, tensors)
    return dec if device is None else dec.to(device)


# ---- Cells-to-Pixels ----------------------------------------------------------------------------
def _torch_load(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return dict(sd)


def cells2pixels_decoder(state_dict: Mapping[str, torch.Tensor], *, channels: Optional[int] = None,
                         num_frequencies: Optional[int] = None, scale: int = 8,
                         padding: str = "circular", first_omega: float = 10.0,
                         hidden_omega: float = 10.0, name: str = ""):
    """An :class:`LPPNDecoder` from a Cells-to-Pixels ``Siren.state_dict()``.

    Give ``channels`` (NCA state channels) or ``num_frequencies`` to split the first layer's input
    into coordinate encoding and state (their input order: encoding first)."""
    from .lppn import LPPNDecoder

    layers = {}
    for key, t in state_dict.items():
        m = re.fullmatch(r"net\.(\d+)\.(linear\.)?(weight|bias)", key)
        if not m:
            raise ValueError(f"unexpected key {key!r} in a Cells-to-Pixels Siren state dict")
        layers.setdefault(int(m.group(1)), {})[(bool(m.group(2)), m.group(3))] = t
    n = len(layers)
    if sorted(layers) != list(range(n)) or n < 2:
        raise ValueError(f"Siren state dict needs layers net.0 .. net.L (L >= 1), got {sorted(layers)}")
    for i in range(n):
        sine = i < n - 1
        if set(layers[i]) != {(sine, "weight"), (sine, "bias")}:
            what = "sine layer net.{i}.linear" if sine else "linear output net.{i}"
            if not sine and (True, "weight") in layers[i]:
                raise ValueError("unsupported Siren: outermost_linear=False (sine on the output)")
            if i == 0 and (False, "weight") in layers[i]:
                raise ValueError("unsupported Siren: disable=True (no SIREN layers)")
            raise ValueError(f"Siren state dict: expected {what.format(i=i)}.weight/.bias")
    w = [layers[i][(i < n - 1, "weight")] for i in range(n)]
    b = [layers[i][(i < n - 1, "bias")] for i in range(n)]
    hidden, n_in = w[0].shape
    if channels is not None:
        E = n_in - channels
        if E == 2:
            freqs = 0
        elif E > 0 and E % 4 == 0:
            freqs = E // 4
        else:
            raise ValueError(f"first layer takes {n_in} inputs: {channels} channels leave {E} for the "
                             "coordinate encoding (needs 2 or a multiple of 4)")
        if num_frequencies is not None and num_frequencies != freqs:
            raise ValueError(f"channels={channels} implies num_frequencies={freqs}, got {num_frequencies}")
    elif num_frequencies is not None:
        freqs = num_frequencies
        channels = n_in - (2 if freqs == 0 else 4 * freqs)
        if channels < 1:
            raise ValueError(f"first layer takes {n_in} inputs, too few for num_frequencies={freqs}")
    else:
        raise ValueError("give channels= or num_frequencies= (from the checkpoint's config.yaml)")
    spec = DecoderSpec("lppn", channels, int(w[-1].shape[0]), scale, int(hidden), n - 1, padding,
                       freqs, first_omega, hidden_omega, name)
    weights = {}
    for i in range(n):
        weights[f"w{i}"], weights[f"b{i}"] = w[i], b[i]
    return LPPNDecoder(spec, weights)


def cells2pixels_nca(state_dict: Mapping[str, torch.Tensor], *, nca_type: str = "NCA",
                     padding: str = "circular"):
    """An :class:`nca_fast.NCA` from a Cells-to-Pixels ``models/nca2d.py`` state dict.

    ``nca_type``: ``"NCA"`` (texture), ``"NoiseNCA"`` (fire rate 1; its noise seed is not
    reproduced: seeds are zeros) or ``"GrowingNCA"`` (alive mask on channel 3, centre seed).
    PENCA (positional-encoding channels) is not supported."""
    from ..model import NCA
    from ..spec import Filter, NCASpec

    if nca_type not in ("NCA", "NoiseNCA", "GrowingNCA"):
        raise ValueError(f"nca_type must be NCA, NoiseNCA or GrowingNCA, got {nca_type!r}")
    extra = set(state_dict) - {"w1.weight", "w1.bias", "w2.weight", "noise_level"}
    if extra or not {"w1.weight", "w1.bias", "w2.weight"} <= set(state_dict):
        raise ValueError(f"not a Cells-to-Pixels NCA state dict: keys {sorted(state_dict)}")
    w1 = state_dict["w1.weight"].float().flatten(1)  # [fc, 4C]
    w2 = state_dict["w2.weight"].float().flatten(1)  # [C, fc]
    C, fc = w2.shape
    if w1.shape == (fc, 4 * C + 2):
        raise ValueError("PENCA checkpoints (2 positional-encoding channels) are not supported")
    if w1.shape != (fc, 4 * C):
        raise ValueError(f"w1.weight {tuple(state_dict['w1.weight'].shape)} does not match "
                         f"w2.weight {tuple(state_dict['w2.weight'].shape)} (expected [fc, 4C, 1, 1])")
    growing = nca_type == "GrowingNCA"
    spec = NCASpec(
        channels=C, hidden=fc, padding=padding, update_bias=False,
        filters=tuple(Filter.preset(n, 1.0) for n in ("identity", "sobel_x", "sobel_y", "laplacian")),
        fire_rate=1.0 if nca_type == "NoiseNCA" else 0.5, alive_channel=3 if growing else None,
        render="rgba_premultiplied" if growing else "rgb_affine", render_scale=0.5,
        render_offset=0.5, seed_kind="center" if growing else "zeros", name=f"cells2pixels-{nca_type}")
    w1_blocked = w1.view(fc, C, 4).permute(0, 2, 1).reshape(fc, 4 * C)  # c*4+f -> f*C+c
    return NCA(spec, {"w1": w1_blocked, "b1": state_dict["w1.bias"].float(), "w2": w2})


def load_cells2pixels(directory, *, nca_type: str = "NCA", suffix: str = "",
                      **decoder_kw) -> Tuple[object, object]:
    """``(NCA, LPPNDecoder)`` from a Cells-to-Pixels experiment folder (``model{suffix}.pth``,
    ``siren{suffix}.pth``). ``decoder_kw``: see :func:`cells2pixels_decoder` (``channels`` defaults
    to the NCA's)."""
    directory = Path(directory)
    nca = cells2pixels_nca(_torch_load(directory / f"model{suffix}.pth"), nca_type=nca_type,
                           padding=decoder_kw.get("padding", "circular"))
    if "num_frequencies" not in decoder_kw:
        decoder_kw.setdefault("channels", nca.spec.channels)
    dec = cells2pixels_decoder(_torch_load(directory / f"siren{suffix}.pth"), **decoder_kw)
    return nca, dec
