"""Cells-to-Pixels experiments (TheDevilWillBeBee/Cells2Pixels): the NCA and its SIREN decoder.

An experiment folder holds ``model.pth`` (the NCA's state dict), ``siren.pth`` (``Siren.state_dict()``)
and ``config.yaml`` (``training/common.py``); the checkpoints are read with
``torch.load(weights_only=True)`` only (:func:`nca_fast.io.torch_port.torch_load`), the config with
``yaml.safe_load``. Key names (``models/siren.py``, ``models/nca2d.py``):

* Siren: ``net.0.linear.{weight,bias}`` (first sine layer, input ``[coords_enc; state]``),
  ``net.i.linear.*`` (hidden sine layers), ``net.L.{weight,bias}`` (linear output,
  ``outermost_linear=True``). Not recoverable from the weights, so taken from ``config.yaml`` or
  passed in (defaults = their configs): ``siren.first_omega_0`` / ``hidden_omega_0`` (10),
  ``renderer.scale_factor`` (8), ``renderer.padding`` (circular); ``num_frequencies`` is inferred
  from ``channels``. Supported: ``fx="linear"``, ``activation="sin"``, ``disable=disable_coords=False``.
* NCA: ``w1.weight [fc, 4C, 1, 1]``, ``w1.bias``, ``w2.weight [C, fc, 1, 1]`` (no bias). Their
  perception is interleaved per channel (identity, Sobel-x, Sobel-y, Laplacian of channel 0, ...),
  unscaled Sobel ``[[-1,0,1],[-2,0,2],[-1,0,1]]`` and Laplacian ``[[1,2,1],[2,-12,2],[1,2,1]]``,
  padded by ``nca.nca_kwargs.padding`` (circular); ``w1`` is permuted to nca_fast's blocked order.
  ``GrowingNCA`` pools its alive mask with ``max_pool2d(..., padding=1)``: cells outside the grid
  never count, whatever the perception padding (``alive_padding="ignore"``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional, Tuple

import torch

from ..decoders.lppn import LPPNDecoder
from ..decoders.spec import LPPN_PADDINGS, DecoderSpec
from ..model import NCA
from ..spec import PADDINGS, Filter, NCASpec
from ..utils.files import read_input
from ..utils.optional import optional_import
from .common import listing
from .errors import ModelFormatError
from .torch_port import torch_load

NCA_TYPES = ("NCA", "NoiseNCA", "GrowingNCA")
MAX_CONFIG_BYTES = 1 << 20


def _state_dict(path) -> dict:
    sd = torch_load(path)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFormatError(path, f"expected a state dict of tensors, got {type(sd).__name__}")
    return {str(k): v for k, v in sd.items()}


def cells2pixels_decoder(state_dict: Mapping[str, torch.Tensor], *, channels: Optional[int] = None,
                         num_frequencies: Optional[int] = None, scale: int = 8,
                         padding: str = "circular", first_omega: float = 10.0,
                         hidden_omega: float = 10.0, name: str = "", path="siren state dict") -> LPPNDecoder:
    """An :class:`LPPNDecoder` from a Cells-to-Pixels ``Siren.state_dict()``.

    Give ``channels`` (NCA state channels) or ``num_frequencies`` to split the first layer's input
    into coordinate encoding and state (their input order: encoding first)."""
    layers = {}
    for key, t in state_dict.items():
        m = re.fullmatch(r"net\.(\d{1,3})\.(linear\.)?(weight|bias)", str(key))
        if not m or not isinstance(t, torch.Tensor):
            raise ModelFormatError(path, f"unexpected entry {str(key)[:60]!r} in a Cells-to-Pixels Siren state dict")
        layers.setdefault(int(m.group(1)), {})[(bool(m.group(2)), m.group(3))] = t
    n = len(layers)
    if sorted(layers) != list(range(n)) or n < 2:
        raise ModelFormatError(path, f"Siren state dict needs layers net.0 .. net.L (L >= 1), got "
                                     f"{sorted(layers)[:8]}")
    for i in range(n):
        sine = i < n - 1
        if set(layers[i]) != {(sine, "weight"), (sine, "bias")}:
            if not sine and (True, "weight") in layers[i]:
                raise ModelFormatError(path, "unsupported Siren: outermost_linear=False (sine on the output)")
            if i == 0 and (False, "weight") in layers[i]:
                raise ModelFormatError(path, "unsupported Siren: disable=True (no SIREN layers)")
            what = f"sine layer net.{i}.linear" if sine else f"linear output net.{i}"
            raise ModelFormatError(path, f"Siren state dict: expected {what}.weight/.bias")
    w = [layers[i][(i < n - 1, "weight")] for i in range(n)]
    b = [layers[i][(i < n - 1, "bias")] for i in range(n)]
    if w[0].dim() != 2:
        raise ModelFormatError(path, f"net.0.linear.weight must be 2-D, got {list(w[0].shape)}")
    hidden, n_in = w[0].shape
    if channels is not None:
        E = n_in - channels
        if E == 2:
            freqs = 0
        elif E > 0 and E % 4 == 0:
            freqs = E // 4
        else:
            raise ModelFormatError(path, f"first layer takes {n_in} inputs: {channels} channels leave {E} for "
                                         "the coordinate encoding (needs 2 or a multiple of 4)")
        if num_frequencies is not None and num_frequencies != freqs:
            raise ModelFormatError(path, f"channels={channels} implies num_frequencies={freqs}, "
                                         f"got {num_frequencies}")
    elif num_frequencies is not None:
        freqs = num_frequencies
        channels = n_in - (2 if freqs == 0 else 4 * freqs)
        if channels < 1:
            raise ModelFormatError(path, f"first layer takes {n_in} inputs, too few for num_frequencies={freqs}")
    else:
        raise ValueError("give channels= or num_frequencies= (from the checkpoint's config.yaml)")
    try:
        spec = DecoderSpec("lppn", channels, int(w[-1].shape[0]), scale, int(hidden), n - 1, padding,
                           freqs, first_omega, hidden_omega, name)
        weights = {}
        for i in range(n):
            weights[f"w{i}"], weights[f"b{i}"] = w[i], b[i]
        return LPPNDecoder(spec, weights)
    except (TypeError, ValueError) as e:
        raise ModelFormatError(path, str(e)) from None


def cells2pixels_nca(state_dict: Mapping[str, torch.Tensor], *, nca_type: str = "NCA",
                     padding: str = "circular", fire_rate: Optional[float] = None,
                     path="NCA state dict") -> NCA:
    """An :class:`nca_fast.NCA` from a Cells-to-Pixels ``models/nca2d.py`` state dict.

    ``nca_type``: ``"NCA"`` (texture), ``"NoiseNCA"`` (fire rate 1; its noise seed is not
    reproduced: seeds are zeros) or ``"GrowingNCA"`` (alive mask on channel 3, pooled with outside
    cells ignored, centre seed). ``padding``: the perception's (their ``nca_kwargs.padding``).
    ``fire_rate``: their ``update_prob`` (0.5; NoiseNCA always 1). PENCA is not supported."""
    if nca_type not in NCA_TYPES:
        raise ValueError(f"nca_type must be one of {NCA_TYPES}, got {nca_type!r}")
    extra = set(state_dict) - {"w1.weight", "w1.bias", "w2.weight", "noise_level"}
    if extra or not {"w1.weight", "w1.bias", "w2.weight"} <= set(state_dict):
        keys = listing(sorted(map(str, state_dict)))
        raise ModelFormatError(path, f"not a Cells-to-Pixels NCA state dict: keys {keys}")
    w1 = state_dict["w1.weight"].float().flatten(1)  # [fc, 4C]
    w2 = state_dict["w2.weight"].float().flatten(1)  # [C, fc]
    C, fc = w2.shape
    if w1.shape == (fc, 4 * C + 2):
        raise ModelFormatError(path, "PENCA checkpoints (2 positional-encoding channels) are not supported")
    if w1.shape != (fc, 4 * C):
        raise ModelFormatError(path, f"w1.weight {tuple(state_dict['w1.weight'].shape)} does not match "
                                     f"w2.weight {tuple(state_dict['w2.weight'].shape)} (expected [fc, 4C, 1, 1])")
    growing = nca_type == "GrowingNCA"
    rate = 1.0 if nca_type == "NoiseNCA" else (0.5 if fire_rate is None else fire_rate)
    try:
        spec = NCASpec(
            channels=C, hidden=fc, padding=padding, update_bias=False,
            filters=tuple(Filter.preset(n, 1.0) for n in ("identity", "sobel_x", "sobel_y", "laplacian")),
            fire_rate=rate, alive_channel=3 if growing else None,
            alive_padding="ignore" if growing else None,
            render="rgba_premultiplied" if growing else "rgb_affine", render_scale=0.5,
            render_offset=0.5, seed_kind="center" if growing else "zeros", name=f"cells2pixels-{nca_type}")
        w1_blocked = w1.view(fc, C, 4).permute(0, 2, 1).reshape(fc, 4 * C)  # c*4+f -> f*C+c
        return NCA(spec, {"w1": w1_blocked, "b1": state_dict["w1.bias"].float(), "w2": w2})
    except (TypeError, ValueError) as e:
        raise ModelFormatError(path, str(e)) from None


def read_config(path) -> dict:
    """An experiment's ``config.yaml`` (``yaml.safe_load``; bounded), as a dict."""
    yaml = optional_import("yaml", "formats")
    text = read_input(path, limit=MAX_CONFIG_BYTES, what="config file", error=ModelFormatError)
    try:
        config = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as e:
        raise ModelFormatError(path, f"not a readable YAML config ({str(e)[:200]})") from None
    if not isinstance(config, dict):
        raise ModelFormatError(path, f"expected a mapping at the top level, got {type(config).__name__}")
    return config


def _section(config: dict, *keys) -> dict:
    for k in keys:
        config = config.get(k) if isinstance(config, dict) else None
    return config if isinstance(config, dict) else {}


def _check_config_values(cfg_path: Path, kwargs: Mapping, renderer: Mapping) -> None:
    """The values ``config.yaml`` gives the NCA and the renderer, refused naming that file (not the
    checkpoint that would otherwise fail to build)."""
    checks = (("nca_kwargs.padding", kwargs.get("padding", "circular"), lambda v: v in PADDINGS, f"one of {PADDINGS}"),
              ("nca_kwargs.update_prob", kwargs.get("update_prob", 0.5),
               lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1, "a number in [0, 1]"),
              ("renderer.padding", renderer.get("padding", "circular"), lambda v: v in LPPN_PADDINGS,
               f"one of {LPPN_PADDINGS}"),
              ("renderer.scale_factor", renderer.get("scale_factor", 8),
               lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive int"))
    for key, value, ok, want in checks:
        if not ok(value):
            raise ModelFormatError(cfg_path, f"{key} must be {want}, got {str(value)[:40]!r}")


def load_cells2pixels(directory, *, nca_type: Optional[str] = None, suffix: str = "",
                      nca_padding: Optional[str] = None, **decoder_kw) -> Tuple[NCA, LPPNDecoder]:
    """``(NCA, LPPNDecoder)`` from a Cells-to-Pixels experiment folder (``model{suffix}.pth``,
    ``siren{suffix}.pth`` and, when present, ``config.yaml``, which sets the NCA type, both paddings,
    the update probability, the scale and the SIREN's frequencies). Keyword arguments override it:
    ``nca_type``, ``nca_padding`` and those of :func:`cells2pixels_decoder` (``padding`` is the
    renderer's)."""
    directory = Path(directory)
    cfg_path = directory / "config.yaml"
    config = read_config(cfg_path) if cfg_path.exists() else {}
    nca_cfg, siren_cfg = _section(config, "nca"), _section(config, "siren")
    kwargs, renderer = _section(config, "nca", "nca_kwargs"), _section(config, "renderer")
    for key, want in (("outermost_linear", True), ("fx", "linear"), ("activation", "sin"), ("disable", False),
                      ("disable_coords", False)):
        if key in siren_cfg and siren_cfg[key] != want:
            raise ModelFormatError(cfg_path, f"unsupported Siren: {key}={siren_cfg[key]!r} (needs {want!r})")
    if nca_cfg.get("output_type", "s") != "s":
        raise ModelFormatError(cfg_path, "unsupported: output_type 'z' (the SIREN reads the perception)")
    if nca_type is None:
        nca_type = nca_cfg.get("type", "NCA")
        if nca_type not in NCA_TYPES:
            raise ModelFormatError(cfg_path, f"unsupported NCA type {str(nca_type)[:40]!r} (supported: "
                                             f"{', '.join(NCA_TYPES)})")
    _check_config_values(cfg_path, kwargs, renderer)
    nca_padding = nca_padding or kwargs.get("padding", "circular")
    nca = cells2pixels_nca(_state_dict(directory / f"model{suffix}.pth"), nca_type=nca_type,
                           padding=nca_padding, fire_rate=kwargs.get("update_prob"),
                           path=directory / f"model{suffix}.pth")
    decoder_kw.setdefault("padding", renderer.get("padding", "circular"))
    decoder_kw.setdefault("scale", renderer.get("scale_factor", 8))
    for ours, theirs in (("first_omega", "first_omega_0"), ("hidden_omega", "hidden_omega_0")):
        if theirs in siren_cfg:
            decoder_kw.setdefault(ours, siren_cfg[theirs])
    if "num_frequencies" not in decoder_kw:
        decoder_kw.setdefault("channels", nca.spec.channels)
    siren = directory / f"siren{suffix}.pth"
    return nca, cells2pixels_decoder(_state_dict(siren), path=siren, **decoder_kw)
