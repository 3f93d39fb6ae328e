"""Counter-based update masks: the contract every backend draws the same stochastic mask from.

The mask of cell (b, i, j) at step t under seed s is a pure function of (s, t, b, i, j):

    r0, _, _, _ = Philox4x32-10(counter=(j, i, t, b), key=(s & 0xFFFFFFFF, s >> 32))
    fires       = (r0 >> 8) < fire_threshold(fire_rate)          # fire_threshold = round(rate * 2**24)

with the round constants and key schedule of Triton's ``tl.philox``; i and j are *global* coordinates
(the window's origin added), every word taken modulo 2**32. Comparing 24-bit integers instead of
floats makes the mask bit-identical on every backend (no float rounding is involved).

PyTorch has no uint32 arithmetic, so this twin of the kernel works in int64: a 32x32-bit product is
one int64 multiply, which wraps modulo 2**64 (two's complement, on every PyTorch backend), so its
low 64 bits are the exact product: the low word is ``p & 0xFFFFFFFF``, the high word
``(p >> 32) & 0xFFFFFFFF`` even when p wrapped negative. (tests/numpy_nca.py checks every word
against a pure-Python Philox.) Masks are drawn in bands of rows that stay in cache.
"""
from __future__ import annotations

from typing import Optional

import torch

from .utils.checks import check_int, check_memory

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
FIRE_BITS = 24
FIRE_SHIFT = 32 - FIRE_BITS  # fires: (r0 >> FIRE_SHIFT) < threshold
BAND_CELLS = 16384  # cells per band of update_mask: its int64 temporaries stay in L2


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of the 64-bit product of constant ``a`` and uint32 values ``b`` (int64)."""
    p = b * a  # wraps modulo 2**64: the exact product's bits
    return (p >> 32) & MASK32, p & MASK32


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


def _philox_r0(c0, c1, c2, c3, seed: int):
    """``philox4x32(c0, c1, c2, c3, seed)[0]`` in 4/5 of its ops (what ``update_mask`` draws with):
    a word's bits above 32 are cleared only before it reaches a product (a product's low word feeds
    only XORs, whose high bits the next mask clears), the last round computes r0 alone, and full-size
    temporaries are updated in place. Counters: broadcastable int64 torch tensors, or numpy arrays
    (not 0-d: numpy warns on a scalar's wrap), of uint32 values; the same operators serve both.
    (Tests check it word for word against ``philox4x32`` and a pure-Python Philox.)"""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for r in range(PHILOX_ROUNDS):
        pb = c2 * PHILOX_ROUND_B  # (the exact product's low 64 bits, as in _mulhilo)
        hi_b = (pb >> 32) ^ c1
        hi_b ^= k0
        hi_b &= MASK32
        if r == PHILOX_ROUNDS - 1:
            return hi_b
        pa = c0 * PHILOX_ROUND_A
        hi_a = (pa >> 32) ^ c3
        hi_a ^= k1
        hi_a &= MASK32
        c0, c1, c2, c3 = hi_b, pb, hi_a, pa
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32


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
    for what, v in (("batch", batch), ("height", height), ("width", width)):
        check_int(what, v, 1)
    check_memory(batch * height * width, dev, f"a {batch}x{height}x{width} update mask", per_cell=batch)
    out = torch.empty(batch, 1, height, width, dtype=torch.bool, device=dev)
    # Bands run over the rows of all images at once ([B*H, W]), so a batch of small grids costs a
    # few bands, not a band per image.
    index = torch.arange(batch * height, device=dev, dtype=torch.int64).view(-1, 1)
    rows = index % height + int(origin[0])
    images = index // height + int(batch_offset)
    cols = torch.arange(width, device=dev, dtype=torch.int64).view(1, width) + int(origin[1])
    # (every counter masked to its uint32 value; the step as a [1, 1] array, not 0-d: see _philox_r0)
    rows, images, cols = rows & MASK32, images & MASK32, cols & MASK32
    t = torch.full((1, 1), int(step) & MASK32, device=dev, dtype=torch.int64)
    flat = out.view(batch * height, width)
    band = batch * height if dev.type == "cuda" else max(1, BAND_CELLS // width)
    for r in range(0, batch * height, band):
        args = (cols, rows[r: r + band], t, images[r: r + band])
        if dev.type == "cpu":  # numpy's ops cost about half of torch's at a band's size (dispatch)
            r0 = torch.from_numpy(_philox_r0(*(a.numpy() for a in args), seed))
        else:
            r0 = _philox_r0(*args, seed)
        torch.lt(r0, threshold << FIRE_SHIFT, out=flat[r: r + band])  # (r0 >> 8) < threshold
    return out
