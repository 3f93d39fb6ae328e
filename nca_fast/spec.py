"""NCASpec: everything that defines an NCA except its weights, as a frozen, JSON-serialisable dataclass.

Canonical conventions (importers permute published weights into them):

* Perception is *blocked*: for each filter in ``spec.filters`` (in order) all C channels, so the
  perception vector of a cell is ``[f0(c0..cC-1), f1(c0..cC-1), ...]`` of length ``F*C``.
* Filters are explicit, already-scaled 3x3 tap arrays applied as a cross-correlation
  (``taps[dy+1][dx+1]`` multiplies the neighbour at row offset dy, column offset dx), the same as
  ``torch.nn.functional.conv2d`` and TensorFlow's ``depthwise_conv2d``.
* The MLP weights follow ``nn.Linear``: ``w1 [hidden, F*C]``, ``w2 [C, hidden]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .utils.jsonspec import JsonSpec

Taps = Tuple[Tuple[float, float, float], Tuple[float, float, float], Tuple[float, float, float]]
Range = Optional[Tuple[float, float]]

PADDINGS = ("zeros", "circular", "replicate")
ALIVE_PADDINGS = ("ignore", "circular", "replicate")
# Bounds on the sizes a spec may declare, so that a hostile file cannot make nca_fast allocate
# without limit; published models are far inside them (16 channels, hidden 128, 3-4 filters).
LIMITS = {"channels": 4096, "hidden": 65536, "filters": 64}
ACTIVATIONS = ("relu",)
RENDERS = ("rgba_premultiplied", "rgb_affine")
SEED_KINDS = ("center", "zeros")

_SOBEL = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
_LAPLACIAN = ((1.0, 2.0, 1.0), (2.0, -12.0, 2.0), (1.0, 2.0, 1.0))
_IDENTITY = ((0.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0))


def _transpose(t):
    return tuple(tuple(t[c][r] for c in range(3)) for r in range(3))


def _scaled(t, s):
    return tuple(tuple(float(v) * s for v in row) for row in t)


# name -> (unscaled taps, default scale). Sobel-y is the transpose of Sobel-x (d/d row).
FILTER_PRESETS = {
    "identity": (_IDENTITY, 1.0),
    "sobel_x": (_SOBEL, 1.0 / 8.0),
    "sobel_y": (_transpose(_SOBEL), 1.0 / 8.0),
    "laplacian": (_LAPLACIAN, 1.0 / 8.0),
}


@dataclass(frozen=True)
class Filter:
    """One 3x3 perception filter: ``taps`` are final (already scaled) values."""

    name: str
    taps: Taps

    @classmethod
    def preset(cls, name: str, scale: Optional[float] = None) -> "Filter":
        if name not in FILTER_PRESETS:
            raise ValueError(f"unknown filter preset {name!r}; known: {sorted(FILTER_PRESETS)}")
        taps, default = FILTER_PRESETS[name]
        return cls(name, _scaled(taps, default if scale is None else scale))

    def __post_init__(self):
        taps = tuple(tuple(float(v) for v in row) for row in self.taps)
        if len(taps) != 3 or any(len(r) != 3 for r in taps):
            raise ValueError(f"filter {self.name!r}: taps must be 3x3, got {self.taps!r}")
        if not all(math.isfinite(v) for r in taps for v in r):
            raise ValueError(f"filter {self.name!r}: taps must be finite")
        object.__setattr__(self, "taps", taps)


def _range(value, what) -> Range:
    if value is None:
        return None
    lo, hi = (float(v) for v in value)
    if not lo <= hi:
        raise ValueError(f"{what} clamp must be (low, high) with low <= high, got {value!r}")
    return (lo, hi)


@dataclass(frozen=True)
class NCASpec(JsonSpec):
    """A complete description of one NCA architecture (weights live in :class:`nca_fast.NCA`).

    Step semantics (see ``nca_fast.reference.step``)::

        p   = clamp(perceive(x), perception_clamp)                 # [B, F*C, H, W], blocked order
        h   = clamp(relu(w1 @ p + b1), hidden_clamp)               # [B, hidden, H, W]
        dx  = clamp(w2 @ h + b2, update_clamp)                     # [B, C, H, W]
        y   = clamp(x + step_size * dx * fire_mask, state_clamp)
        y   = y * (alive(x) & alive(y))       if alive_channel is not None
        alive(z) = maxpool3x3(z[:, alive_channel]) > alive_threshold  (padding: alive_pool_padding)

    The alive pool pads by ``alive_padding``: ``"ignore"`` (cells outside the grid never count, as
    ``max_pool2d(..., padding=1)`` and TF's SAME max-pool), ``"circular"`` or ``"replicate"``; None
    follows the perception padding (``"zeros"`` -> ``"ignore"``).
    """

    channels: int
    hidden: int
    filters: Tuple[Filter, ...] = field(
        default_factory=lambda: tuple(Filter.preset(n) for n in ("identity", "sobel_x", "sobel_y")))
    padding: str = "zeros"
    hidden_bias: bool = True
    update_bias: bool = True
    activation: str = "relu"
    fire_rate: float = 0.5
    step_size: float = 1.0
    alive_channel: Optional[int] = 3
    alive_threshold: float = 0.1
    alive_padding: Optional[str] = None
    perception_clamp: Range = None
    hidden_clamp: Range = None
    update_clamp: Range = None
    state_clamp: Range = None
    # Image of the state: "rgba_premultiplied" -> rgb = 1 - clip(a) + rgb (channels 0..3);
    # "rgb_affine" -> rgb = state[:3] * render_scale + render_offset.
    render: str = "rgba_premultiplied"
    render_scale: float = 1.0
    render_offset: float = 0.0
    seed_kind: str = "center"  # "center": zeros with x[alive_channel or 3:, H//2, W//2] = 1; "zeros"
    name: str = ""

    def __post_init__(self):
        fix = lambda k, v: object.__setattr__(self, k, v)
        fix("filters", tuple(f if isinstance(f, Filter) else Filter(**f) for f in self.filters))
        for k in ("perception_clamp", "hidden_clamp", "update_clamp", "state_clamp"):
            fix(k, _range(getattr(self, k), k.replace("_clamp", "")))
        for k in ("channels", "hidden"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {v!r}")
            if v > LIMITS[k]:
                raise ValueError(f"{k} must be at most {LIMITS[k]}, got {v}")
        if len(self.filters) > LIMITS["filters"]:
            raise ValueError(f"an NCA takes at most {LIMITS['filters']} filters, got {len(self.filters)}")
        for k in ("hidden_bias", "update_bias"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"{k} must be True or False, got {getattr(self, k)!r}")
        for k in ("fire_rate", "step_size", "alive_threshold", "render_scale", "render_offset"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{k} must be a finite number, got {v!r}")
            fix(k, float(v))
        if not self.filters:
            raise ValueError("an NCA needs at least one perception filter")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not 0.0 <= float(self.fire_rate) <= 1.0:
            raise ValueError(f"fire_rate must be in [0, 1], got {self.fire_rate!r}")
        if self.alive_channel is not None and (isinstance(self.alive_channel, bool) or
                                               not isinstance(self.alive_channel, int)):
            raise ValueError(f"alive_channel must be an int or None, got {self.alive_channel!r}")
        if self.alive_channel is not None and not 0 <= self.alive_channel < self.channels:
            raise ValueError(f"alive_channel {self.alive_channel} out of range for {self.channels} channels")
        if self.alive_padding is not None and self.alive_padding not in ALIVE_PADDINGS:
            raise ValueError(f"alive_padding must be one of {ALIVE_PADDINGS} or None, got {self.alive_padding!r}")
        if self.render not in RENDERS:
            raise ValueError(f"render must be one of {RENDERS}, got {self.render!r}")
        need = 4 if self.render == "rgba_premultiplied" else 3
        if self.channels < need:
            raise ValueError(f"render {self.render!r} needs at least {need} channels, got {self.channels}")
        if self.seed_kind not in SEED_KINDS:
            raise ValueError(f"seed_kind must be one of {SEED_KINDS}, got {self.seed_kind!r}")
        fix("_json", self.to_json(sort_keys=True))  # the op's key: computed once, outside any trace

    @property
    def json(self) -> str:
        """The spec as canonical JSON (cached)."""
        return self._json

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def n_filters(self) -> int:
        return len(self.filters)

    @property
    def perception_size(self) -> int:
        return self.n_filters * self.channels

    @property
    def alive_pool_padding(self) -> str:
        """The alive pool's padding: ``alive_padding``, or the perception padding's counterpart."""
        if self.alive_padding is not None:
            return self.alive_padding
        return "ignore" if self.padding == "zeros" else self.padding

    @property
    def has_alpha(self) -> bool:
        return self.render == "rgba_premultiplied"

    def parameter_shapes(self) -> dict:
        """Weight name -> shape, in nn.Linear convention."""
        shapes = {"w1": (self.hidden, self.perception_size), "w2": (self.channels, self.hidden)}
        if self.hidden_bias:
            shapes["b1"] = (self.hidden,)
        if self.update_bias:
            shapes["b2"] = (self.channels,)
        return shapes

    def flops_per_cell(self) -> int:
        """Floating-point operations of one cell-update (2 per multiply-add)."""
        mlp = 2 * (self.perception_size * self.hidden + self.hidden * self.channels)
        perception = 2 * 9 * self.perception_size
        return mlp + perception

    @classmethod
    def _fields_from_json(cls, d: dict) -> dict:
        if isinstance(d.get("filters"), (list, tuple)):
            d["filters"] = tuple(Filter(f.get("name", ""), f.get("taps")) if isinstance(f, dict) else f
                                 for f in d["filters"])
        return d


def growing_spec(channels: int = 16, hidden: int = 128, **kw) -> NCASpec:
    """The Distill *Growing NCA* architecture (identity, Sobel-x/8, Sobel-y/8; zero padding; alive mask)."""
    return NCASpec(channels=channels, hidden=hidden, **kw)


def texture_spec(channels: int = 12, hidden: int = 96, **kw) -> NCASpec:
    """The Distill *Self-Organising Textures* architecture with its 8-bit-training clamps."""
    base = dict(
        filters=tuple(Filter.preset(n) for n in ("identity", "sobel_x", "sobel_y", "laplacian")),
        padding="circular", alive_channel=None, perception_clamp=(-2.0, 2.0), hidden_clamp=(0.0, 2.0),
        update_clamp=(-2.0, 2.0), state_clamp=(-2.0, 2.0), render="rgb_affine", render_scale=0.5,
        render_offset=0.5, seed_kind="zeros")
    base.update(kw)
    return NCASpec(channels=channels, hidden=hidden, **base)
