"""The fused NCA step: perception + MLP + stochastic mask + alive masks + residual, one pass per step.

Per cell-update (growing model, C=16, F=3 filters, hidden 128):
  * bytes: the state is read once and written once, C * 4 B each in fp32 (128 B per cell-update),
    C * 2 B each in fp16/bf16 (64 B); alive models add one mask byte read + one written. Neighbour
    loads (9 taps, the 5x5 alpha window) are re-reads of cache lines another cell of the tile already
    brought in: they cost L1/L2 bandwidth, not DRAM.
  * FLOPs: MLP 2 * (F*C*hidden + hidden*C) = 16,384 on tensor cores (``tl.dot``: one K=C dot per
    filter, so K=48 is never padded to 64), perception 2 * 9 * F*C at most (zero taps are skipped at
    compile time: 2 * 13 * C = 416 for identity + Sobel).
On an H100 (~3.0 TB/s measured copy bandwidth) the memory floor is ~23-26 G cell-updates/s for an
fp32 state and twice that for 16-bit; the TF32 MLP alone would allow ~30 G/s, the FP32 units ~4 G/s.

The post-update alive mask needs the *updated* alpha of the neighbours, which other programs are
computing concurrently. Instead of recomputing the MLP on a one-cell border (Triton cannot shift
register tiles, so the border's result could not reach its neighbours without a round trip through
memory anyway), an alive model is kept in a *pending* form between steps:

    stored  y   = clamp(x + dx * fire)                 (the state before the alive masks)
    stored  pre = alive(x)                             (one byte per cell)
    true state  = y * (pre & alive(y))                 alive(z) = maxpool3x3(z[alpha]) > threshold

The next step materialises the true state of each neighbour it reads on the fly (a 3x3 max over the
stored alpha: the 5x5 alpha window is in cache), so every step is still one launch that reads and
writes the state once; a rollout ends with one ``finalize`` launch. No MLP work is repeated.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .pixel_shuffle import pixel_shuffle_out


@triton.jit
def _wrap(i, n, PAD: tl.constexpr):
    """Map a (possibly outside) coordinate into [0, n) by the padding mode; zeros clamps (the
    caller masks the load) so that every address stays inside the tensor."""
    if PAD == 1:
        return ((i % n) + n) % n
    else:
        return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _clamp(v, lo, hi):
    """clamp(v, lo, hi) that keeps NaN (as torch.clamp; a GPU's plain min/max would drop it)."""
    return tl.minimum(tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _tile(it, n_tiles, tiles_per_image, n_tiles_w, H, W, BH: tl.constexpr, BW: tl.constexpr):
    """Round ``it`` of the persistent loop: this program's tile (tiles pid, pid + nprog, ...) as
    (image b, rows i [M], columns j [M], valid [M]). Cells past the grid's edge are clamped onto it
    (they compute a duplicate that is stored nowhere); in the last round a program left without a
    tile redoes the last one with every row pushed past H, so it stores nothing."""
    m = tl.arange(0, BH * BW)
    t = tl.program_id(0) + it * tl.num_programs(0)
    spare = tl.where(t < n_tiles, 0, H)
    t = tl.minimum(t, n_tiles - 1)
    b = t // tiles_per_image
    r = t % tiles_per_image
    i = (r // n_tiles_w) * BH + m // BW + spare
    j = (r % n_tiles_w) * BW + m % BW
    valid = (i < H) & (j < W)
    return b, tl.minimum(i, H - 1), tl.minimum(j, W - 1), valid


@triton.jit
def _inside(i, j, H, W):
    return (i >= 0) & (i < H) & (j >= 0) & (j < W)


@triton.jit
def _keep(src, pre, i, j, H, W, HW, ALPHA: tl.constexpr, threshold, APAD: tl.constexpr):
    """Pending form -> alive decision of in-grid cells (i, j): pre & (maxpool3x3(y_alpha) > thr),
    the pool padded by APAD (0: outside cells ignored, 1: circular, 2: replicate)."""
    post = tl.full(i.shape, float("-inf"), tl.float32)
    for m in tl.static_range(9):
        mi = i + (m // 3 - 1)
        mj = j + (m % 3 - 1)
        a = tl.load(src + ALPHA * HW + _wrap(mi, H, APAD) * W + _wrap(mj, W, APAD),
                    mask=_inside(mi, mj, H, W) | (APAD != 0), other=float("-inf"))
        post = tl.maximum(post, a.to(tl.float32), propagate_nan=tl.PropagateNan.ALL)
    return (post > threshold) & (tl.load(pre + i * W + j) != 0)


@triton.jit
def _alpha_window(src, i, j, H, W, HW, ALPHA: tl.constexpr, APAD: tl.constexpr):
    """The stored alpha on the 5x5 window around each cell, ``[M, 32]`` (entry 5*r + c is the
    offset (r-2, c-2); -inf outside the grid under zero padding and in the 7 padding columns).
    One gather instead of 9 per neighbour: every neighbour's 3x3 pool is a sub-window of it."""
    w = tl.arange(0, 32)
    wi = i[:, None] + (w[None, :] // 5 - 2)
    wj = j[:, None] + (w[None, :] % 5 - 2)
    ok = (_inside(wi, wj, H, W) | (APAD != 0)) & (w[None, :] < 25)
    a = tl.load(src + ALPHA * HW + _wrap(wi, H, APAD) * W + _wrap(wj, W, APAD), mask=ok, other=float("-inf"))
    return a.to(tl.float32)


@triton.jit
def _keep_in_window(window, pre, ii, jj, W, k: tl.constexpr, threshold):
    """Alive decision of neighbour k (offset (k//3-1, k%3-1)), at in-grid cells (ii, jj), from the
    5x5 window: its 3x3 pool is window rows k//3 .. k//3+2, columns k%3 .. k%3+2. Exact when the
    perception and the alive pool pad alike, zero or circular (a replicate-padded neighbour pools
    around its clamped position, a wrapped one around its wrapped position: see _keep)."""
    w = tl.arange(0, 32)
    r = w // 5 - k // 3
    c = w % 5 - k % 3
    sel = (r >= 0) & (r < 3) & (c >= 0) & (c < 3) & (w < 25)
    post = tl.max(tl.where(sel[None, :], window, float("-inf")), axis=1)
    return (post > threshold) & (tl.load(pre + ii * W + jj) != 0)


@triton.jit
def _load_state(src, pre, i, j, chan, H, W, HW, threshold, C: tl.constexpr, ALPHA: tl.constexpr,
                PAD: tl.constexpr, APAD: tl.constexpr, PENDING: tl.constexpr):
    """The true state at cells (i, j) (any coordinates; padding applied), fp32 ``[M, CP]``."""
    ii = _wrap(i, H, PAD)
    jj = _wrap(j, W, PAD)
    ok = _inside(i, j, H, W) | (PAD != 0)
    x = tl.load(src + chan[None, :] * HW + (ii * W + jj)[:, None],
                mask=ok[:, None] & (chan[None, :] < C), other=0.0).to(tl.float32)
    if PENDING:
        x = x * _keep(src, pre, ii, jj, H, W, HW, ALPHA, threshold, APAD).to(tl.float32)[:, None]
    return x


@triton.jit
def _layer1(p, w1, f: tl.constexpr, acc, chan, hid, CP: tl.constexpr, HP: tl.constexpr,
            P_CLAMP: tl.constexpr, p_lo, p_hi, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """acc += clamp(p) @ w1[f]: perception of filter f [M, CP] times its weight block [CP, HP]."""
    if P_CLAMP:
        p = _clamp(p, p_lo, p_hi)
    wf = tl.load(w1 + f * CP * HP + chan[:, None] * HP + hid[None, :])
    return tl.dot(p.to(DOT_T), wf, acc, input_precision=PREC)


@triton.jit
def nca_step_kernel(
    src, src_pre, dst, dst_pre, fire_mask, ctr,  # state in/out [B, C, H, W]; masks u8 [B, H, W]
    w1, b1, w2, b2,  # packed: w1 [F, CP, HP], b1 [HP] fp32, w2 [HP, CP], b2 [CP] fp32
    img, dw0, db0, dw1, db1,  # DECODE: the frame [B, K, H*R, W*R] and the pixel-shuffle head
    H, W, n_tiles_w, tiles_per_image, n_tiles, tiles_per_program,
    step_offset, row0, col0, batch0, fire_threshold, threshold, step_size,
    p_lo, p_hi, h_lo, h_hi, u_lo, u_hi, s_lo, s_hi,
    C: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr, F: tl.constexpr, NG: tl.constexpr,
    TAPS: tl.constexpr, LOADS: tl.constexpr,
    PAD: tl.constexpr, APAD: tl.constexpr, ALPHA: tl.constexpr, ALIVE: tl.constexpr, PENDING: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    P_CLAMP: tl.constexpr, H_CLAMP: tl.constexpr, U_CLAMP: tl.constexpr, S_CLAMP: tl.constexpr,
    DOT_T: tl.constexpr, PREC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    DECODE: tl.constexpr = False, R: tl.constexpr = 1, K: tl.constexpr = 3, N: tl.constexpr = 3,
    DH: tl.constexpr = 0, NPAD: tl.constexpr = 16, NB: tl.constexpr = 16,
):
    """A persistent grid of programs, each looping over ``BH x BW`` tiles of cells (all channels).

    ``ctr`` (int64 [2] on the device) holds the seed and the base step, so that a captured CUDA graph
    replays with new values; ``step_offset`` is this launch's step relative to the base.
    DOT_T / PREC: the MLP's dot operand dtype and input precision (``config.dot_types``).
    PAD: 0 = zeros, 1 = circular, 2 = replicate; APAD (the alive pool's): 0 = outside cells ignored,
    1 = circular, 2 = replicate. TAPS / LOADS: see ``config.StepConfig``.
    """
    M: tl.constexpr = BH * BW
    HW = H * W
    chan = tl.arange(0, CP)
    hid = tl.arange(0, HP)
    seed = tl.load(ctr)
    step = (tl.load(ctr + 1) + step_offset).to(tl.uint32)
    if HAS_B1:
        bias1 = tl.load(b1 + hid)
    if HAS_B2:
        bias2 = tl.load(b2 + chan)
    for it in range(tiles_per_program):  # persistent: tiles pid, pid + nprog, ...
        b, i, j, valid = _tile(it, n_tiles, tiles_per_image, n_tiles_w, H, W, BH, BW)
        image = b.to(tl.int64) * C * HW
        x_in = src + image
        pre_in = src_pre + b.to(tl.int64) * HW

        # Perception and the first layer, filters in groups of four (four fp32 accumulators): each
        # neighbour is loaded (and, in the pending form, its alive decision made) once per group;
        # then one K=CP dot per filter accumulates into the fp32 hidden tile.
        acc = tl.zeros((M, HP), tl.float32)
        pool = tl.full((M,), float("-inf"), tl.float32)
        if PENDING:
            if PAD == APAD and PAD != 2:
                window = _alpha_window(x_in, i, j, H, W, HW, ALPHA, APAD)
        for g in tl.static_range(NG):
            p0 = tl.zeros((M, CP), tl.float32)
            p1 = tl.zeros((M, CP), tl.float32)
            p2 = tl.zeros((M, CP), tl.float32)
            p3 = tl.zeros((M, CP), tl.float32)
            for k in tl.static_range(9):
                if LOADS[g * 9 + k] != 0:  # some filter of this group has a tap here, or the alive pool
                    ni = i + (k // 3 - 1)
                    nj = j + (k % 3 - 1)
                    ii = _wrap(ni, H, PAD)
                    jj = _wrap(nj, W, PAD)
                    ok = _inside(ni, nj, H, W) | (PAD != 0)
                    if PENDING:
                        if PAD == APAD and PAD != 2:
                            keep = _keep_in_window(window, pre_in, ii, jj, W, k, threshold)
                        else:
                            keep = _keep(x_in, pre_in, ii, jj, H, W, HW, ALPHA, threshold, APAD)
                        keep = keep.to(tl.float32)
                    if LOADS[g * 9 + k] != 2:
                        xk = tl.load(x_in + chan[None, :] * HW + (ii * W + jj)[:, None],
                                     mask=ok[:, None] & (chan[None, :] < C), other=0.0).to(tl.float32)
                        if PENDING:
                            xk = xk * keep[:, None]
                        if TAPS[(4 * g) * 9 + k] != 0.0:
                            p0 += TAPS[(4 * g) * 9 + k] * xk
                        if TAPS[(4 * g + 1) * 9 + k] != 0.0:
                            p1 += TAPS[(4 * g + 1) * 9 + k] * xk
                        if TAPS[(4 * g + 2) * 9 + k] != 0.0:
                            p2 += TAPS[(4 * g + 2) * 9 + k] * xk
                        if TAPS[(4 * g + 3) * 9 + k] != 0.0:
                            p3 += TAPS[(4 * g + 3) * 9 + k] * xk
                    if ALIVE:
                        if g == 0:  # alive(x) before the update: 3x3 max of the true alpha
                            if PAD == APAD:
                                ai, aj, aok = ii, jj, ok
                            else:
                                ai, aj = _wrap(ni, H, APAD), _wrap(nj, W, APAD)
                                aok = _inside(ni, nj, H, W) | (APAD != 0)
                            a = tl.load(x_in + ALPHA * HW + ai * W + aj, mask=aok,
                                        other=float("-inf")).to(tl.float32)
                            if PENDING:  # (where first: -inf * 0 would be NaN outside the grid)
                                if PAD != APAD:
                                    keep = _keep(x_in, pre_in, ai, aj, H, W, HW, ALPHA, threshold,
                                                 APAD).to(tl.float32)
                                a = tl.where(aok, tl.where(aok, a, 0.0) * keep, a)
                            pool = tl.maximum(pool, a, propagate_nan=tl.PropagateNan.ALL)
            acc = _layer1(p0, w1, 4 * g, acc, chan, hid, CP, HP, P_CLAMP, p_lo, p_hi, DOT_T, PREC)
            if 4 * g + 1 < F:
                acc = _layer1(p1, w1, 4 * g + 1, acc, chan, hid, CP, HP, P_CLAMP, p_lo, p_hi, DOT_T, PREC)
            if 4 * g + 2 < F:
                acc = _layer1(p2, w1, 4 * g + 2, acc, chan, hid, CP, HP, P_CLAMP, p_lo, p_hi, DOT_T, PREC)
            if 4 * g + 3 < F:
                acc = _layer1(p3, w1, 4 * g + 3, acc, chan, hid, CP, HP, P_CLAMP, p_lo, p_hi, DOT_T, PREC)
        if HAS_B1:
            acc += bias1[None, :]
        h = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if H_CLAMP:
            h = _clamp(h, h_lo, h_hi)
        w2t = tl.load(w2 + hid[:, None] * CP + chan[None, :])
        dx = tl.dot(h.to(DOT_T), w2t, input_precision=PREC)
        if HAS_B2:
            dx += bias2[None, :]
        if U_CLAMP:
            dx = _clamp(dx, u_lo, u_hi)

        # The stochastic update mask from the global cell coordinates (see nca_fast/rng.py).
        if HAS_MASK:
            fire = tl.load(fire_mask + b.to(tl.int64) * HW + i * W + j) != 0
        else:
            c0 = (j + col0).to(tl.uint32, bitcast=True)
            c1 = (i + row0).to(tl.uint32, bitcast=True)
            c3 = (b + batch0).to(tl.uint32, bitcast=True)
            r0, _, _, _ = tl.philox(seed, c0, c1, step + c0 * 0, c3)
            fire = (r0 >> 8).to(tl.int32) < fire_threshold

        x = tl.load(x_in + chan[None, :] * HW + (i * W + j)[:, None], mask=chan[None, :] < C,
                    other=0.0).to(tl.float32)
        if PENDING:
            if PAD == APAD and PAD != 2:
                keep = _keep_in_window(window, pre_in, i, j, W, 4, threshold)
            else:
                keep = _keep(x_in, pre_in, i, j, H, W, HW, ALPHA, threshold, APAD)
            x = x * keep.to(tl.float32)[:, None]
        y = x + dx * (fire.to(tl.float32) * step_size)[:, None]  # NaN * 0 stays NaN, as in the reference
        if S_CLAMP:
            y = _clamp(y, s_lo, s_hi)
        out = (chan[None, :] * HW + (i * W + j)[:, None])
        tl.store(dst + image + out, y.to(dst.dtype.element_ty), mask=valid[:, None] & (chan[None, :] < C))
        if DECODE:  # only for models without alive masks: y is the true state (else see finalize)
            pixel_shuffle_out(y, b, i, j, valid, img, dw0, db0, dw1, db1, H, W, CP, R, K, N, DH, NPAD, NB,
                               DOT_T, PREC)
        if ALIVE:
            tl.store(dst_pre + b.to(tl.int64) * HW + i * W + j, (pool > threshold).to(tl.uint8), mask=valid)


@triton.jit
def nca_finalize_kernel(src, src_pre, dst, img, dw0, db0, dw1, db1, H, W, n_tiles_w, tiles_per_image,
                        n_tiles, tiles_per_program, threshold,
                        C: tl.constexpr, CP: tl.constexpr, ALPHA: tl.constexpr, PAD: tl.constexpr,
                        APAD: tl.constexpr,
                        BH: tl.constexpr, BW: tl.constexpr,
                        DECODE: tl.constexpr = False, R: tl.constexpr = 1, K: tl.constexpr = 3,
                        N: tl.constexpr = 3, DH: tl.constexpr = 0, NPAD: tl.constexpr = 16,
                        NB: tl.constexpr = 16, DOT_T: tl.constexpr = tl.float32,
                        PREC: tl.constexpr = "tf32"):
    """Pending form -> true state: ``dst = y * (pre & alive(y))``, and with DECODE its pixel-shuffle
    frame. Memory-bound: reads C values + a byte per cell (the 3x3 alpha re-reads hit cache),
    writes C values (+ K*R*R pixels)."""
    HW = H * W
    chan = tl.arange(0, CP)
    for it in range(tiles_per_program):  # persistent: tiles pid, pid + nprog, ...
        b, i, j, valid = _tile(it, n_tiles, tiles_per_image, n_tiles_w, H, W, BH, BW)
        image = b.to(tl.int64) * C * HW
        x = _load_state(src + image, src_pre + b.to(tl.int64) * HW, i, j, chan, H, W, HW, threshold,
                        C, ALPHA, PAD, APAD, True)
        out = chan[None, :] * HW + (i * W + j)[:, None]
        tl.store(dst + image + out, x.to(dst.dtype.element_ty), mask=valid[:, None] & (chan[None, :] < C))
        if DECODE:
            pixel_shuffle_out(x, b, i, j, valid, img, dw0, db0, dw1, db1, H, W, CP, R, K, N, DH, NPAD, NB,
                               DOT_T, PREC)
