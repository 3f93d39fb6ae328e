"""The fused step's backward: gradients for the state's residual path, the perception and the weights.

Nothing of size ``[B, hidden, H, W]`` is saved by the forward: each tile recomputes its perception and
hidden layer from the saved input state (the same dots as the forward, so the ReLU sees the same
pre-activations), then runs the chain rule per cell:

    gy   = g * life                       life: the saved alive decision (1 byte per cell; 1 without alive)
    gy   = gy * [s_lo <= y <= s_hi]       the state clamp (torch.clamp passes the bounds)
    g_dx = gy * fire * step_size * [u_lo <= dx <= u_hi]
    g_h  = g_dx @ w2^T * [a1 > 0] * [h_lo <= relu(a1) <= h_hi]
    g_p  = g_h @ w1_f^T * [p_lo <= p_f <= p_hi]                 per filter f
    gW2 += h^T @ g_dx, gb2 += sum g_dx, gW1_f += p_f^T @ g_h, gb1 += sum g_h

The grid: a program per (tile stream, hidden chunk of HC units). Each program recomputes its tiles'
perception, only its chunk of layer 1, and holds only its chunk's weight-gradient sums (32 registers a
thread at HC = 64; all of them in one program took 64 and spilled): the hidden dimension is the parallel
one, as in a GEMM's N. The chunk-0 program of a stream writes ``gy`` (the residual path's state
gradient); each writes its chunk's share of ``g_p`` into its own slab ([NCH, B, H, W, F*CP]:
``perceive_vjp_kernel`` below adds the slabs and turns them into the rest of the state gradient, as
``nca_fast.reference.perceive_vjp`` does) and adds its slice of its stream's row of partial sums (zeroed
once a backward, so that the steps of a rollout accumulate in place), which ``reduce_partials_kernel``
adds once, in a fixed order: no floating-point atomics, so gradients are bit-reproducible. Models with
update or state clamps need the whole update for their masks: an update pass (PASS 1, one program per
stream) recomputes the MLP once and writes ``g_dx``; the MLP pass (PASS 2) reads it, so no chunk's
program recomputes the whole MLP. Models without (PASS 0) run in one launch.

Per cell-update (growing model, C=16, F=3, hidden 128, two chunks): reads the state's 3x3
neighbourhood (C values from DRAM, the rest from cache) and the incoming gradient (C values), writes
C + 2*F*CP fp32 values (448 B; the transposed perception then reads the slabs and gy, 448 B, and
writes gx, 64 B); about 49 kFLOP on tensor cores: layer 1 (12.3 kFLOP; twice with update or state
clamps), layer 2's backward for g_h and gW2 (8.2k), layer 1's for g_p and gW1 (24.6k), the bias rows.
Gradient dots run in TF32 (fp32 operands) whatever the state's dtype: a 16-bit gradient would
underflow.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .operand import as_a_operand, k_order
from .step import _clamp, _mma, _perceive, _relu_to


@triton.jit
def _inside_range(v, lo, hi):
    """[lo <= v <= hi] as 0/1 in fp32: torch.clamp's backward passes the gradient on the bounds."""
    return ((v >= lo) & (v <= hi)).to(tl.float32)


@triton.jit
def _add_to(ptr, v, mask):
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + v, mask=mask)


@triton.jit
def _layer1_chunk(pcs, w1, wb, ones, c, chan, hc, HP, h_lo, h_hi, CP: tl.constexpr, F: tl.constexpr,
                  HC: tl.constexpr, HAS_B1: tl.constexpr, H_CLAMP: tl.constexpr, DOT_T: tl.constexpr,
                  PREC: tl.constexpr, FAST: tl.constexpr, SPLIT: tl.constexpr, BW: tl.constexpr):
    """Hidden units [c*HC, (c+1)*HC) of one tile (zero from HP on): (h in the dot dtype, dh/da as 0/1
    fp32), both [BW, HC].
    The weight chunks come from L1/L2 per tile: held for the whole loop beside the gradient sums, they
    would spill."""
    kk = tl.arange(0, 16)
    col = c * HC + hc
    ok = (col < HP)[None, :]
    acc = tl.zeros((BW, HC), tl.float32)
    if HAS_B1:
        b_hi = tl.load(wb + kk[:, None] * HP + col[None, :], mask=ok, other=0.0).to(DOT_T)
        b_lo = b_hi
        if SPLIT:
            b_lo = tl.load(wb + 16 * HP + kk[:, None] * HP + col[None, :], mask=ok, other=0.0).to(DOT_T)
        acc = _mma(ones, b_hi, b_lo, acc, SPLIT, True, PREC)
    for f in tl.static_range(F):
        w_hi = tl.load(w1 + f * CP * HP + chan[:, None] * HP + col[None, :], mask=ok, other=0.0).to(DOT_T)
        w_lo = w_hi
        if SPLIT:
            w_lo = tl.load(w1 + (F + f) * CP * HP + chan[:, None] * HP + col[None, :], mask=ok,
                           other=0.0).to(DOT_T)
        acc = _mma(pcs[f], w_hi, w_lo, acc, SPLIT, False, PREC)
    dh = (acc > 0).to(tl.float32)
    h = _relu_to(acc, DOT_T, FAST)
    if H_CLAMP:
        dh = dh * _inside_range(h.to(tl.float32), h_lo, h_hi)
        h = _clamp(h, tl.cast(h_lo, DOT_T), tl.cast(h_hi, DOT_T))
    return h, dh


@triton.jit
def _w2_chunk(w2, c, chan, hc, CP: tl.constexpr, HP, HC: tl.constexpr, DOT_T: tl.constexpr, SPLIT: tl.constexpr):
    """Rows [c*HC, (c+1)*HC) of w2 [HP, CP] in the dot dtype (TF32 part, low part; zero from HP on),
    in the order the hidden layer reaches the dot (``operand.as_a_operand``)."""
    rows = c * HC + k_order(hc, DOT_T)
    ok = (rows < HP)[:, None]
    w_hi = tl.load(w2 + rows[:, None] * CP + chan[None, :], mask=ok, other=0.0).to(DOT_T)
    w_lo = w_hi
    if SPLIT:
        w_lo = tl.load(w2 + HP * CP + rows[:, None] * CP + chan[None, :], mask=ok, other=0.0).to(DOT_T)
    return w_hi, w_lo


@triton.jit(do_not_specialize=("H", "W", "n_items", "items_per_program", "step_offset", "row0", "col0",
                                      "batch0", "fire_threshold"))
def nca_step_backward_kernel(
    src, life, fire_mask, ctr, gout,  # state x [B, H, W, C]; life u8 [B, H, W]; g = dL/dy [B, H, W, C]
    w1, wb, w2, b2, fscale,  # the forward's packed weights, fp32 (pack.pack_step)
    gx, gp, part,  # out: gy [B, H, W, C] fp32, g_p [NCH, B, H, W, F*CP] fp32, partials [streams, NPART] fp32
    gd,  # dL/d(update) [B, H, W, CP] fp32: written by PASS 1, read by PASS 2
    H, W, n_items, items_per_program, step_offset, row0, col0, batch0, fire_threshold, step_size,
    p_lo, p_hi, h_lo, h_hi, u_lo, u_hi, s_lo, s_hi,
    C: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr, F: tl.constexpr, TAPS: tl.constexpr,
    FSCALE: tl.constexpr, NEEDS: tl.constexpr, PAD: tl.constexpr, ALPHA: tl.constexpr, ALIVE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, P_CLAMP: tl.constexpr, H_CLAMP: tl.constexpr,
    U_CLAMP: tl.constexpr, S_CLAMP: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
    PERC_T: tl.constexpr, FAST: tl.constexpr, SPLIT: tl.constexpr, GPREC: tl.constexpr, BW: tl.constexpr,
    HC: tl.constexpr, PASS: tl.constexpr,
):
    """A persistent grid over ``n_items`` cells (all images, row-major) in tiles of BW: program
    ``pid`` runs tile stream ``pid // PER`` for hidden chunk ``pid % PER`` (PER: NCH chunks, or 1 in the
    update pass) and writes its sums into its stream's row ``part[stream]``: gW1 [F, CP, HP], gW2
    [HP, CP], gb1 [HP] (its chunk's slices), gb2 [CP] (the chunk-0 or update-pass program). The last
    chunk is masked from HP on. GPREC: the gradient dots' ``input_precision`` (fp32 operands)."""
    NCH: tl.constexpr = (HP + HC - 1) // HC
    PER: tl.constexpr = 1 if PASS == 1 else NCH  # programs per tile stream
    pid = tl.program_id(0)
    cc = pid % PER  # this program's hidden chunk: its sums and its share of layer 1 and of dL/dp
    tp = pid // PER  # its tile stream (the programs of one stream are neighbours in the launch)
    nprog = tl.num_programs(0) // PER
    m = tl.arange(0, BW)
    chan = tl.arange(0, CP)
    lead = (chan * 0 + cc) == 0  # one program per stream writes the chunk-free outputs: gy and gb2
    hc = tl.arange(0, HC)
    kk = tl.arange(0, 16)
    rows = cc * HC + hc
    hok = (rows < HP)[None, :]
    cmask = chan[None, :] < C
    ones = tl.where(kk[None, :] == 0, 1.0, 0.0).to(DOT_T) + tl.zeros((BW, 16), DOT_T)
    if HAS_B2:
        bias2 = tl.load(b2 + chan)
    # The sums of this chunk: gw1[f] = dL/dW1[f][:, chunk]^T, gw2, gb1. Hidden units run along M of
    # every weight-gradient dot (as [HC, CP]): with M = 16 channels, 4 warps would each hold the whole
    # accumulator. One chunk's sums take (F + 1) * HC * CP / threads registers (32 at HC = 64).
    gw1 = ()
    for _f in tl.static_range(F):
        gw1 = gw1 + (tl.zeros((HC, CP), tl.float32),)
    gw2 = tl.zeros((HC, CP), tl.float32)
    # gb1's sum over a tile's cells: with 64-unit chunks a dot with a ones column (tensor cores, shares
    # the transposed g_h with gW1's dot: -20 warp-instructions a cell, -8 barriers, measured) instead of
    # a cross-thread reduction (132 shuffles a tile); [HC, 16] sums, column 0 used. Smaller chunks spill.
    BIAS_DOT: tl.constexpr = HC >= 64
    # g_h @ w1^T takes g_h as it leaves its dot (operand.py) where that measured faster: 64-unit chunks
    # (with the bias sum's reduction, a loss) of TF32 (Triton's tf32x3 split then spills more)
    GH_AS_A: tl.constexpr = BIAS_DOT and not SPLIT
    krows = cc * HC + (k_order(hc, tl.float32) if GH_AS_A else hc)  # (w1's rows in g_h's order)
    kok = (krows < HP)[:, None]
    gb1 = tl.zeros((HC, 16) if BIAS_DOT else (HC,), tl.float32)
    gb2 = tl.zeros((CP,), tl.float32)
    # dL/dp of this chunk goes to its own slab of gp ([NCH, B*H*W, F*CP]), added by perceive_vjp_kernel
    gp_c = gp + cc.to(tl.int64) * n_items * (F * CP)
    seed = tl.load(ctr)
    step = (tl.load(ctr + 1) + step_offset).to(tl.uint32)
    HW = H * W
    for it in range(items_per_program):
        q = (tp + it * nprog) * BW + m
        valid = q < n_items
        cell = tl.where(valid, q, 0)
        bb = cell // HW
        ii = (cell % HW) // W
        j = cell % W
        vmask = valid[:, None] & cmask
        # ---- the forward's perception again (unclamped, then clamped as layer 1 sees it) ----------
        pts, x, _alpha = _perceive(src, src, fscale, tl.zeros((BW,), tl.int32), ii, j, bb, valid, H, W, p_lo, p_hi,
                                   m, chan, C, CP, CP, BW, F, TAPS, FSCALE, not ALIVE, False, NEEDS, PAD, ALPHA,
                                   False, False, False, False, PERC_T, DOT_T, FAST=FAST)
        pcs = ()
        for f in tl.static_range(F):
            pc = pts[f]
            if P_CLAMP:
                pc = _clamp(pc, tl.cast(p_lo, DOT_T), tl.cast(p_hi, DOT_T))
            pcs = pcs + (pc,)
        if PASS == 2:
            gdx = tl.load(gd + cell[:, None] * CP + chan[None, :], mask=valid[:, None], other=0.0)
        else:
            if HAS_MASK:
                fire = (tl.load(fire_mask + cell, mask=valid, other=0) != 0).to(tl.float32)
            else:
                c0 = (j + col0).to(tl.uint32, bitcast=True)
                c1 = (ii + row0).to(tl.uint32, bitcast=True)
                c3 = (bb + batch0).to(tl.uint32, bitcast=True)
                r0, _r1, _r2, _r3 = tl.philox(seed, c0, c1, step + c0 * 0, c3)
                fire = ((r0 >> 8).to(tl.int32) < fire_threshold).to(tl.float32)
            rate = fire * step_size

            # ---- the state's residual path: g through the alive mask and the state clamp -------------
            g = tl.load(gout + cell[:, None] * C + chan[None, :], mask=vmask, other=0.0).to(tl.float32)
            if ALIVE:
                g = g * (tl.load(life + cell, mask=valid, other=0) != 0).to(tl.float32)[:, None]
            gdx = g * rate[:, None]
            if PASS == 1:  # the update and state clamps' masks need the update itself: layer 2 once more
                dx = tl.zeros((BW, CP), tl.float32)
                for c in tl.static_range(NCH):
                    h, _dh = _layer1_chunk(pcs, w1, wb, ones, c, chan, hc, HP, h_lo, h_hi, CP, F, HC, HAS_B1,
                                           H_CLAMP, DOT_T, PREC, FAST, SPLIT, BW)
                    w_hi, w_lo = _w2_chunk(w2, c, chan, hc, CP, HP, HC, DOT_T, SPLIT)
                    dx = _mma(as_a_operand(h, BW, HC), w_hi, w_lo, dx, SPLIT, False, PREC)
                if HAS_B2:
                    dx += bias2[None, :]
                if S_CLAMP:
                    ud = dx
                    if U_CLAMP:
                        ud = _clamp(dx, u_lo, u_hi)
                    keep = _inside_range(x + ud * rate[:, None], s_lo, s_hi)
                    g = g * keep
                    gdx = gdx * keep
                if U_CLAMP:
                    gdx = gdx * _inside_range(dx, u_lo, u_hi)
            tl.store(gx + cell[:, None] * C + chan[None, :], g, mask=vmask & lead[None, :])
            gdx = tl.where(vmask, gdx, 0.0)  # (tiles past the end add nothing to the sums)
            gb2 += tl.sum(gdx, 0)
            if PASS == 1:
                tl.store(gd + cell[:, None] * CP + chan[None, :], gdx, mask=valid[:, None])

        if PASS != 1:
            # ---- the MLP's backward for this chunk: weight-gradient sums and its share of dL/dp -------
            h, dh = _layer1_chunk(pcs, w1, wb, ones, cc, chan, hc, HP, h_lo, h_hi, CP, F, HC, HAS_B1, H_CLAMP,
                                  DOT_T, PREC, FAST, SPLIT, BW)
            gw2 = tl.dot(tl.trans(h.to(tl.float32)), gdx, gw2, input_precision=GPREC)
            w2t = tl.load(w2 + rows[None, :] * CP + chan[:, None], mask=hok, other=0.0)  # [CP, HC] fp32
            if SPLIT:
                w2t += tl.load(w2 + HP * CP + rows[None, :] * CP + chan[:, None], mask=hok, other=0.0)
            gh = tl.dot(gdx, w2t, input_precision=GPREC) * dh
            if BIAS_DOT:
                gb1 = tl.dot(tl.trans(gh), ones.to(tl.float32), gb1, input_precision=GPREC)
            else:
                gb1 += tl.sum(gh, 0)
            ngw1 = ()
            gha = gh
            if GH_AS_A:
                gha = as_a_operand(gh, BW, HC)
            for f in tl.static_range(F):
                ngw1 = ngw1 + (tl.dot(tl.trans(gh), pcs[f].to(tl.float32), gw1[f], input_precision=GPREC),)
                w1t = tl.load(w1 + f * CP * HP + chan[None, :] * HP + krows[:, None], mask=kok, other=0.0)
                if SPLIT:  # ([HC, CP] fp32)
                    w1t += tl.load(w1 + (F + f) * CP * HP + chan[None, :] * HP + krows[:, None], mask=kok, other=0.0)
                gpf = tl.dot(gha, w1t, input_precision=GPREC)
                if P_CLAMP:
                    gpf = gpf * _inside_range(pts[f].to(tl.float32), p_lo, p_hi)
                tl.store(gp_c + cell[:, None] * (F * CP) + f * CP + chan[None, :], gpf, mask=vmask)
            gw1 = ngw1

    # ---- this program's partial sums (its chunk's slice of the stream's row), added to what the row
    # holds: the launcher zeroes it once per backward, so a rollout's steps (and a batch's slices)
    # accumulate in place, each row owned by one program per launch (no atomics), and
    # reduce_partials_kernel adds the rows once, in a fixed order. (After the loop: the extra loads
    # cost a program, not a cell.) --------------------------------------------------------------------
    NPART: tl.constexpr = F * CP * HP + HP * CP + HP + CP
    row = part + tp * NPART
    if PASS != 1:
        ok = (rows < HP)[:, None]
        for f in tl.static_range(F):
            _add_to(row + f * CP * HP + chan[None, :] * HP + rows[:, None], gw1[f], ok)
        _add_to(row + F * CP * HP + rows[:, None] * CP + chan[None, :], gw2, ok)
        if BIAS_DOT:
            gb1 = tl.sum(tl.where(kk[None, :] == 0, gb1, 0.0), 1)
        _add_to(row + F * CP * HP + HP * CP + rows, gb1, rows < HP)
    if PASS != 2:
        _add_to(row + F * CP * HP + HP * CP + HP + chan, gb2, lead)


@triton.jit
def _gp_taps(acc, gp, slab, taps, fscale, k, bb, ri, rj, ok, H, W, chan, cok, F: tl.constexpr, CP: tl.constexpr,
             NCH: tl.constexpr, TAPMASK: tl.constexpr):
    """``acc`` [BW, CP] plus tap k of every filter times the perception gradients of cells (bb, ri, rj)
    (none where not ``ok``), summed over the hidden chunks' slabs. Filters whose tap k is zero (bit
    k*F + f of TAPMASK clear: the identity's off-centre taps, a Sobel's middle row or column) load
    nothing (decided at compile time: k and f are constants): 13 of the growing model's 27 (tap,
    filter) pairs are non-zero."""
    row = ((bb * H + ri) * W + rj).to(tl.int64) * (F * CP)
    mask = ok[:, None] & cok[None, :]
    for f in tl.static_range(F):
        if (TAPMASK >> (k * F + f)) & 1:
            ptr = gp + row[:, None] + f * CP + chan[None, :]
            v = tl.load(ptr, mask=mask, other=0.0)
            for s in tl.static_range(1, NCH):
                v += tl.load(ptr + s * slab, mask=mask, other=0.0)
            acc += (tl.load(taps + k * F + f) * tl.load(fscale + f)) * v
    return acc


@triton.jit(do_not_specialize=("H", "W", "n_items"))
def perceive_vjp_kernel(
    gp, taps, fscale, gx,  # g_p slabs [NCH, B, H, W, F*CP] fp32; taps [9, F]; filter scales [F]; in/out gx
    H, W, n_items,
    C: tl.constexpr, CP: tl.constexpr, F: tl.constexpr, NEEDS: tl.constexpr, PAD: tl.constexpr,
    NCH: tl.constexpr, BW: tl.constexpr, TAPMASK: tl.constexpr,
):
    """The transposed perception, added into ``gx`` ([B, H, W, C] fp32, holding the residual path's
    gradient): gx[m] += sum over filters f, taps k and cells n with pad(n + e_k) = m of
    taps[k, f] * fscale[f] * g_p[n, f]. Per axis the sources of m for the offset e are m - e (inside
    the grid; circular: wrapped) and, with replicate padding, m itself where the padding read m for a
    neighbour outside (m = 0, e = -1; m = N-1, e = +1): what ``reference.perceive_vjp`` folds back,
    without its [B, F*C, H+2, W+2] intermediate.

    One tile of BW cells per program. A neighbour's gradients are F contiguous CP-channel rows, summed
    over the slabs: each slab is read about once from DRAM, the other taps hit cache. The taps are
    unrolled so that the zero ones (TAPMASK) cost nothing: the growing model loads 13 (tap, filter)
    rows a slab instead of 27 (45.0 warp-instructions a cell on sm_90a, 112 registers, against 84.9
    and 48 with the taps in a loop; all 27 unrolled took 255 registers and spilled). A zero tap's
    NaN is not propagated, as a convolution would (0 * NaN). This one launch replaces ~10 PyTorch ones
    (slab sum, permute, grouped transposed convolution, filter sum, padding folds, residual add) and
    their ~2 KB a cell of traffic."""
    slab = n_items.to(tl.int64) * (F * CP)  # (elements per slab; a multiple of 16: 128-bit loads)
    pid = tl.program_id(0)
    m = tl.arange(0, BW)
    chan = tl.arange(0, CP)
    cok = chan < C  # (the slabs' padding channels are never written)
    q = pid * BW + m
    valid = q < n_items
    cell = tl.where(valid, q, 0)
    HW = H * W
    bb = cell // HW
    ii = (cell % HW) // W
    j = cell % W
    acc = tl.zeros((BW, CP), tl.float32)
    for k in tl.static_range(9):
        if (NEEDS >> k) & 1:
            ri = ii - (k // 3 - 1)  # (the offset e = (k // 3 - 1, k % 3 - 1))
            rj = j - (k % 3 - 1)
            if PAD == 1:
                ri = (ri + H) % H
                rj = (rj + W) % W
                acc = _gp_taps(acc, gp, slab, taps, fscale, k, bb, ri, rj, valid, H, W, chan, cok, F, CP, NCH, TAPMASK)
            else:
                oki = (ri >= 0) & (ri < H)
                okj = (rj >= 0) & (rj < W)
                acc = _gp_taps(acc, gp, slab, taps, fscale, k, bb, ri, rj, valid & oki & okj, H, W, chan, cok, F, CP,
                               NCH, TAPMASK)
                if PAD == 2:  # replicate: the edge cell also received what the padding ring read
                    fi = (ii == (k // 3 // 2) * (H - 1)) & (ri != ii)  # (row 0 for e = -1, H - 1 for +1)
                    fj = (j == (k % 3 // 2) * (W - 1)) & (rj != j)
                    acc = _gp_taps(acc, gp, slab, taps, fscale, k, bb, ii, rj, valid & fi & okj, H, W, chan, cok,
                                   F, CP, NCH, TAPMASK)
                    acc = _gp_taps(acc, gp, slab, taps, fscale, k, bb, ri, j, valid & oki & fj, H, W, chan, cok,
                                   F, CP, NCH, TAPMASK)
                    acc = _gp_taps(acc, gp, slab, taps, fscale, k, bb, ii, j, valid & fi & fj, H, W, chan, cok,
                                   F, CP, NCH, TAPMASK)
    out = gx + cell[:, None] * C + chan[None, :]
    ok = valid[:, None] & cok[None, :]
    acc += tl.load(out, mask=ok, other=0.0)
    tl.store(out, acc, mask=ok)


@triton.jit(do_not_specialize=("streams",))
def reduce_partials_kernel(
    part, gw1, gwb, gw2, gb2,  # partials [streams, NPART]; out: the packed weights' gradients (fp32)
    streams,
    F: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):
    """The weight gradients: the tile streams' partial sums added in stream order (a fixed order: no
    atomics, bit-reproducible), scattered straight into the packed layouts — gW1 [F, CP, HP], gW2
    [HP, CP], the bias row block [16, HP] (row 0: gb1, rows 1-15 zero), gb2 [CP]; with SPLIT both
    parts of each split matrix get the gradient. One launch instead of a reduction, a zero fill and
    four copies per step."""
    O1: tl.constexpr = F * CP * HP
    O2: tl.constexpr = O1 + HP * CP
    O3: tl.constexpr = O2 + HP
    NPART: tl.constexpr = O3 + CP
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < NPART
    acc = tl.zeros((BLOCK,), tl.float32)
    for r in range(streams):
        acc += tl.load(part + r * NPART + cols, mask=ok, other=0.0)
    in1 = ok & (cols < O1)
    in2 = ok & (cols >= O1) & (cols < O2)
    in3 = ok & (cols >= O2) & (cols < O3)
    for s in tl.static_range(2 if SPLIT else 1):
        tl.store(gw1 + s * O1 + cols, acc, mask=in1)
        tl.store(gw2 + s * (HP * CP) + cols - O1, acc, mask=in2)
        tl.store(gwb + s * (16 * HP) + cols - O2, acc, mask=in3)
        for row in tl.static_range(1, 16):
            tl.store(gwb + s * (16 * HP) + row * HP + cols - O2, tl.zeros((BLOCK,), tl.float32), mask=in3)
    tl.store(gb2 + cols - O3, acc, mask=ok & (cols >= O3))
