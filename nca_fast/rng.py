"""Counter-based update masks: the contract every backend draws the same stochastic mask from.

The mask of cell (b, i, j) at step t under seed s is a pure function of (s, t, b, i, j):

    r0, _, _, _ = Philox4x32-10(counter=(j, i, t, b), key=(s & 0xFFFFFFFF, s >> 32))
    fires       = (r0 >> 8) < fire_threshold(fire_rate)          # fire_threshold = round(rate * 2**24)

with the round constants and key schedule of Triton's ``tl.philox``; i and j are *global* coordinates
(the window's origin added), every word taken modulo 2**32. Comparing 24-bit integers instead of
floats makes the mask bit-identical on every backend (no float rounding is involved).

PyTorch has no uint32 arithmetic, so this twin of the kernel works in int64 with every 32x32-bit
product split into two 32x16-bit halves (each below 2**48, exact in int64).
"""
from __future__ import annotations

from typing import Optional

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
FIRE_BITS = 24


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of the 64-bit product of constant ``a`` and uint32 values ``b`` (int64)."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48; the product is p_hi * 2**16 + p_lo
    low_sum = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    return (p_hi >> 16) + (low_sum >> 32), low_sum & MASK32


def philox4x32(c0, c1, c2, c3, seed: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; returns four int64 tensors in [0, 2**32)."""
    c0, c1, c2, c3 = (torch.as_tensor(c).to(torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def fire_threshold(fire_rate: float) -> int:
    """Integer threshold in [0, 2**24] for ``(r0 >> 8) < threshold``."""
    if not 0.0 <= float(fire_rate) <= 1.0:
        raise ValueError(f"fire_rate must be in [0, 1], got {fire_rate!r}")
    return int(round(float(fire_rate) * (1 << FIRE_BITS)))


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return seed


def update_mask(batch: int, height: int, width: int, *, seed: int, step: int, fire_rate: float,
                origin: tuple = (0, 0), batch_offset: int = 0,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """The stochastic update mask, bool ``[B, 1, H, W]``.

    ``origin=(row, col)`` places this window inside a larger grid and ``batch_offset`` this batch
    inside a larger batch, so that a shard draws exactly the mask it would draw as part of the whole.
    """
    check_seed(seed)
    threshold = fire_threshold(fire_rate)
    dev = torch.device("cpu") if device is None else torch.device(device)
    rows = torch.arange(height, device=dev, dtype=torch.int64).view(1, height, 1) + int(origin[0])
    cols = torch.arange(width, device=dev, dtype=torch.int64).view(1, 1, width) + int(origin[1])
    b = torch.arange(batch, device=dev, dtype=torch.int64).view(batch, 1, 1) + int(batch_offset)
    r0, _, _, _ = philox4x32(cols, rows, torch.tensor(int(step), device=dev), b, seed)
    return ((r0 >> 8) < threshold).unsqueeze(1)
