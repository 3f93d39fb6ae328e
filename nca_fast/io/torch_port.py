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

import io
import pickle
import pickletools
import re
import zipfile
from typing import Dict, Mapping, Optional

import torch

from ..model import NCA
from ..spec import growing_spec
from ..utils.files import MAX_MODEL_BYTES, read_input
from .common import channels_from, interleaved_to_blocked, listing, make_nca, make_spec, swap_blocks
from .errors import ModelFormatError

_WRAPPERS = ("state_dict", "model_state_dict", "model")
MAX_UNPACKED_BYTES = 4 * MAX_MODEL_BYTES  # what a zip archive may declare once unpacked
MAX_PICKLE_DEPTH = 64  # containers inside containers (a state dict needs fewer than 10)
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
            "BINUNICODE8"}
_INTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "NEWTRUE", "NEWFALSE"}


_MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "BUILD", "ADDITEMS"}


def _scan_pickle(f, path) -> None:
    """Walk one pickle's opcodes (without running any) and refuse what ``torch.load`` would choke on
    even under ``weights_only=True``: containers nested deeper than ``MAX_PICKLE_DEPTH`` (a shared,
    deeply nested tuple used as a dict key costs 2**depth to hash) and dict keys that are not
    strings or ints. Each stack item is a record [kind, depth], shared with the memo, so that a
    container filled after it was memoised is seen at its final depth."""
    stack: list = []
    memo: dict = {}
    try:
        for op, arg, _ in pickletools.genops(f):
            name = op.name
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else ["other", 0]
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, ["other", 0]))
                continue
            if name == "MARK":
                stack.append(["mark", 0])
                continue
            popped = []  # bottom to top
            for before in reversed(op.stack_before):
                if before is pickletools.markobject:
                    items = []
                    while stack and stack[-1][0] != "mark":
                        items.append(stack.pop())
                    if stack:
                        stack.pop()
                    popped = items[::-1] + popped
                elif before is not pickletools.stackslice and stack:
                    popped.insert(0, stack.pop())
            if name in ("SETITEM", "SETITEMS", "DICT"):
                for key in (popped if name == "DICT" else popped[1:])[0::2]:
                    if key[0] not in ("str", "int"):
                        raise ModelFormatError(path, "refused: a dict key that is not a string or an int "
                                                     "(a state dict has string keys)")
            if name in _MUTATORS and popped:
                rec = popped[0]
                rec[1] = max(rec[1], 1 + max((r[1] for r in popped[1:]), default=-1))
            else:
                kind = "str" if name in _STRINGS else "int" if name in _INTS else "other"
                rec = [kind, 1 + max((r[1] for r in popped), default=-1)]
            if rec[1] > MAX_PICKLE_DEPTH:
                raise ModelFormatError(path, f"refused: containers nested more than {MAX_PICKLE_DEPTH} deep")
            stack.extend([rec] * len(op.stack_after))
    except ModelFormatError:
        raise
    except Exception as e:  # noqa: BLE001  genops on garbage fails in many ways
        raise ModelFormatError(path, f"not a readable PyTorch file (corrupt pickle: {str(e)[:200]})") from None


def _check_archive(data: bytes, path) -> None:
    """A zip checkpoint (torch.save's format): bounded once unpacked, its pickles scanned."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ModelFormatError(path, f"not a readable PyTorch file (corrupt zip: {str(e)[:200]})") from None
    unpacked = sum(i.file_size for i in infos)
    if unpacked > MAX_UNPACKED_BYTES or len(infos) > 100_000:
        raise ModelFormatError(path, f"refused: the archive declares {unpacked / 2**30:.1f} GiB in {len(infos)} "
                                     f"entries once unpacked (at most {MAX_UNPACKED_BYTES / 2**30:.0f} GiB)")
    for info in infos:
        if info.filename.endswith(".pkl"):
            try:
                with zf.open(info) as f:
                    _scan_pickle(io.BytesIO(f.read(info.file_size + 1)), path)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                if isinstance(e, ModelFormatError):
                    raise
                raise ModelFormatError(path, f"not a readable PyTorch file ({str(e)[:200]})") from None


def torch_load(path, data: Optional[bytes] = None):
    """``torch.load(weights_only=True)`` of a bounded regular file (or its ``data``, already read),
    after its pickles were scanned (:func:`_scan_pickle`); a pickle that needs code is refused.
    Raises ModelFormatError."""
    if data is None:
        data = read_input(path, limit=MAX_MODEL_BYTES, what="model file", error=ModelFormatError)
    if data[:2] == b"PK":
        _check_archive(data, path)
    else:  # the legacy format: magic number, protocol, sys info, the object, storage keys, raw data
        f = io.BytesIO(data)
        for _ in range(5):
            if f.tell() >= len(data):
                break
            _scan_pickle(f, path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise ModelFormatError(path, "refused: the pickle needs code to run, which nca_fast never does") from None
        raise ModelFormatError(path, "not a readable PyTorch file (corrupt pickle)") from None
    except Exception as e:  # noqa: BLE001  arbitrary bytes fail in many ways inside torch.load
        raise ModelFormatError(path, f"not a readable PyTorch file ({type(e).__name__}: {str(e)[:200]})") from None


def _read(path, data: bytes) -> Dict[str, torch.Tensor]:
    obj = torch_load(path, data)
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
        shapes = listing(f"{k} {list(sd[k].shape)}" for k in convs)
        raise ModelFormatError(path, f"expected two 1x1 convolutions (the update MLP), found {len(convs)}: {shapes}")
    (k1, k2), bias = convs, lambda k: k[: -len("weight")] + "bias"
    w1, w2 = sd[k1][:, :, 0, 0], sd[k2][:, :, 0, 0]
    channels_from(path, w1.shape[1], 3, "PyTorch port (identity, sobel_x, sobel_y)")
    return ({"w1": interleaved_to_blocked(w1, 3), "w2": w2, "b1": sd.get(bias(k1)), "b2": sd.get(bias(k2))},
            {k1, k2, bias(k1), bias(k2)})


def load(path, data: bytes) -> NCA:
    sd = _read(path, data)
    if "fc0.weight" in sd and "fc1.weight" in sd:
        weights, used = _fc_layout(path, sd)
    elif any(v.dim() == 4 for v in sd.values()):
        weights, used = _conv_layout(path, sd)
    else:
        raise ModelFormatError(path, f"unknown PyTorch state dict layout: {listing(sorted(sd))}")
    extra = sorted(set(sd) - used)
    if extra:
        raise ModelFormatError(path, f"unexpected tensors {listing(extra)} (stored perception kernels or deeper "
                                     "MLPs are not supported)")
    weights = {k: v for k, v in weights.items() if v is not None}
    w1, w2 = weights["w1"], weights["w2"]
    if w1.shape[1] != 3 * w2.shape[0]:
        raise ModelFormatError(path, f"first layer has {w1.shape[1]} inputs, expected 3 x {w2.shape[0]} "
                                     "(the second layer's outputs)")
    spec = make_spec(path, growing_spec, channels=w2.shape[0], hidden=w1.shape[0],
                     hidden_bias="b1" in weights, update_bias="b2" in weights)
    return make_nca(path, spec, weights)
