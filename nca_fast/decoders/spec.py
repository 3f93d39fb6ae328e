"""DecoderSpec: everything that defines a high-resolution decoder except its weights (frozen, JSON).

A decoder maps a coarse NCA state ``x [B, C, H, W]`` to an image ``[B, K, H*s, W*s]``.

* ``kind="pixel_shuffle"``: a per-cell head, linear (``layers=0``) or one ReLU hidden layer of
  width ``hidden`` (``layers=1``), producing ``K*s*s`` values per cell in ``F.pixel_shuffle``
  channel order (see :mod:`nca_fast.decoders.pixel_shuffle`).
* ``kind="lppn"``: the Cells-to-Pixels implicit decoder (see :mod:`nca_fast.decoders.lppn`):
  bilinear upsampling with ``padding``, local coordinates with ``frequencies`` sin/cos octaves, and a
  SIREN of ``layers`` sine layers of width ``hidden`` (``first_omega`` on the first,
  ``hidden_omega`` on the others) plus a linear output. Cells-to-Pixels' ``hidden_layers`` is
  ``layers - 1``.

Weights (``nn.Linear`` convention, ``w{i} [out, in]``, ``b{i} [out]``) are ``w0 .. w{layers}``;
the last one is the output layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

from ..utils.jsonspec import JsonSpec

KINDS = ("pixel_shuffle", "lppn")
# Bounds on the sizes a spec may declare, so that a hostile file cannot make nca_fast allocate
# without limit (Cells-to-Pixels decoders: 12-32 channels, hidden 32-64, 3 layers, scale 8).
LIMITS = {"channels": 4096, "out_channels": 256, "scale": 256, "hidden": 4096, "layers": 64, "frequencies": 64}
LPPN_PADDINGS = ("circular", "replicate")


@dataclass(frozen=True)
class DecoderSpec(JsonSpec):
    kind: str
    channels: int
    out_channels: int = 3
    scale: int = 8
    hidden: int = 0
    layers: int = 0
    padding: str = "circular"
    frequencies: int = 0
    first_omega: float = 10.0
    hidden_omega: float = 10.0
    name: str = ""

    def __post_init__(self):
        for key in ("channels", "out_channels", "scale"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"decoder {key} must be a positive int, got {v!r}")
        for key in ("hidden", "layers", "frequencies"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"decoder {key} must be a non-negative int, got {v!r}")
        for key, most in LIMITS.items():
            if getattr(self, key) > most:
                raise ValueError(f"decoder {key} must be at most {most}, got {getattr(self, key)}")
        if self.kind not in KINDS:
            raise ValueError(f"decoder kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "pixel_shuffle":
            if self.layers not in (0, 1):
                raise ValueError(f"a pixel_shuffle head has 0 or 1 hidden layers, got {self.layers}")
            if (self.layers == 0) != (self.hidden == 0):
                raise ValueError("pixel_shuffle: hidden must be 0 exactly when layers is 0, got "
                                 f"hidden={self.hidden}, layers={self.layers}")
        else:
            if self.layers < 1 or self.hidden < 1:
                raise ValueError(f"an lppn decoder needs layers >= 1 and hidden >= 1, got "
                                 f"layers={self.layers}, hidden={self.hidden}")
            if self.padding not in LPPN_PADDINGS:
                raise ValueError(f"lppn padding must be one of {LPPN_PADDINGS}, got {self.padding!r}")
        for key in ("first_omega", "hidden_omega"):
            v = float(getattr(self, key))
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{key} must be a positive finite float, got {getattr(self, key)!r}")
            object.__setattr__(self, key, v)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def coord_features(self) -> int:
        """Width E of the local-coordinate encoding (lppn): 2 raw, or 4N with N frequencies."""
        return 2 if self.frequencies == 0 else 4 * self.frequencies

    @property
    def head_outputs(self) -> int:
        """Outputs of the last layer: K*s*s (pixel_shuffle) or K (lppn)."""
        k = self.out_channels
        return k * self.scale * self.scale if self.kind == "pixel_shuffle" else k

    def parameter_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Weight name -> shape (``w{i} [out, in]``, ``b{i} [out]``)."""
        first_in = self.channels + (self.coord_features if self.kind == "lppn" else 0)
        ins = [first_in] + [self.hidden] * self.layers
        outs = [self.hidden] * self.layers + [self.head_outputs]
        shapes = {}
        for i, (n_in, n_out) in enumerate(zip(ins, outs)):
            shapes[f"w{i}"] = (n_out, n_in)
            shapes[f"b{i}"] = (n_out,)
        return shapes

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        return height * self.scale, width * self.scale

    def flops_per_pixel(self) -> float:
        """Multiply-adds x 2 per output pixel of the plain formulation (sines not counted)."""
        macs = sum(math.prod(s) for n, s in self.parameter_shapes().items() if n.startswith("w"))
        if self.kind == "pixel_shuffle":
            return 2.0 * macs / self.scale ** 2
        return 2.0 * macs + 8.0 * self.channels


def pixel_shuffle_spec(channels: int, scale: int = 8, out_channels: int = 3, hidden: int = 0,
                       **kw) -> DecoderSpec:
    return DecoderSpec("pixel_shuffle", channels, out_channels, scale, hidden, int(hidden > 0), **kw)


def lppn_spec(channels: int, scale: int = 8, out_channels: int = 3, hidden: int = 32,
              layers: int = 3, **kw) -> DecoderSpec:
    """Defaults: the Cells-to-Pixels texture decoder (3 sine layers of 32, omega 10, raw coords)."""
    return DecoderSpec("lppn", channels, out_channels, scale, hidden, layers, **kw)
