"""An independent NumPy (float64) twin of one NCA step and of the Philox update mask, written from
the published semantics (../shared/models/README.md), not from nca_fast's code.

Only the *numbers* of an ``NCASpec`` are read (taps, padding, clamps, ...); nothing of nca_fast is
called. Shapes: state ``[B, C, H, W]``, masks bool ``[B, 1, H, W]``, weights in nn.Linear convention
``w1 [hidden, F*C]``, ``b1 [hidden]``, ``w2 [C, hidden]``, ``b2 [C]``.
"""
from __future__ import annotations

import numpy as np

M32 = 0xFFFFFFFF
_NP_PAD = {"zeros": "constant", "circular": "wrap", "replicate": "edge"}


# ---- Philox4x32-10, Triton's tl.philox conventions, pure Python ints ----------------------------
def philox(c0: int, c1: int, c2: int, c3: int, seed: int, rounds: int = 10):
    """Four uint32 words for counter (c0, c1, c2, c3) and key (seed low 32 bits, seed high 32 bits)."""
    c0, c1, c2, c3 = c0 & M32, c1 & M32, c2 & M32, c3 & M32
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(rounds):
        pb = 0xCD9E8D57 * c2
        pa = 0xD2511F53 * c0
        c0, c1, c2, c3 = ((pb >> 32) ^ c1 ^ k0) & M32, pb & M32, ((pa >> 32) ^ c3 ^ k1) & M32, pa & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def fire_mask(batch: int, height: int, width: int, *, seed: int, step: int, fire_rate: float,
              origin=(0, 0), batch_offset: int = 0) -> np.ndarray:
    """bool ``[B, 1, H, W]``: cell fires iff ``(r0 >> 8) < round(rate * 2**24)``, counter
    (global col, global row, step, global batch)."""
    threshold = round(fire_rate * 2**24)
    m = np.zeros((batch, 1, height, width), dtype=bool)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                r0 = philox(j + origin[1], i + origin[0], step, b + batch_offset, seed)[0]
                m[b, 0, i, j] = (r0 >> 8) < threshold
    return m


# ---- one step -------------------------------------------------------------------------------------
def _pad(a: np.ndarray, padding: str, fill: float = 0.0) -> np.ndarray:
    """Pad the last two axes by one cell."""
    width = [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)]
    if padding == "zeros":
        return np.pad(a, width, mode="constant", constant_values=fill)
    return np.pad(a, width, mode=_NP_PAD[padding])


def _clip(a: np.ndarray, r):
    return a if r is None else np.clip(a, r[0], r[1])


def perceive(x: np.ndarray, taps: np.ndarray, padding: str) -> np.ndarray:
    """``[B, C, H, W] -> [B, F*C, H, W]``, blocked (filter-major); ``taps [F, 3, 3]``,
    ``taps[f, dy+1, dx+1]`` weighs the neighbour at (row+dy, col+dx)."""
    B, C, H, W = x.shape
    xp = _pad(x, padding)
    out = np.zeros((B, len(taps) * C, H, W))
    for f, t in enumerate(taps):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                out[:, f * C:(f + 1) * C] += t[dy + 1, dx + 1] * xp[:, :, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
    return out


def alive(x: np.ndarray, channel: int, threshold: float, padding: str) -> np.ndarray:
    """bool ``[B, 1, H, W]``: 3x3 max of ``x[:, channel]`` > threshold; outside cells are ignored
    under "ignore" padding, wrapped / replicated otherwise."""
    B, _, H, W = x.shape
    ap = _pad(x[:, channel:channel + 1], "zeros" if padding == "ignore" else padding, fill=-np.inf)
    best = np.full((B, 1, H, W), -np.inf)
    for dy in range(3):
        for dx in range(3):
            best = np.maximum(best, ap[:, :, dy:dy + H, dx:dx + W])
    return best > threshold


def step_parts(x, params, spec, mask=None) -> dict:
    """One step, float64, returning the unclamped intermediates too (so tests can assert that every
    clamp and the alive mask were exercised): keys p_raw, h_raw, dx_raw, y_raw, alive, y."""
    x = np.asarray(x, dtype=np.float64)
    w = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    taps = np.array([f.taps for f in spec.filters], dtype=np.float64)
    p_raw = perceive(x, taps, spec.padding)
    p = _clip(p_raw, spec.perception_clamp)
    h_raw = np.einsum("kp,bphw->bkhw", w["w1"], p)
    if "b1" in w:
        h_raw = h_raw + w["b1"][None, :, None, None]
    h_raw = np.maximum(h_raw, 0.0)
    h = _clip(h_raw, spec.hidden_clamp)
    dx_raw = np.einsum("ck,bkhw->bchw", w["w2"], h)
    if "b2" in w:
        dx_raw = dx_raw + w["b2"][None, :, None, None]
    dx = _clip(dx_raw, spec.update_clamp)
    fire = 1.0 if mask is None else np.asarray(mask, dtype=np.float64)
    y_raw = x + spec.step_size * dx * fire
    y = _clip(y_raw, spec.state_clamp)
    live = None
    if spec.alive_channel is not None:
        pool_padding = spec.alive_padding or ("ignore" if spec.padding == "zeros" else spec.padding)
        args = (spec.alive_channel, spec.alive_threshold, pool_padding)
        live = alive(x, *args) & alive(y, *args)
        y = y * live
    return dict(p_raw=p_raw, h_raw=h_raw, dx_raw=dx_raw, y_raw=y_raw, alive=live, y=y)


def step(x, params, spec, mask=None) -> np.ndarray:
    """One NCA step ``[B, C, H, W] -> [B, C, H, W]`` in float64 (mask None = every cell fires)."""
    return step_parts(x, params, spec, mask)["y"]
