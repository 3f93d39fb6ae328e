"""Distill *Growing NCA* WebGL models: a JSON list of two 8-bit layers.

Each layer is ``{data_b64, in_ch, out_ch, weight_scale, bias_scale, type: "uint8"}``; ``data_b64``
holds ``(in_ch + 1) x out_ch`` bytes laid out ``[in, out]`` row-major, the last row the bias, and
``value = (byte / 255 - 0.5) * scale`` (``bias_scale`` for the bias row). Perception is blocked.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..model import NCA
from ..spec import growing_spec
from .common import channels_from, decode_b64, make_nca, make_spec
from .errors import ModelFormatError

_KEYS = ("data_b64", "in_ch", "out_ch", "weight_scale", "bias_scale")


def matches(obj) -> bool:
    """Whether parsed JSON looks like a WebGL growing model."""
    return (isinstance(obj, list) and len(obj) > 0 and all(isinstance(l, dict) for l in obj)
            and "data_b64" in obj[0])


def _layer(path, layer: dict, i: int):
    """One layer -> ``(weight [out, in], bias [out])`` float32 tensors."""
    missing = [k for k in _KEYS if k not in layer]
    if missing:
        raise ModelFormatError(path, f"layer {i} lacks {missing}")
    if layer.get("type", "uint8") != "uint8":
        raise ModelFormatError(path, f"layer {i}: only type 'uint8' is supported, got {layer['type']!r}")
    n_in, n_out = layer["in_ch"], layer["out_ch"]
    if not all(isinstance(v, int) and v > 0 for v in (n_in, n_out)):
        raise ModelFormatError(path, f"layer {i}: in_ch/out_ch must be positive ints, got {n_in!r}/{n_out!r}")
    scales = (layer["weight_scale"], layer["bias_scale"])
    if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scales):
        raise ModelFormatError(path, f"layer {i}: weight_scale/bias_scale must be finite numbers")
    raw = decode_b64(path, layer["data_b64"], f"layer {i} data_b64")
    if len(raw) != (n_in + 1) * n_out:
        raise ModelFormatError(path, f"layer {i}: data_b64 holds {len(raw)} bytes, expected "
                                     f"(in_ch + 1) * out_ch = {(n_in + 1) * n_out}")
    # float64 for the affine dequantisation, then float32 (the values the demo's shader sees).
    q = np.frombuffer(raw, np.uint8).reshape(n_in + 1, n_out).astype(np.float64) / 255.0 - 0.5
    w = torch.from_numpy((q[:-1] * scales[0]).T.astype(np.float32))  # [in, out] -> [out, in]
    b = torch.from_numpy((q[-1] * scales[1]).astype(np.float32))
    return w, b


def load(path, obj) -> NCA:
    if len(obj) != 2:
        raise ModelFormatError(path, f"a WebGL growing model has 2 layers, this file has {len(obj)}")
    (w1, b1), (w2, b2) = (_layer(path, layer, i) for i, layer in enumerate(obj))
    channels = channels_from(path, w1.shape[1], 3, "WebGL growing model (identity, sobel_x, sobel_y)")
    if w2.shape != (channels, w1.shape[0]):
        raise ModelFormatError(path, f"layer 1 is {w2.shape[1]} -> {w2.shape[0]}, expected {w1.shape[0]} -> "
                                     f"{channels} to match layer 0 ({w1.shape[1]} -> {w1.shape[0]})")
    spec = make_spec(path, growing_spec, channels=channels, hidden=w1.shape[0])
    return make_nca(path, spec, {"w1": w1, "b1": b1, "w2": w2, "b2": b2})
