"""TF.js graph models of a growing NCA (``format: "graph-model"``, weights inline in ``Const`` nodes).

The MLP is found by graph structure, not node names: the two chained 1x1 ``Conv2D`` nodes (the
second consumes the first through ``BiasAdd``/``Relu``), their kernels ``[1, 1, in, out]`` and the
``BiasAdd`` constants after them. TF's ``depthwise_conv2d`` perception is *interleaved*
(identity, Sobel-x, Sobel-y of channel 0, then channel 1, ...), so the first layer's inputs are
permuted into the blocked order.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from ..model import NCA
from ..spec import growing_spec
from .common import channels_from, decode_b64, interleaved_to_blocked, make_nca, make_spec
from .errors import ModelFormatError

_PASS_THROUGH = ("Identity", "BiasAdd", "Relu")
MAX_CONST_ELEMENTS = 1 << 24  # a Const may declare this many floats (an NCA layer has ~10^4)


def matches(obj) -> bool:
    """Whether parsed JSON looks like a TF.js graph model."""
    return isinstance(obj, dict) and isinstance(obj.get("modelTopology"), dict) and \
        "node" in obj["modelTopology"]


class _Graph:
    def __init__(self, path, obj):
        self.path = path
        nodes = obj["modelTopology"]["node"]
        if not isinstance(nodes, list) or not all(isinstance(n, dict) and "name" in n for n in nodes):
            raise ModelFormatError(path, "modelTopology.node must be a list of named nodes")
        self.nodes: Dict[str, dict] = {n["name"]: n for n in nodes}

    def node(self, ref: str) -> dict:
        """The node an input reference (``name``, ``name:0`` or ``^name``) points to."""
        name = ref.lstrip("^").split(":")[0]
        if name not in self.nodes:
            raise ModelFormatError(self.path, f"graph references a missing node {name!r}")
        return self.nodes[name]

    def _walk(self, n: dict, ops) -> dict:
        """Follow first inputs back through nodes whose op is in ``ops``; a cycle is an error."""
        seen = set()
        while n.get("op") in ops and n.get("input"):
            if n["name"] in seen:
                raise ModelFormatError(self.path, f"graph cycle through node {str(n['name'])[:60]!r}")
            seen.add(n["name"])
            n = self.node(n["input"][0])
        return n

    def source(self, ref: str) -> dict:
        """Follow ``Identity`` nodes back to the node producing a value."""
        return self._walk(self.node(ref), ("Identity",))

    def upstream_conv(self, conv: dict) -> Optional[dict]:
        """The ``Conv2D`` feeding ``conv`` through ``BiasAdd``/``Relu``/``Identity`` nodes, if any."""
        n = self._walk(self.node(conv["input"][0]), _PASS_THROUGH)
        return n if n.get("op") == "Conv2D" else None

    def const(self, node: dict, what: str) -> np.ndarray:
        """A float32 ``Const`` node's value."""
        tensor = node.get("attr", {}).get("value", {}).get("tensor")
        if node.get("op") != "Const" or not isinstance(tensor, dict):
            raise ModelFormatError(self.path, f"{what} ({node['name']}) is not an inline Const; "
                                              "TF.js models with external weight shards are not supported")
        if tensor.get("dtype") != "DT_FLOAT":
            raise ModelFormatError(self.path, f"{what} must be DT_FLOAT, got {tensor.get('dtype')}")
        try:
            shape = tuple(int(d.get("size", 0)) for d in tensor.get("tensorShape", {}).get("dim", []))
        except (TypeError, ValueError, AttributeError):
            raise ModelFormatError(self.path, f"{what}: malformed tensorShape") from None
        if any(d < 0 for d in shape) or len(shape) > 8:
            raise ModelFormatError(self.path, f"{what}: malformed tensorShape {list(shape)[:8]}")
        count = 1
        for d in shape:
            count *= d
        if count > MAX_CONST_ELEMENTS:
            raise ModelFormatError(self.path, f"{what}: declares {count} values, more than the "
                                              f"{MAX_CONST_ELEMENTS} a model layer may have")
        if "tensorContent" in tensor:
            raw = decode_b64(self.path, tensor["tensorContent"], f"{what} tensorContent")
            if len(raw) != 4 * count:
                raise ModelFormatError(self.path, f"{what}: {len(raw)} bytes of data for shape {list(shape)} "
                                                  f"({4 * count} expected)")
            values = np.frombuffer(raw, "<f4")
        else:  # TF stores a constant-filled tensor as a single floatVal
            values = np.asarray(tensor.get("floatVal", []), np.float32)
            if values.size == 1:
                values = np.full(count, values[0], np.float32)
            if values.size != count:
                raise ModelFormatError(self.path, f"{what}: {values.size} values for shape {list(shape)}")
        return values.reshape(shape).astype(np.float32)

    def layer(self, conv: dict, what: str):
        """A 1x1 ``Conv2D`` -> ``(weight [out, in], bias [out] or None)`` tensors."""
        k = self.const(self.source(conv["input"][1]), f"{what} kernel")
        if k.ndim != 4 or k.shape[:2] != (1, 1):
            raise ModelFormatError(self.path, f"{what} kernel must be [1, 1, in, out], got {list(k.shape)}")
        w = torch.from_numpy(k[0, 0].T.copy())
        adds = [n for n in self.nodes.values() if n.get("op") == "BiasAdd" and n.get("input")
                and self.source(n["input"][0]) is conv]
        if len(adds) > 1:
            raise ModelFormatError(self.path, f"{what} has {len(adds)} BiasAdd nodes")
        b = None
        if adds:
            b = torch.from_numpy(self.const(self.source(adds[0]["input"][1]), f"{what} bias"))
            if tuple(b.shape) != (w.shape[0],):
                raise ModelFormatError(self.path, f"{what} bias has shape {list(b.shape)}, "
                                                  f"expected [{w.shape[0]}]")
        return w, b


def load(path, obj) -> NCA:
    g = _Graph(path, obj)
    convs = [n for n in g.nodes.values() if n.get("op") == "Conv2D" and len(n.get("input", [])) >= 2]
    chained = [(a, b) for a in convs for b in convs if g.upstream_conv(b) is a]
    if len(convs) != 2 or len(chained) != 1:
        raise ModelFormatError(path, f"expected two chained 1x1 Conv2D layers (the perception MLP), "
                                     f"found {len(convs)} Conv2D nodes")
    first, second = chained[0]
    w1, b1 = g.layer(first, "first layer")
    w2, b2 = g.layer(second, "second layer")
    channels = channels_from(path, w1.shape[1], 3, "TF.js growing model (identity, sobel_x, sobel_y)")
    if tuple(w2.shape) != (channels, w1.shape[0]):
        raise ModelFormatError(path, f"second layer is {w2.shape[1]} -> {w2.shape[0]}, expected "
                                     f"{w1.shape[0]} -> {channels}")
    spec = make_spec(path, growing_spec, channels=channels, hidden=w1.shape[0],
                     hidden_bias=b1 is not None, update_bias=b2 is not None)
    weights = {"w1": interleaved_to_blocked(w1, 3), "w2": w2}
    weights.update({k: v for k, v in (("b1", b1), ("b2", b2)) if v is not None})
    return make_nca(path, spec, weights)
