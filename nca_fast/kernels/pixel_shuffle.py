"""The pixel-shuffle head in Triton, shared by the decode-only kernel (``decode.py``) and the step's
epilogue (``step.py``): a tile of cells ``t [M, CP]`` -> its ``R x R`` pixel blocks of an image.

Per cell: ``2 * (C*DH + DH*N)`` FLOPs on tensor cores (``N = K*R*R`` head outputs; ``2*C*N`` for a
linear head) and ``N`` pixel stores; nothing else moves.
"""
import triton
import triton.language as tl

from .operand import as_a_operand, k_order


@triton.jit
def pixel_shuffle_out(t, b, i, j, valid, img, dw0, db0, dw1, db1, H, W,
                      CP: tl.constexpr, R: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                      DH: tl.constexpr, NPAD: tl.constexpr, NB: tl.constexpr, DOT_T: tl.constexpr,
                      PREC: tl.constexpr, DHC: tl.constexpr = 0):
    """Decode ``t [M, CP]`` (cells (b, i, j), [M] each, stored where ``valid``) into
    ``img [B, K, H*R, W*R]``.

    Head (packed by ``nca_fast.kernels.pack.pack_pixel_shuffle``): ``DH > 0``:
    relu(t @ dw0 [CP, DH] + db0) @ dw1 [DH, NPAD] + db1, else t @ dw1 [CP, NPAD] + db1. Output
    n = k*R*R + ii*R + jj is pixel (k, i*R + ii, j*R + jj) (``F.pixel_shuffle`` order), NB per dot
    so that the [M, NB] result stays in registers. ``DHC`` (0: all of DH): the hidden layer in
    chunks of DHC units, recomputed for each block of NB outputs (its K is only CP): a whole [M, DH]
    hidden layer in "ieee" (a TF32 and a low part of both operands) outgrows the registers (hidden
    128 on sm_80: 13 KB of spills in the loop). A TF32 hidden layer enters the output dot as its
    accumulator left it, dw1's rows loaded to match (``operand.py``)."""
    chan = tl.arange(0, CP)
    M: tl.constexpr = t.shape[0]
    HCH: tl.constexpr = DHC if DHC > 0 else DH
    if DH > 0 and HCH == DH:
        hcol = tl.arange(0, DH)
        hdec = tl.dot(t.to(DOT_T), tl.load(dw0 + chan[:, None] * DH + hcol[None, :]), input_precision=PREC)
        hdec = tl.maximum(hdec + tl.load(db0 + hcol)[None, :], 0.0).to(DOT_T)
    Wo = W * R
    for n0 in tl.static_range(0, NPAD, NB):
        n = n0 + tl.arange(0, NB)
        if DH > 0:
            if HCH == DH:
                o = tl.dot(as_a_operand(hdec, M, DH), tl.load(dw1 + k_order(hcol, DOT_T)[:, None] * NPAD + n[None, :]),
                           input_precision=PREC)
            else:
                o = tl.zeros((t.shape[0], NB), tl.float32)
                for h0 in tl.static_range(0, DH, HCH):
                    hc = h0 + tl.arange(0, HCH)
                    hd = tl.dot(t.to(DOT_T), tl.load(dw0 + chan[:, None] * DH + hc[None, :]), input_precision=PREC)
                    hd = tl.maximum(hd + tl.load(db0 + hc)[None, :], 0.0).to(DOT_T)
                    o = tl.dot(as_a_operand(hd, M, HCH), tl.load(dw1 + k_order(hc, DOT_T)[:, None] * NPAD + n[None, :]),
                               o, input_precision=PREC)
        else:
            o = tl.dot(t.to(DOT_T), tl.load(dw1 + chan[:, None] * NPAD + n[None, :]), input_precision=PREC)
        o += tl.load(db1 + n)[None, :]
        k = n // (R * R)
        ii = (n % (R * R)) // R
        jj = n % R
        off = (b[:, None] * K + k[None, :]).to(tl.int64) * H * R * Wo + (i[:, None] * R + ii[None, :]) * Wo \
            + j[:, None] * R + jj[None, :]
        tl.store(img + off, o.to(img.dtype.element_ty), mask=valid[:, None] & (n < N)[None, :])
