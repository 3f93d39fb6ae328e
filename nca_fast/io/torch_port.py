"""State dicts of PyTorch ports of the Growing NCA, read with ``torch.load(weights_only=True)`` only.

Recognised by structure:

* ``fc0.weight [H, 3C]``, ``fc0.bias``, ``fc1.weight [C, H]`` (``nn.Linear``; chenmingxiang110's
  port). That port runs on a height/width-transposed state, so its perception is blocked
  ``[identity, d/drow, d/dcol]``: its two Sobel blocks are swapped into ``[sobel_x, sobel_y]``
  so that the shape grows upright.
* two chained 1x1 convolutions ``<prefix>.<i>.weight [H, 3C, 1, 1]`` and ``[C, H, 1, 1]`` (+ biases)
  of an ``nn.Sequential`` (``dmodel.0 / dmodel.2`` of the PyTorch translations of the Distill
  notebook). Those build the depthwise perception like TF (``[identity, sobel_x, sobel_y]``
  repeated per channel, ``groups=C``), so their inputs are interleaved and get reordered.
"""
from __future__ import annotations

import pickle
import re
from typing import Dict, Mapping

import torch

from ..model import NCA
from ..spec import growing_spec
from .common import channels_from, interleaved_to_blocked, make_nca, make_spec, swap_blocks
from .errors import ModelFormatError

_WRAPPERS = ("state_dict", "model_state_dict", "model")


def _read(path) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            lines = [l.strip() for l in str(e).splitlines()[1:] if l.strip()]  # [0]: torch's preamble
            why = " ".join(l for l in lines if not l.startswith(("Check the documentation", "Please file")))
            raise ModelFormatError(path, "refused: the pickle needs code to run, which nca_fast never does "
                                         f"(torch.load weights_only=True: {why})") from None
        raise ModelFormatError(path, f"corrupt pickle ({e})") from None
    except Exception as e:  # noqa: BLE001  arbitrary bytes fail in many ways inside torch.load
        raise ModelFormatError(path, f"not a readable PyTorch file ({type(e).__name__}: {e})") from None
    for key in _WRAPPERS:  # {"state_dict": {...}} checkpoints
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFormatError(path, f"expected a state dict of tensors, got {type(obj).__name__}")
    return {re.sub(r"^module\.", "", str(k)): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _fc_layout(path, sd):
    """chenmingxiang110: nn.Linear fc0 / fc1, blocked with the Sobel blocks reversed."""
    w1, w2 = sd["fc0.weight"], sd["fc1.weight"]
    if w1.dim() != 2 or w2.dim() != 2:
        raise ModelFormatError(path, f"fc0.weight / fc1.weight must be 2-D, got {list(w1.shape)} / "
                                     f"{list(w2.shape)}")
    channels = channels_from(path, w1.shape[1], 3, "PyTorch port (identity, sobel rows, sobel cols)")
    weights = {"w1": swap_blocks(w1, channels, 1, 2), "w2": w2,
               "b1": sd.get("fc0.bias"), "b2": sd.get("fc1.bias")}
    return weights, {"fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias"}


def _conv_layout(path, sd):
    """nn.Sequential of two 1x1 convolutions, interleaved perception."""
    convs = sorted((k for k, v in sd.items() if k.endswith(".weight") and v.dim() == 4),
                   key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")])
    if len(convs) != 2 or any(tuple(sd[k].shape[2:]) != (1, 1) for k in convs):
        shapes = {k: list(sd[k].shape) for k in convs}
        raise ModelFormatError(path, f"expected two 1x1 convolutions (the update MLP), found {shapes}")
    (k1, k2), bias = convs, lambda k: k[: -len("weight")] + "bias"
    w1, w2 = sd[k1][:, :, 0, 0], sd[k2][:, :, 0, 0]
    channels_from(path, w1.shape[1], 3, "PyTorch port (identity, sobel_x, sobel_y)")
    return ({"w1": interleaved_to_blocked(w1, 3), "w2": w2, "b1": sd.get(bias(k1)), "b2": sd.get(bias(k2))},
            {k1, k2, bias(k1), bias(k2)})


def load(path) -> NCA:
    sd = _read(path)
    if "fc0.weight" in sd and "fc1.weight" in sd:
        weights, used = _fc_layout(path, sd)
    elif any(v.dim() == 4 for v in sd.values()):
        weights, used = _conv_layout(path, sd)
    else:
        raise ModelFormatError(path, f"unknown PyTorch state dict layout: {sorted(sd)}")
    extra = sorted(set(sd) - used)
    if extra:
        raise ModelFormatError(path, f"unexpected tensors {extra} (stored perception kernels or deeper "
                                     "MLPs are not supported)")
    weights = {k: v for k, v in weights.items() if v is not None}
    w1, w2 = weights["w1"], weights["w2"]
    if w1.shape[1] != 3 * w2.shape[0]:
        raise ModelFormatError(path, f"first layer has {w1.shape[1]} inputs, expected 3 x {w2.shape[0]} "
                                     "(the second layer's outputs)")
    spec = make_spec(path, growing_spec, channels=w2.shape[0], hidden=w1.shape[0],
                     hidden_bias="b1" in weights, update_bias="b2" in weights)
    return make_nca(path, spec, weights)
