"""Distill *Self-Organising Textures* ``models.json``: many 8-bit models tiled in PNG images.

``{model_names: [...], layers: [{data: "data:image/png;base64,...", shape: [in + 1, out],
layout: [columns, rows], scale, quant_scale_zero}, ...]}``. Model i's tile sits at tile-row
``i // columns``, tile-column ``i % columns``; in a tile (``in + 1`` rows, ``ceil(out / 4)`` pixels
wide) pixel ``(r, c)`` channel ``k`` holds input row ``r`` (the last row the bias), output
``4c + k``, and ``value = (byte - 127) / 255 * scale``. Perception is blocked.
"""
from __future__ import annotations

import io
import math
from typing import List, Optional

import numpy as np
import torch

from ..model import NCA
from ..spec import texture_spec
from ..utils.optional import optional_import
from .common import channels_from, decode_b64, listing, make_nca, make_spec
from .errors import ModelFormatError

_N_FILTERS = 4  # identity, sobel_x, sobel_y, laplacian
MAX_PIXELS = 1 << 24  # of a layer's PNG (the published file's largest is ~100 x 600)


def matches(obj) -> bool:
    """Whether parsed JSON looks like a texture ``models.json``."""
    return isinstance(obj, dict) and "model_names" in obj and "layers" in obj


def names(path, obj) -> List[str]:
    """The model names of a texture file, checked."""
    names = obj["model_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ModelFormatError(path, "model_names must be a non-empty list of strings")
    return names


def _positive_pair(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) and i > 0 for i in v)


def _png(path, data, i: int, size) -> np.ndarray:
    """A layer's PNG data URL -> uint8 ``[height, width, 4]``; ``size`` = the (width, height) its
    shape and layout need, checked from the header before the image is decoded."""
    if not isinstance(data, str) or "," not in data:
        raise ModelFormatError(path, f"layer {i}: data must be a PNG data URL")
    header, payload = data.split(",", 1)
    if header.lower() != "data:image/png;base64":
        raise ModelFormatError(path, f"layer {i}: data must be a base64 PNG data URL, got {header[:40]!r}")
    raw = decode_b64(path, payload, f"layer {i} PNG")
    Image = optional_import("PIL.Image", "formats")
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as im:
            if im.size != tuple(size):
                raise ModelFormatError(path, f"layer {i}: PNG is {im.size[0]}x{im.size[1]} (WxH), its shape "
                                             f"and layout need {size[0]}x{size[1]}")
            if im.mode != "RGBA":
                raise ModelFormatError(path, f"layer {i}: PNG must be RGBA, got mode {im.mode}")
            return np.asarray(im.copy())  # copy() decodes fully, so truncation fails here
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ModelFormatError(path, f"layer {i}: cannot decode the PNG ({e})") from None


def _layer(path, layer, i: int, index: int, n_models: int):
    """Model ``index``'s weights of layer ``i`` -> ``(weight [out, in], bias [out])`` float32."""
    if not isinstance(layer, dict) or not {"data", "shape", "layout", "scale"} <= set(layer):
        raise ModelFormatError(path, f"layer {i} must have data, shape, layout and scale")
    shape, layout, scale = layer["shape"], layer["layout"], layer["scale"]
    if not (_positive_pair(shape) and shape[0] > 1):
        raise ModelFormatError(path, f"layer {i}: shape must be [inputs + 1, outputs], got {shape!r}")
    if not _positive_pair(layout):
        raise ModelFormatError(path, f"layer {i}: layout must be [columns, rows], got {layout!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ModelFormatError(path, f"layer {i}: scale must be a finite number, got {scale!r}")
    if layout[0] * layout[1] < n_models:
        raise ModelFormatError(path, f"layer {i}: layout {layout} has fewer tiles than {n_models} models")
    rows, out = shape
    tile_w = -(-out // 4)
    size = (tile_w * layout[0], rows * layout[1])
    if size[0] * size[1] > MAX_PIXELS:
        raise ModelFormatError(path, f"layer {i}: shape {shape} and layout {layout} declare a "
                                     f"{size[0]}x{size[1]} PNG, more than the {MAX_PIXELS} pixels this reads")
    img = _png(path, layer["data"], i, size)
    r0, c0 = (index // layout[0]) * rows, (index % layout[0]) * tile_w
    tile = img[r0:r0 + rows, c0:c0 + tile_w].reshape(rows, tile_w * 4)[:, :out]  # [in + 1, out]
    q = (tile.astype(np.float64) - 127.0) / 255.0 * scale
    w = torch.from_numpy(q[:-1].T.astype(np.float32))
    b = torch.from_numpy(q[-1].astype(np.float32))
    return w, b


def load(path, obj, name: Optional[str]) -> NCA:
    models = names(path, obj)
    if name is None or name not in models:
        what = (f"has no model {name!r}" if name else
                f"holds {len(models)} models, pick one by name (--name; in `nca-fast bench`, --model-name; "
                f"name= in Python)")
        raise ModelFormatError(path, f"texture file {what}; available: {listing(models, 80)}")
    layers = obj["layers"]
    if not isinstance(layers, list) or len(layers) != 2:
        raise ModelFormatError(path, "a texture model needs exactly 2 layers")
    index = models.index(name)
    (w1, b1), (w2, b2) = (_layer(path, l, i, index, len(models)) for i, l in enumerate(layers))
    channels = channels_from(path, w1.shape[1], _N_FILTERS,
                             "texture model (identity, sobel_x, sobel_y, laplacian)")
    if w2.shape != (channels, w1.shape[0]):
        raise ModelFormatError(path, f"layer 1 is {w2.shape[1]} -> {w2.shape[0]}, expected "
                                     f"{w1.shape[0]} -> {channels} to match layer 0")
    spec = make_spec(path, texture_spec, channels=channels, hidden=w1.shape[0], name=name)
    return make_nca(path, spec, {"w1": w1, "b1": b1, "w2": w2, "b2": b2})
