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

It writes ``gy`` (the residual path's state gradient), ``g_p`` ([B, H, W, F*CP], what the transposed
perception turns into the rest of the state gradient, see ``nca_fast.reference.perceive_vjp``) and one
row of weight-gradient partial sums per program, which the launcher adds in a fixed order: no
floating-point atomics, so gradients are bit-reproducible.

Per cell-update (growing model, C=16, F=3, hidden 128): reads the state's 3x3 neighbourhood (C values
from DRAM, the rest from cache) and the incoming gradient (C values), writes C + F*C fp32 values (256 B
in all); about 61 kFLOP on tensor cores: layer 1 (12.3 kFLOP; twice with update or state clamps,
whose masks need the update), layer 2's backward for g_h and gW2 (8.2k), layer 1's for g_p and gW1
(24.6k), the bias row (4.1k). Gradient dots run in TF32
(fp32 operands) whatever the state's dtype: a 16-bit gradient would underflow.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .step import _clamp, _mma, _perceive, _relu_to


@triton.jit
def _inside_range(v, lo, hi):
    """[lo <= v <= hi] as 0/1 in fp32: torch.clamp's backward passes the gradient on the bounds."""
    return ((v >= lo) & (v <= hi)).to(tl.float32)


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
    """Rows [c*HC, (c+1)*HC) of w2 [HP, CP] in the dot dtype (TF32 part, low part; zero from HP on)."""
    rows = c * HC + hc
    ok = (rows < HP)[:, None]
    w_hi = tl.load(w2 + rows[:, None] * CP + chan[None, :], mask=ok, other=0.0).to(DOT_T)
    w_lo = w_hi
    if SPLIT:
        w_lo = tl.load(w2 + HP * CP + rows[:, None] * CP + chan[None, :], mask=ok, other=0.0).to(DOT_T)
    return w_hi, w_lo


@triton.jit
def nca_step_backward_kernel(
    src, life, fire_mask, ctr, gout,  # state x [B, H, W, C]; life u8 [B, H, W]; g = dL/dy [B, H, W, C]
    w1, wb, w2, b2, fscale,  # the forward's packed weights, fp32 (pack.pack_step)
    gx, gp, part,  # out: gy [B, H, W, C] fp32, g_p [B, H, W, F*CP] fp32, partials [programs, NPART] fp32
    H, W, n_items, items_per_program, step_offset, row0, col0, batch0, fire_threshold, step_size,
    p_lo, p_hi, h_lo, h_hi, u_lo, u_hi, s_lo, s_hi,
    C: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr, F: tl.constexpr, TAPS: tl.constexpr,
    NEEDS: tl.constexpr, PAD: tl.constexpr, ALPHA: tl.constexpr, ALIVE: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, P_CLAMP: tl.constexpr, H_CLAMP: tl.constexpr,
    U_CLAMP: tl.constexpr, S_CLAMP: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
    PERC_T: tl.constexpr, FAST: tl.constexpr, SPLIT: tl.constexpr, GPREC: tl.constexpr, BW: tl.constexpr,
    HC: tl.constexpr,
):
    """A persistent grid over ``n_items`` cells (all images, row-major) in tiles of BW. Program p
    writes its weight-gradient sums to ``part[p]``: gW1 [F, CP, HP], gW2 [HP, CP], gb1 [HP], gb2 [CP].
    The hidden layer runs in chunks of HC units (the last one masked from HP on): the [BW, HP]
    intermediates never live at once (the sums already take ~64 registers a thread). GPREC: the
    gradient dots' ``input_precision`` (fp32 operands)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    NCH: tl.constexpr = (HP + HC - 1) // HC
    m = tl.arange(0, BW)
    chan = tl.arange(0, CP)
    hc = tl.arange(0, HC)
    kk = tl.arange(0, 16)
    cmask = chan[None, :] < C
    ones = tl.where(kk[None, :] == 0, 1.0, 0.0).to(DOT_T) + tl.zeros((BW, 16), DOT_T)
    if HAS_B2:
        bias2 = tl.load(b2 + chan)
    # The sums, chunk-major: gw1[c * F + f] = dL/dW1[f][:, chunk c]^T, gw2[c], gb1[c]. Hidden units run
    # along M of every weight-gradient dot (as [HC, CP]): with M = 16 channels, 4 warps would each hold
    # the whole accumulator.
    gw1 = ()
    for _k in tl.static_range(NCH * F):
        gw1 = gw1 + (tl.zeros((HC, CP), tl.float32),)
    gw2 = ()
    gb1 = ()
    for _c in tl.static_range(NCH):
        gw2 = gw2 + (tl.zeros((HC, CP), tl.float32),)
        gb1 = gb1 + (tl.zeros((HC,), tl.float32),)
    gb2 = tl.zeros((CP,), tl.float32)
    seed = tl.load(ctr)
    step = (tl.load(ctr + 1) + step_offset).to(tl.uint32)
    HW = H * W
    for it in range(items_per_program):
        q = (pid + it * nprog) * BW + m
        valid = q < n_items
        cell = tl.where(valid, q, 0)
        bb = cell // HW
        ii = (cell % HW) // W
        j = cell % W
        vmask = valid[:, None] & cmask
        # ---- the forward's perception again (unclamped, then clamped as layer 1 sees it) ----------
        pts, x, _alpha = _perceive(src, src, fscale, tl.zeros((BW,), tl.int32), ii, j, bb, valid, H, W, p_lo, p_hi,
                                   m, chan, C, CP, CP, BW, F, TAPS, NEEDS, PAD, ALPHA, False, False, False, False,
                                   PERC_T, DOT_T)
        pcs = ()
        for f in tl.static_range(F):
            pc = pts[f]
            if P_CLAMP:
                pc = _clamp(pc, tl.cast(p_lo, DOT_T), tl.cast(p_hi, DOT_T))
            pcs = pcs + (pc,)
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
        if U_CLAMP or S_CLAMP:  # these masks need the update itself: layer 2 once more, chunk by chunk
            dx = tl.zeros((BW, CP), tl.float32)
            for c in tl.static_range(NCH):
                h, _dh = _layer1_chunk(pcs, w1, wb, ones, c, chan, hc, HP, h_lo, h_hi, CP, F, HC, HAS_B1,
                                       H_CLAMP, DOT_T, PREC, FAST, SPLIT, BW)
                w_hi, w_lo = _w2_chunk(w2, c, chan, hc, CP, HP, HC, DOT_T, SPLIT)
                dx = _mma(h, w_hi, w_lo, dx, SPLIT, False, PREC)
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
        tl.store(gx + cell[:, None] * C + chan[None, :], g, mask=vmask)
        gdx = tl.where(vmask, gdx, 0.0)  # (tiles past the end add nothing to the sums)
        gb2 += tl.sum(gdx, 0)

        # ---- the MLP's backward, chunk by chunk: weight-gradient sums and dL/dp -----------------
        gps = ()
        for _f in tl.static_range(F):
            gps = gps + (tl.zeros((BW, CP), tl.float32),)
        ngw1 = ()
        ngw2 = ()
        ngb1 = ()
        for c in tl.static_range(NCH):
            h, dh = _layer1_chunk(pcs, w1, wb, ones, c, chan, hc, HP, h_lo, h_hi, CP, F, HC, HAS_B1, H_CLAMP,
                                  DOT_T, PREC, FAST, SPLIT, BW)
            rows = c * HC + hc
            hok = (rows < HP)[None, :]
            ngw2 = ngw2 + (tl.dot(tl.trans(h.to(tl.float32)), gdx, gw2[c], input_precision=GPREC),)
            w2t = tl.load(w2 + rows[None, :] * CP + chan[:, None], mask=hok, other=0.0)  # [CP, HC] fp32
            if SPLIT:
                w2t += tl.load(w2 + HP * CP + rows[None, :] * CP + chan[:, None], mask=hok, other=0.0)
            gh = tl.dot(gdx, w2t, input_precision=GPREC) * dh
            ngb1 = ngb1 + (gb1[c] + tl.sum(gh, 0),)
            ngps = ()
            for f in tl.static_range(F):
                ngw1 = ngw1 + (tl.dot(tl.trans(gh), pcs[f].to(tl.float32), gw1[c * F + f], input_precision=GPREC),)
                w1t = tl.load(w1 + f * CP * HP + chan[None, :] * HP + rows[:, None], mask=hok.T, other=0.0)
                if SPLIT:  # ([HC, CP] fp32)
                    w1t += tl.load(w1 + (F + f) * CP * HP + chan[None, :] * HP + rows[:, None], mask=hok.T, other=0.0)
                ngps = ngps + (tl.dot(gh, w1t, gps[f], input_precision=GPREC),)
            gps = ngps
        gw1 = ngw1
        gw2 = ngw2
        gb1 = ngb1
        for f in tl.static_range(F):
            gpf = gps[f]
            if P_CLAMP:
                gpf = gpf * _inside_range(pts[f].to(tl.float32), p_lo, p_hi)
            tl.store(gp + cell[:, None] * (F * CP) + f * CP + chan[None, :], gpf, mask=vmask)

    # ---- this program's partial sums, added by the launcher in a fixed order ----------------------
    NPART: tl.constexpr = F * CP * HP + HP * CP + HP + CP
    row = part + pid * NPART
    for c in tl.static_range(NCH):
        rows = c * HC + hc
        ok = (rows < HP)[:, None]
        for f in tl.static_range(F):
            tl.store(row + f * CP * HP + chan[None, :] * HP + rows[:, None], gw1[c * F + f], mask=ok)
        tl.store(row + F * CP * HP + rows[:, None] * CP + chan[None, :], gw2[c], mask=ok)
        tl.store(row + F * CP * HP + HP * CP + rows, gb1[c], mask=rows < HP)
    tl.store(row + F * CP * HP + HP * CP + HP + chan, gb2)
