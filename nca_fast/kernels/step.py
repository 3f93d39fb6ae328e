"""The fused NCA step: perception + MLP + stochastic mask + alive masks + residual, one pass per step.

The state is channels-last (``[B, H, W, C]`` in memory): a cell's channels are one or two 128-bit
loads. Each step is two launches of ``nca_step_kernel`` over disjoint cells: the *interior* (row
tiles of ``BW`` = 64 cells whose neighbourhood, ``margin`` cells, lies inside the grid: no padding
logic, neighbour addresses a constant apart; each row's last tile ends at the interior's edge and may
overlap the one before) and the *border* ring (every other cell, in tiles of 32 ring cells: wrapped
or masked addresses per padding mode; 3 % of a 256^2 grid, 0.8 % of 1024^2). Each launch is a persistent grid of
programs that stage the weights in shared memory once.

Per cell-update (growing model, C=16, F=3 filters, hidden 128):
  * bytes from DRAM: the state read once and written once, C * 4 B each in fp32 (128 B), C * 2 B
    in fp16/bf16 (64 B); alive models add a mask byte read and one written. The 9 neighbour loads and
    the 25 alpha loads of the alive window re-read lines the tile's own cells bring in (L1/L2).
  * FLOPs: MLP 2 * (16 + F*C) * hidden + 2 * hidden * C = 20,480 on tensor cores (``tl.dot``: the
    bias as one more K=16 block of ones, one K=C block per filter), perception 2 * C per nonzero tap
    (13 taps for identity + Sobel: 416), on CUDA cores in the state's precision (16-bit pairs).
On an H100 (~3.0 TB/s measured copy bandwidth) the memory floor is ~23 G cell-updates/s for an fp32
state and ~46 G for 16-bit; the MLP on TF32 tensor cores (~495 TFLOP/s dense) allows ~24 G, on fp16
tensor cores ~48 G.

The post-update alive mask needs the *updated* alpha of the neighbours, which other programs are
computing concurrently. An alive model is therefore kept in a *pending* form between steps:

    stored  y   = clamp(x + dx * fire)                 (the state before the alive masks)
    stored  pre = alive(x)                             (one byte per cell)
    true state  = y * (pre & alive(y))                 alive(z) = maxpool3x3(z[alpha]) > threshold

The next step materialises the true state of each neighbour it reads: interior tiles get the 9
neighbours' pools as separable 3x3 maxima over the 25 alpha values of the 5x5 window (row maxima,
then column maxima; an fp32 state's four threads a cell take one neighbour column each: ``_interior_keeps``),
border tiles pool each neighbour's 3x3 directly (its padding may differ); the 9 decisions are packed
into one int32 per cell, so every step is one pass that reads and writes the
state once; a rollout ends with one ``finalize``.

Masks multiply (``x * keep``, ``dx * fire``) and every min / max keeps NaN, so a NaN spreads exactly
as in the reference (to the 3x3 neighbourhood each step).

Registers decide the speed (2-4 resident CTAs of 4 warps need <= 168 / 128 per thread): each
neighbour is added into the F perception tiles as it arrives (F + 1 tiles live, not 9); wide models
run the perception in chunks of CC = 16 channels (the K loop of layer 1) and the hidden layer in
chunks of HC units; the bias dot is issued after the perception, so its accumulator does not occupy
registers while the loads are in flight. Multiplying each perception tile by its runtime filter scale
keeps Triton from converting every neighbour load to the dot-operand layout (a shared-memory round
trip and two barriers each). A TF32 hidden layer enters the second dot in the register order its
accumulator left it in, w2's rows loaded to match (``operand.py``): no shuffle per hidden value
(growing tf32 rollout step 69.9 -> 59.4 warp-instructions a cell, 3 -> 4 CTAs on sm_90a). The update
mask is drawn one cell a thread in the loads' layout and converted once (``_pinned``), not in the
accumulator's, where each cell's Philox ran on four threads (growing fp16 rollout 36.9 -> 33.9).
``nca-fast kernels`` reports the result per configuration. The
interior's loads can also be copied a tile ahead (cp.async or TMA, ``config.INTERIOR_LOADS``): more
instructions, less exposed latency; opt-in until a GPU measures which wins.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .operand import as_a_operand, k_order
from .pixel_shuffle import pixel_shuffle_out

NAN = tl.constexpr(tl.PropagateNan.ALL)  # every min / max keeps NaN, as torch does
# Triton before 3.9 (the device image runs 3.6) clones even an opaque (``is_pure=False``) inline asm
# into each layout its users ask for, so ``_pinned`` cannot hold a computation in one layout there;
# a one-trip ``while`` loop does (layout rematerialisation does not cross an scf.while). 3.9
# treats the opaque asm as an anchor, and there the loop costs (it splits the loop body's blocks).
PIN_BY_LOOP = tl.constexpr(tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9))
# The step's integer arguments, compiled as plain i32 (never specialised on value or on divisibility
# by 16): one binary per configuration whatever the grid, step or batch offset, instead of a compile
# per value class (a rollout's step_offset alone is 0, 1 and "other"; seconds each on a GPU host),
# and the binary `nca-fast kernels` reports is the one that runs.
STEP_INTS = ("H", "W", "n_items", "items_per_program", "top", "bot", "left", "right", "step_offset",
             "row0", "col0", "batch0", "fire_threshold")


@triton.jit
def _clamp(v, lo, hi):
    """clamp(v, lo, hi) that keeps NaN (as torch.clamp; a GPU's plain min/max would drop it), in v's
    dtype (triton 3.6 computes a bf16 min / max in fp32)."""
    return tl.minimum(tl.maximum(v, lo, propagate_nan=NAN), hi, propagate_nan=NAN).to(v.dtype)


@triton.jit
def _relu_to(h, DOT_T: tl.constexpr, FAST: tl.constexpr):
    """relu(h) in the dot dtype. FAST (GPU, 16-bit): one ``cvt.rn.relu`` per pair of values, which
    rounds, clamps and keeps NaN in one instruction (the interpreter cannot run inline PTX)."""
    if FAST and DOT_T == tl.float16:
        return tl.inline_asm_elementwise("cvt.rn.relu.f16x2.f32 $0, $2, $1;", "=r,r,r", [h],
                                         dtype=tl.float16, is_pure=True, pack=2)
    elif FAST and DOT_T == tl.bfloat16:
        return tl.inline_asm_elementwise("cvt.rn.relu.bf16x2.f32 $0, $2, $1;", "=r,r,r", [h],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        return tl.maximum(h, 0.0, propagate_nan=NAN).to(DOT_T)


@triton.jit
def _pinned(v):
    """v through an opaque copy (GPU only: inline PTX), which Triton's layout passes cannot clone into
    another layout. What computes v then stays in its own layout, and the result is converted once:
    the update mask's Philox runs one cell a thread where the tile's loads put the cells, rather than
    where its only use (``dx * fire``, in the MMA accumulator's layout) would put it: there each
    thread holds two rows and four threads share them, so every thread ran two Philox draws (~100
    instructions) and each cell's draw ran on four threads."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=v.dtype, is_pure=False, pack=1)


@triton.jit
def _mma(a, b, b_lo, acc, SPLIT: tl.constexpr, A_EXACT: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b. SPLIT ("ieee"): about fp32 accuracy from three TF32 products, a_hi b + a_hi b_lo +
    a_lo b with a = a_hi + a_lo split here (a_lo = 0 when A_EXACT) and b_lo = b - tf32(b) packed on
    the host, so that no weight is split per tile (Triton's tf32x3 does, and spills)."""
    if SPLIT:
        a_hi = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        if not A_EXACT:
            acc = tl.dot(a - a_hi, b, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _wrap(i, n, PAD: tl.constexpr):
    """Map a (possibly outside) coordinate into [0, n): PAD 1 wraps, else clamps (zero padding masks
    the load, replicate padding reads the clamped cell)."""
    if PAD == 1:
        return ((i % n) + n) % n
    else:
        return tl.minimum(tl.maximum(i, 0), n - 1)


@triton.jit
def _inside(i, j, H, W):
    return (i >= 0) & (i < H) & (j >= 0) & (j < W)


@triton.jit
def _ring_cells(q, H, W, top, bot, left, right):
    """Ring cell ``q`` of one image -> (row, column): rows above ``top``, rows from ``bot``, then the
    columns left of ``left`` and from ``right`` of the rows in between."""
    n_top = top * W
    n_bot = (H - bot) * W
    side = tl.maximum(left + W - right, 1)
    in_top = q < n_top
    in_bot = (q >= n_top) & (q < n_top + n_bot)
    qb = q - n_top
    u = tl.maximum(q - n_top - n_bot, 0)
    s = u % side
    i = tl.where(in_top, q // W, tl.where(in_bot, bot + qb // W, top + u // side))
    j = tl.where(in_top, q % W, tl.where(in_bot, qb % W, tl.where(s < left, s, right + s - left)))
    return i, j


@triton.jit
def _keep_at(src, pre, cell, i, j, H, W, C: tl.constexpr, ALPHA: tl.constexpr, threshold,
             APAD: tl.constexpr, ok):
    """Pending form -> the alive decision of the in-grid cells ``cell`` = (i, j):
    pre & (maxpool3x3(y_alpha) > threshold), the pool padded by APAD (0: outside ignored, 1: circular,
    2: replicate). Border tiles only; the interior uses the separable window."""
    post = tl.full(i.shape, float("-inf"), tl.float32)
    for m in range(9):  # a loop, not unrolled: else the compiler hoists all 81 loads of a border tile
        mi = i + (m // 3 - 1)
        mj = j + (m % 3 - 1)
        a = tl.load(src + ((cell // W - i + _wrap(mi, H, APAD)) * W + _wrap(mj, W, APAD)) * C + ALPHA,
                    mask=ok & (_inside(mi, mj, H, W) | (APAD != 0)), other=float("-inf"))
        post = tl.maximum(post, a.to(tl.float32), propagate_nan=NAN)
    return (post > threshold) & (tl.load(pre + cell, mask=ok, other=0) != 0)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=NAN)


@triton.jit
def _max3(a, b, c, FAST: tl.constexpr = False):
    """max(a, b, c), NaN kept. FAST (GPU) with 16-bit values: inline PTX, so that LLVM's SLP
    vectoriser cannot pair the alive window's scalar maxima into half2 ones, which cost a ``PRMT`` a
    pair to pack (68 a thread a tile, growing fp16); ptxas still fuses the two into one ``VHMNMX``."""
    if FAST and a.dtype == tl.float16:
        return tl.inline_asm_elementwise("{ max.NaN.f16 $0, $1, $2; max.NaN.f16 $0, $0, $3; }", "=h,h,h,h",
                                         [a, b, c], dtype=tl.float16, is_pure=True, pack=1)
    elif FAST and a.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("{ max.NaN.bf16 $0, $1, $2; max.NaN.bf16 $0, $0, $3; }", "=h,h,h,h",
                                         [a, b, c], dtype=tl.bfloat16, is_pure=True, pack=1)
    else:
        return tl.maximum(tl.maximum(a, b, propagate_nan=NAN), c, propagate_nan=NAN)


@triton.jit
def _round_down(t, DT: tl.constexpr):
    """The largest value of DT at most the fp32 scalar ``t``: for a value v of DT, v > t exactly
    when v > _round_down(t, DT). (Round to nearest, then one step toward -inf where that rounded
    up: the bit pattern is sign-magnitude; from 0 the step is to the smallest negative subnormal.)"""
    if DT == tl.float32:
        return t
    else:
        r = tl.cast(t, DT)
        rf = tl.cast(r, tl.float32)
        b = tl.cast(r, tl.int16, bitcast=True).to(tl.int32)
        down = tl.where(rf > 0, b - 1, tl.where(rf == 0, -32767, b + 1))
        return tl.where(rf > t, tl.cast(down.to(tl.int16), DT, bitcast=True), r)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _interior_keeps(src_tile, pre_tile, W, m, C: tl.constexpr, ALPHA: tl.constexpr, threshold,
                    PERC_T: tl.constexpr, Q: tl.constexpr, FAST: tl.constexpr):
    """Pending form, interior tile: bit k (= 3*(dy+1) + (dx+1)) of the result says whether neighbour
    (dy, dx) of each cell is alive, from the 5x5 alpha window by separable maxima. They stay in the
    state's dtype and meet the threshold rounded down to it (exact: ``_round_down``): a 16-bit
    state's maxima are not widened to fp32 (-1.0 warp-instruction a cell, growing fp16).

    An fp32 state's loads hold each cell on Q = 4 threads (its 16 channels as four 128-bit loads), so
    a window computed per cell ran four times over (the tf32 rollout's 170 ``FMNMX`` a thread a tile).
    Here part q of a cell takes neighbour columns kb .. kb + NK - 1 (kb = min(q, 3 - NK); Q = 4: one
    column each, the fourth part repeats the third) and the parts meet in an OR across the cell's
    threads: growing tf32 rollout step 56.8 -> 53.3 warp-instructions a cell. 16-bit states pass
    Q = 1 (Q = 2 cost registers: 4 -> 3 CTAs)."""
    NK: tl.constexpr = (3 + Q - 1) // Q  # neighbour columns per part
    BW: tl.constexpr = m.shape[0]
    # One flat [BW * Q] vector (element e: part e % Q of cell e // Q) lays out the same on every
    # Triton release (its loads have no contiguity to order by; a [BW, Q] tensor's order is a tie
    # that releases break differently) and reshapes to [BW, Q] with each cell's parts on its Q threads.
    e = tl.arange(0, BW * Q)
    kb = tl.minimum(e % Q, 3 - NK)  # this part's first neighbour column
    # Each row's address is a scalar (uniform) pointer plus one loop-invariant offset per element:
    # with the row folded into the per-element offsets, the compiler hoists 64-bit offsets for every
    # row out of the loop (+40 registers).
    eo = (e // Q) * C + (kb - 2) * C  # window column kb of each cell, from its own
    rows = ()  # per window row, per part column t: the max over window columns kb+t .. kb+t+2
    for r in tl.static_range(5):
        rowp = src_tile + (r - 2) * W * C + ALPHA
        a = ()
        for t in tl.static_range(NK + 2):
            a = a + (tl.load(rowp + eo + t * C).to(PERC_T),)
        rm = ()
        for t in tl.static_range(NK):
            rm = rm + (_max3(a[t], a[t + 1], a[t + 2], FAST),)
        rows = rows + (rm,)
    po = e // Q + kb
    bits = tl.zeros((BW * Q,), tl.int32)
    for kr in tl.static_range(3):  # neighbour (kr - 1, kb + t - 1): window rows kr..kr+2
        for t in tl.static_range(NK):
            post = _max3(rows[kr][t], rows[kr + 1][t], rows[kr + 2][t], FAST)
            keep = (post > _round_down(threshold, post.dtype)) & (tl.load(pre_tile + (kr - 1) * W + po + (t - 1)) != 0)
            bits = bits | (keep.to(tl.int32) << (3 * kr + t))
    return tl.reduce(tl.reshape(bits << kb, (BW, Q)), 1, _or)  # (one shift to each part's columns)


@triton.jit
def _clamp_bf16x2(v, lo, hi):
    """``_clamp`` of bf16 values on a GPU, by pairs: triton 3.6 computes a bf16 min / max in fp32
    (two conversions and a pack around each pair; texture bf16 step 45.9 -> 40.0 there)."""
    return tl.inline_asm_elementwise("{ max.NaN.bf16x2 $0, $1, $2; min.NaN.bf16x2 $0, $0, $3; }", "=r,r,r,r",
                                     [v, lo, hi], dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _fma2(acc, t, x):
    """acc + t * x for 16-bit values, as ``fma.rn`` on the register pairs the loads filled (two
    adjacent channels of a cell): LLVM's SLP vectoriser re-paired the scalar FMAs of the taps across
    filters and channels, one ``PRMT`` to pack each such pair (growing fp16 45 a thread a tile,
    texture bf16 78). Same rounding as the fused scalar form (FP_FUSION); GPU only (FAST)."""
    if x.dtype == tl.float16:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [t, x, acc],
                                         dtype=tl.float16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r", [t, x, acc],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _perceive(src, tile, fscale, bits, ii, j, bb, valid, H, W, p_lo, p_hi, m, chc, C: tl.constexpr,
              CP: tl.constexpr, CC: tl.constexpr, BW: tl.constexpr, F: tl.constexpr, TAPS: tl.constexpr,
              FSCALE: tl.constexpr, SCALED: tl.constexpr, BIT_TAPS: tl.constexpr, NEEDS: tl.constexpr,
              PAD: tl.constexpr, ALPHA: tl.constexpr, PENDING: tl.constexpr, INTERIOR: tl.constexpr,
              TRACK: tl.constexpr, P_CLAMP: tl.constexpr, PERC_T: tl.constexpr,
              DOT_T: tl.constexpr, desc=None, drow=0, dcol=0, c0=0, TMA: tl.constexpr = False,
              FAST: tl.constexpr = False):
    """Perception of channels ``chc`` (one chunk of CC) of a tile -> (F tiles [BW, CC] in the dot
    dtype, scaled and clamped; the centre [BW, CC] in fp32; with TRACK the pre-update pool [BW]).
    Each neighbour is added into the F tiles as it arrives: F + 1 tiles live, not 9. The pending
    form's neighbours are materialised by ``bits`` (bit k: neighbour k alive)."""
    # (-0.0, not 0.0: -0.0 + v is v for every v, so each filter's first tap folds away; not in a
    # TMA plain step, where a conversion moves with it: 16-bit 32.1 -> 38.2 warp-instructions a cell)
    ps = ()
    for _ in tl.static_range(F):
        ps = ps + (tl.full((BW, CC), -0.0 if SCALED or not TMA else 0.0, PERC_T),)
    alpha_max = tl.full((BW, CC), float("-inf"), PERC_T)
    x = tl.zeros((BW, CC), tl.float32)
    for k in tl.static_range(9):
        if NEEDS[k]:
            if INTERIOR and TMA:  # a tensor-memory-accelerator copy of the [BW, CC] box (zeros from C on)
                xk = desc.load([drow + (k // 3 - 1), dcol + (k % 3 - 1), c0]).reshape(BW, CC)
            elif INTERIOR:
                nb = tile + ((k // 3 - 1) * W + (k % 3 - 1)) * C + m[:, None] * C + chc[None, :]
                if CP == C:
                    xk = tl.load(nb)
                else:
                    xk = tl.load(nb, mask=chc[None, :] < C, other=0.0)
            else:
                ni = ii + (k // 3 - 1)
                nj = j + (k % 3 - 1)
                ok = valid & (_inside(ni, nj, H, W) | (PAD != 0))
                ncell = (bb * H + _wrap(ni, H, PAD)) * W + _wrap(nj, W, PAD)
                xk = tl.load(src + ncell[:, None] * C + chc[None, :], mask=ok[:, None] & (chc[None, :] < C), other=0.0)
            xk = xk.to(PERC_T)
            on = ((bits >> k) & 1) != 0  # (pending form) neighbour k is alive
            if PENDING and (k == 4 or not BIT_TAPS):  # (the centre: the residual's x and the identity tap)
                if PERC_T == tl.float32 or not INTERIOR:
                    xk = xk * on.to(PERC_T)[:, None]
                else:  # (16-bit interior: a select of the constants 1 and 0, not an int-to-half conversion)
                    xk = xk * tl.where(on, 1.0, 0.0).to(PERC_T)[:, None]
            if TRACK:  # (only the alpha channel's multiply survives: its channel is known per register)
                xa = xk
                if PENDING and k != 4 and BIT_TAPS:
                    xa = tl.where(on[:, None], xk, xk * 0.0)
                alpha_max = tl.maximum(alpha_max, tl.where(chc[None, :] == ALPHA, xa, float("-inf")),
                                       propagate_nan=NAN)
            if k == 4:
                x = xk.to(tl.float32)
            nps = ()
            for f in tl.static_range(F):
                if TAPS[f * 9 + k] == 0.0:
                    nps = nps + (ps[f],)
                elif PENDING and k != 4 and BIT_TAPS:
                    # A neighbour's alive bit goes into its tap, a value a cell, not into each of
                    # its channels: x * bit * t is (bit ? t : 0) * x, NaN * 0 included.
                    nps = nps + (ps[f] + tl.where(on, TAPS[f * 9 + k] * FSCALE[f], 0.0).to(PERC_T)[:, None] * xk,)
                elif TAPS[f * 9 + k] * (FSCALE[f] if SCALED else 1.0) == 1.0:
                    nps = nps + (ps[f] + xk,)
                elif TAPS[f * 9 + k] * (FSCALE[f] if SCALED else 1.0) == -1.0:
                    nps = nps + (ps[f] - xk,)
                elif FAST and PERC_T != tl.float32:  # (16-bit on a GPU: on the loads' pairs)
                    t = tl.full((BW, CC), TAPS[f * 9 + k] * (FSCALE[f] if SCALED else 1.0), PERC_T)
                    nps = nps + (_fma2(ps[f], t, xk),)
                else:
                    nps = nps + (ps[f] + (TAPS[f * 9 + k] * (FSCALE[f] if SCALED else 1.0)) * xk,)
            ps = nps
    pool = tl.full((BW,), float("-inf"), tl.float32)
    if TRACK:
        pool = tl.reduce(alpha_max, 1, _max_nan).to(tl.float32)
    pts = ()
    for f in tl.static_range(F):
        pf = ps[f]
        if not SCALED:
            pf = pf * tl.load(fscale + f).to(PERC_T)
        if P_CLAMP:
            if FAST and PERC_T == tl.bfloat16:
                pf = _clamp_bf16x2(pf, tl.full(pf.shape, p_lo, PERC_T), tl.full(pf.shape, p_hi, PERC_T))
            else:
                pf = _clamp(pf, tl.cast(p_lo, PERC_T), tl.cast(p_hi, PERC_T))
        pts = pts + (pf.to(DOT_T),)
    return pts, x, pool


@triton.jit(do_not_specialize=STEP_INTS)
def nca_step_kernel(
    src, src_pre, dst, dst_pre, fire_mask, ctr, desc,  # state in/out [B, H, W, C]; masks u8 [B, H, W]
    w1, wb, w2, b2, fscale,  # packed (pack.pack_step): w1 [F, CP, HP], wb [16, HP], w2 [HP, CP]; b2, fscale
    img, dw0, db0, dw1, db1,  # DECODE: the frame [B, K, H*R, W*R] and the pixel-shuffle head
    H, W, n_items, items_per_program, top, bot, left, right,
    step_offset, row0, col0, batch0, fire_threshold, threshold, step_size,
    p_lo, p_hi, h_lo, h_hi, u_lo, u_hi, s_lo, s_hi,
    C: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr, F: tl.constexpr, TAPS: tl.constexpr,
    FSCALE: tl.constexpr, NEEDS: tl.constexpr, PAD: tl.constexpr, APAD: tl.constexpr, ALPHA: tl.constexpr,
    ALIVE: tl.constexpr,
    PENDING: tl.constexpr, HAS_MASK: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    P_CLAMP: tl.constexpr, H_CLAMP: tl.constexpr, U_CLAMP: tl.constexpr, S_CLAMP: tl.constexpr,
    DOT_T: tl.constexpr, PREC: tl.constexpr, PERC_T: tl.constexpr, FAST: tl.constexpr,
    BW: tl.constexpr, INTERIOR: tl.constexpr, W_RESIDENT: tl.constexpr, HC: tl.constexpr, CC: tl.constexpr,
    SPLIT: tl.constexpr,
    DECODE: tl.constexpr = False, R: tl.constexpr = 1, K: tl.constexpr = 3, N: tl.constexpr = 3,
    DH: tl.constexpr = 0, NPAD: tl.constexpr = 16, NB: tl.constexpr = 16,
    TMA: tl.constexpr = False, STAGES: tl.constexpr = 1,
):
    """A persistent grid of programs over ``n_items`` tiles of ``BW`` cells (all channels).

    INTERIOR: item t is one row of BW cells in rows [top, bot), columns [left, right) (each row's
    last tile ends at ``right``; the grid's size ``nprog`` a multiple of the segments a row,
    ``launch.interior_programs``); else ring cells t*BW .. t*BW + BW - 1 of the cells outside that
    rectangle. HC / CC: hidden units / input channels per MLP chunk; SPLIT: "ieee" (see ``_mma``).
    ``ctr`` (int64 [2] on the device) holds the seed and the base step, so that a captured CUDA graph
    replays with new values; ``step_offset`` is this launch's step relative to the base.
    TAPS: [F][9] filter taps divided by the filter's scale ``FSCALE[f]`` (folded back into the taps
    where SCALED, else the runtime ``fscale[f]`` multiplies each sum); NEEDS: [9] whether
    neighbour k (3*(dy+1) + (dx+1)) is loaded. PERC_T: the dtype perception is computed in (the
    state's, 16-bit pairs for 16-bit states). PAD: 0 = zeros, 1 = circular, 2 = replicate; APAD (the
    alive pool's): 0 = outside cells ignored, 1 = circular, 2 = replicate.
    STAGES 2 (interior, ``config.INTERIOR_LOADS`` other than "plain"): Triton's software pipeline
    issues the next tile's loads while this one computes; with TMA each neighbour's [BW, CC] box comes
    through ``desc``, a tensor descriptor of the state as [B*H, W, C] (``launch.tma_descriptor``; the
    state pointer again when unused).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    m = tl.arange(0, BW)
    chan = tl.arange(0, CP)
    cmask = chan[None, :] < C
    offs = m[:, None] * C + chan[None, :]
    hid = tl.arange(0, HC)
    kk = tl.arange(0, 16)
    ch = tl.arange(0, CC)
    ones = tl.where(kk[None, :] == 0, 1.0, 0.0).to(DOT_T) + tl.zeros((BW, 16), DOT_T)
    # Loop-invariant weights: Triton stages them in shared memory once per program. The MLP runs in
    # chunks, NCH of HC hidden units (its fp32 accumulator must fit the registers) by NCC of CC input
    # channels (the perception tiles live per chunk: the K loop of layer 1). SPLIT ("ieee") packs each
    # matrix's low part (w - tf32(w)) after it: NW = 2 parts.
    NCH: tl.constexpr = HP // HC
    NCC: tl.constexpr = CP // CC
    NW: tl.constexpr = 2 if SPLIT else 1
    w2s = ()
    wbs = ()
    for c in tl.static_range(NCH):
        for s in tl.static_range(NW):
            # (interior: rows in the order the hidden layer reaches the second dot, operand.py)
            w2s = w2s + (tl.load(w2 + s * HP * CP + (c * HC + (k_order(hid, DOT_T) if INTERIOR else hid))[:, None]
                                 * CP + chan[None, :]).to(DOT_T),)
            if HAS_B1:
                wbs = wbs + (tl.load(wb + s * 16 * HP + kk[:, None] * HP + c * HC + hid[None, :]).to(DOT_T),)
    if HAS_B2:
        bias2 = tl.load(b2 + chan)
    if W_RESIDENT:
        w1s = ()
        for f in tl.static_range(F):
            for cc in tl.static_range(NCC):
                for c in tl.static_range(NCH):
                    for s in tl.static_range(NW):
                        w1s = w1s + (tl.load(w1 + ((s * F + f) * CP + cc * CC + ch[:, None]) * HP + c * HC
                                             + hid[None, :]).to(DOT_T),)
    seed = tl.load(ctr)
    step = (tl.load(ctr + 1) + step_offset).to(tl.uint32)
    if INTERIOR:
        # Tile t = pid + it * nprog is row segment t % per_row of row t // per_row (over all images).
        # The launcher makes nprog a multiple of per_row, so a program keeps its segment (j0 is loop
        # invariant) and steps KP = nprog / per_row rows a tile: its (image, row) advance with one
        # carry instead of two integer divisions a tile (~60 instructions: 4 warp-instructions a
        # cell), and the programs still sweep the grid together (halo rows hit L2).
        per_row = (right - left + BW - 1) // BW
        n_rows = bot - top
        n_img = n_items // (n_rows * per_row)
        KP = nprog // per_row
        j0 = tl.minimum(left + (pid % per_row) * BW, right - BW)
        row = (pid // per_row) % n_rows
        b_ = pid // per_row // n_rows
        d_row = KP % n_rows
        d_img = KP // n_rows
    for it in tl.range(items_per_program, num_stages=STAGES):
        # ---- which cells: a row segment of the interior, or BW cells of the ring ------------------
        if INTERIOR:
            # spare programs redo their segment of the last row, and each row's last tile ends at
            # ``right`` (it may overlap the one before): cells computed twice get the same values
            spare = b_ >= n_img
            b = tl.where(spare, n_img - 1, b_)
            i = top + tl.where(spare, n_rows - 1, row)
            row += d_row
            wrap = row >= n_rows
            row = tl.where(wrap, row - n_rows, row)
            b_ += d_img + wrap.to(tl.int32)
            cell0 = (b * H + i) * W + j0
            tile = src + cell0.to(tl.int64) * C
            j = j0 + m
            ii = i + m * 0
            bb = b + m * 0
            valid = m >= 0
            drow = b * H + i
        else:
            drow = 0
            j0 = 0
            q = (pid + it * nprog) * BW + m
            valid = q < n_items
            q = tl.where(valid, q, 0)
            ring = top * W + (H - bot) * W + (bot - top) * (left + W - right)
            bb = q // ring
            ii, j = _ring_cells(q - bb * ring, H, W, top, bot, left, right)
            cell = (bb * H + ii) * W + j
            tile = src

        # ---- the alive masks: the neighbours' (pending form) and this step's pre-update pool ------
        pool = tl.full((BW,), float("-inf"), tl.float32)
        bits = tl.zeros((BW,), tl.int32)  # (pending form) bit k: neighbour k is alive
        if PENDING:
            if INTERIOR:
                # (an fp32 chunk's CC channels are CC // 4 threads' 128-bit loads a cell)
                bits = _interior_keeps(tile, src_pre + cell0, W, m, C, ALPHA, threshold, PERC_T,
                                       CC // 4 if PERC_T == tl.float32 else 1, FAST)
                # (alive(x), the pool, comes from the perception's loads of the alpha channel: the
                # window's loads then serve one layout only, a second would recompute them)
            else:
                for k in tl.static_range(9):
                    ni = ii + (k // 3 - 1)
                    nj = j + (k % 3 - 1)
                    # the alive pool pads by APAD: its cell may differ from the perception's
                    aok = valid & (_inside(ni, nj, H, W) | (APAD != 0))
                    acell = (bb * H + _wrap(ni, H, APAD)) * W + _wrap(nj, W, APAD)
                    a = tl.load(src + acell * C + ALPHA, mask=aok, other=float("-inf")).to(tl.float32)
                    keep = _keep_at(src, src_pre, acell, _wrap(ni, H, APAD), _wrap(nj, W, APAD), H, W, C, ALPHA,
                                    threshold, APAD, aok)
                    pool = tl.maximum(pool, tl.where(aok, tl.where(aok, a, 0.0) * keep.to(tl.float32), a),
                                      propagate_nan=NAN)  # (-inf stays)
                    if PAD != APAD:
                        ok = valid & (_inside(ni, nj, H, W) | (PAD != 0))
                        keep = _keep_at(src, src_pre, (bb * H + _wrap(ni, H, PAD)) * W + _wrap(nj, W, PAD),
                                        _wrap(ni, H, PAD), _wrap(nj, W, PAD), H, W, C, ALPHA, threshold, APAD, ok)
                    bits = bits | (keep.to(tl.int32) << k)
        elif ALIVE:
            for k in tl.static_range(9):
                if INTERIOR:
                    a = tl.load(tile + ((k // 3 - 1) * W + (k % 3 - 1)) * C + m * C + ALPHA).to(tl.float32)
                else:
                    ni = ii + (k // 3 - 1)
                    nj = j + (k % 3 - 1)
                    aok = valid & (_inside(ni, nj, H, W) | (APAD != 0))
                    a = tl.load(src + ((bb * H + _wrap(ni, H, APAD)) * W + _wrap(nj, W, APAD)) * C + ALPHA, mask=aok,
                                other=float("-inf")).to(tl.float32)
                pool = tl.maximum(pool, a, propagate_nan=NAN)

        # ---- perception and the MLP ----------------------------------------------------------------
        # Filter scales folded into the taps (SCALED), and in an fp32 pending interior the neighbours'
        # alive bits too (BIT_TAPS); not in a growing model's plain step or border tiles, where
        # without the runtime scale Triton moves the dot operands' layout conversion up to every
        # neighbour's load (6 -> 20 barriers a tile), nor in "ieee" (its spills double), nor in border
        # tiles with a decoder (sm_80, 16-bit, 4x head: one more spill load or store in the loop).
        SCALED: tl.constexpr = (PENDING and INTERIOR) or (not ALIVE and (INTERIOR or not DECODE))
        BIT_TAPS: tl.constexpr = PENDING and INTERIOR and PERC_T == tl.float32 and not SPLIT
        if NCC == 1:  # one channel chunk: perceived once, for every hidden chunk
            pts, x, pool_c = _perceive(src, tile, fscale, bits, ii, j, bb, valid, H, W, p_lo, p_hi, m, ch, C, CP, CC,
                                       BW, F, TAPS, FSCALE, SCALED, BIT_TAPS, NEEDS, PAD, ALPHA, PENDING, INTERIOR,
                                       PENDING and INTERIOR, P_CLAMP, PERC_T, DOT_T, desc, drow, j0, 0, TMA, FAST)
            if PENDING and INTERIOR:
                pool = pool_c
        dx = tl.zeros((BW, CP), tl.float32)
        for c in tl.static_range(NCH):
            acc = tl.zeros((BW, HC), tl.float32)
            for cc in tl.static_range(NCC):
                if NCC > 1:  # (perceived again per hidden chunk: its loads hit L1)
                    pts, _, pool_c = _perceive(src, tile, fscale, bits, ii, j, bb, valid, H, W, p_lo, p_hi, m,
                                               cc * CC + ch, C, CP, CC, BW, F, TAPS, FSCALE, SCALED, BIT_TAPS, NEEDS,
                                               PAD, ALPHA, PENDING, INTERIOR,
                                               PENDING and INTERIOR and c == 0 and cc == ALPHA // CC,
                                               P_CLAMP, PERC_T, DOT_T, desc, drow, j0, cc * CC, TMA, FAST)
                    if PENDING and INTERIOR and c == 0 and cc == ALPHA // CC:
                        pool = pool_c
                if HAS_B1 and cc == 0:  # (after the perception: the accumulator's registers are free till now)
                    acc = _mma(ones, wbs[c * NW], wbs[c * NW + NW - 1], acc, SPLIT, True, PREC)
                for f in tl.static_range(F):
                    if W_RESIDENT:
                        w1f = w1s[((f * NCC + cc) * NCH + c) * NW]
                        w1lo = w1s[((f * NCC + cc) * NCH + c) * NW + NW - 1]
                    else:  # too large to stay in shared memory: streamed from L2 each tile
                        rows = (f * CP + cc * CC + ch)[:, None] * HP + c * HC + hid[None, :]
                        w1f = tl.load(w1 + rows).to(DOT_T)
                        w1lo = w1f
                        if SPLIT:
                            w1lo = tl.load(w1 + F * CP * HP + rows).to(DOT_T)
                    acc = _mma(pts[f], w1f, w1lo, acc, SPLIT, False, PREC)
            h = _relu_to(acc, DOT_T, FAST)
            if H_CLAMP == 1:
                h = _clamp(h, tl.cast(h_lo, DOT_T), tl.cast(h_hi, DOT_T))
            elif H_CLAMP == 2:  # (a lower bound <= 0: nothing to do after the ReLU)
                h = tl.minimum(h, tl.cast(h_hi, DOT_T), propagate_nan=NAN).to(h.dtype)
            if INTERIOR:  # (border tiles keep the shuffles: on sm_80 the renamed layer spills there)
                h = as_a_operand(h, BW, HC)
            dx = _mma(h, w2s[c * NW], w2s[c * NW + NW - 1], dx, SPLIT, False, PREC)
        if HAS_B2:
            dx += bias2[None, :]
        if U_CLAMP:
            dx = _clamp(dx, u_lo, u_hi)
        if NCC > 1:  # the centre again (an L1 hit) rather than CP channels live all along
            if INTERIOR:
                x = tl.load(tile + offs, mask=cmask, other=0.0).to(tl.float32)
            else:
                x = tl.load(src + cell[:, None] * C + chan[None, :], mask=valid[:, None] & cmask,
                            other=0.0).to(tl.float32)
            if PENDING:
                x = x * ((bits >> 4) & 1).to(tl.float32)[:, None]

        # ---- the stochastic update mask, from the global cell coordinates (nca_fast/rng.py) ------
        if HAS_MASK:
            if INTERIOR:
                fire = tl.load(fire_mask + cell0 + m) != 0
            else:
                fire = tl.load(fire_mask + cell, mask=valid, other=0) != 0
        else:
            c0 = (j + col0).to(tl.uint32, bitcast=True)
            c1 = (ii + row0).to(tl.uint32, bitcast=True)
            c3 = (bb + batch0).to(tl.uint32, bitcast=True)
            # One draw a cell, where the tile's loads put the cells (``_pinned``): -2.5 to -3
            # warp-instructions a cell on every step. Not where keeping the converted mask costs
            # registers: a TF32 MLP in several hidden chunks (texture 12x96: 128 -> 147 registers,
            # 4 -> 3 CTAs; 64x256 spilled more) and a border tile with a decoder's hidden layer
            # (16-bit: spilled 16 B).
            PIN: tl.constexpr = FAST and (INTERIOR or DH == 0) and (DOT_T != tl.float32 or NCH == 1)
            if PIN and PIN_BY_LOOP and STAGES == 1:  # (a nested loop stops the prefetch's pipelining)
                r0 = c0
                once = 0
                while once < 1:  # (see PIN_BY_LOOP)
                    r0 = tl.philox(seed, c0, c1, step + c0 * 0, c3)[0]
                    once += 1
            else:
                r0, _, _, _ = tl.philox(seed, c0, c1, step + c0 * 0, c3)
                if PIN:
                    r0 = _pinned(r0)
            fire = (r0 >> 8).to(tl.int32) < fire_threshold

        # ---- residual, the state clamp, the store ----------------------------------------------
        y = x + dx * (fire.to(tl.float32) * step_size)[:, None]  # NaN * 0 stays NaN, as in the reference
        if S_CLAMP:
            y = _clamp(y, s_lo, s_hi)
        if INTERIOR:
            out = dst + cell0.to(tl.int64) * C + offs
            if CP == C:
                tl.store(out, y.to(dst.dtype.element_ty))
            else:
                tl.store(out, y.to(dst.dtype.element_ty), mask=cmask)
            if ALIVE:
                tl.store(dst_pre + cell0 + m, (pool > threshold).to(tl.uint8))
        else:
            tl.store(dst + cell[:, None] * C + chan[None, :], y.to(dst.dtype.element_ty),
                     mask=valid[:, None] & cmask)
            if ALIVE:
                tl.store(dst_pre + cell, (pool > threshold).to(tl.uint8), mask=valid)
        if DECODE:  # only for models without alive masks: y is the true state (else see finalize)
            pixel_shuffle_out(y, bb, ii, j, valid, img, dw0, db0, dw1, db1, H, W, CP, R, K, N, DH, NPAD, NB,
                              DOT_T, PREC)


@triton.jit(do_not_specialize=("H", "W", "n_items", "items_per_program"))
def nca_finalize_kernel(src, src_pre, dst, life, img, dw0, db0, dw1, db1, H, W, n_items, items_per_program,
                        threshold, C: tl.constexpr, CP: tl.constexpr, ALPHA: tl.constexpr, APAD: tl.constexpr,
                        BW: tl.constexpr, LIFE: tl.constexpr = False,
                        DECODE: tl.constexpr = False, R: tl.constexpr = 1, K: tl.constexpr = 3,
                        N: tl.constexpr = 3, DH: tl.constexpr = 0, NPAD: tl.constexpr = 16,
                        NB: tl.constexpr = 16, DOT_T: tl.constexpr = tl.float32,
                        PREC: tl.constexpr = "tf32"):
    """Pending form -> true state: ``dst = y * (pre & alive(y))`` over ``BW`` consecutive cells per
    tile (channels-last), and with DECODE its pixel-shuffle frame. Memory-bound: reads C values + a
    byte per cell (the 3x3 alpha re-reads hit cache), writes C values (+ K*R*R pixels). LIFE: also
    writes the alive decision, a byte per cell (what the backward needs: ``step_backward.py``)."""
    m = tl.arange(0, BW)
    chan = tl.arange(0, CP)
    HW = H * W
    for it in range(items_per_program):
        q = (tl.program_id(0) + it * tl.num_programs(0)) * BW + m
        valid = q < n_items
        cell = tl.where(valid, q, 0)
        b = cell // HW
        i = (cell % HW) // W
        j = cell % W
        keep = _keep_at(src, src_pre, cell, i, j, H, W, C, ALPHA, threshold, APAD, valid)
        if LIFE:
            tl.store(life + cell, keep.to(tl.uint8), mask=valid)
        x = tl.load(src + cell[:, None] * C + chan[None, :], mask=valid[:, None] & (chan[None, :] < C),
                    other=0.0).to(tl.float32)
        x = x * keep.to(tl.float32)[:, None]
        tl.store(dst + cell[:, None] * C + chan[None, :], x.to(dst.dtype.element_ty),
                 mask=valid[:, None] & (chan[None, :] < C))
        if DECODE:
            pixel_shuffle_out(x, b, i, j, valid, img, dw0, db0, dw1, db1, H, W, CP, R, K, N, DH, NPAD, NB,
                              DOT_T, PREC)
