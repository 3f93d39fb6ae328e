"""A 32-bit accumulator fed to the next ``tl.dot`` without moving it between threads.

An MLP's hidden layer is a dot's fp32 accumulator that becomes the A operand of the next dot. For
16-bit operands the two register layouts agree. For 32-bit (TF32) operands they do not: in the
accumulator of an ``mma``/``wgmma`` a thread of a quad (t = lane % 4) holds columns ``8j + 2t`` and
``8j + 2t + 1`` of every group of 8, while a TF32 A fragment wants columns ``8j + t`` and
``8j + t + 4`` of it. Triton converts with a shuffle and a select per value (growing model, hidden
128: 64 ``SHFL`` + 64 ``FSEL`` a thread a tile, ~8 of its ~70 warp-instructions a cell).

But a dot's K order is free: ``h @ w == h[:, p] @ w[p, :]`` for any permutation ``p``. ``as_a_operand``
renames the columns ``8j + 2t + e -> 8j + 4e + t`` (a reshape and a permute, which Triton lowers to
no instruction: every value stays in the register it is in), and the B operand's rows are loaded in
the matching order (``k_order``; the weights are staged once per program, so that costs nothing a
tile). The same product but for the order in which the tensor core sums K (the interpreter runs the
same renaming: ``tests/test_operand.py``); its cost per configuration: ``nca-fast kernels``.
"""
import triton
import triton.language as tl


@triton.jit
def k_order(k, DOT_T: tl.constexpr):
    """Row of the B operand that row ``k`` of a dot after ``as_a_operand`` multiplies (32-bit DOT_T;
    16-bit ones keep their order): ``8j + 4e + t -> 8j + 2t + e``."""
    if DOT_T == tl.float32:
        return (k // 8) * 8 + (k % 4) * 2 + (k // 4) % 2
    else:
        return k


@triton.jit
def as_a_operand(h, M: tl.constexpr, K: tl.constexpr):
    """``h [M, K]`` (K a multiple of 8) with its columns renamed for a TF32 A operand (see above);
    16-bit ``h`` unchanged."""
    if h.dtype == tl.float32:
        return h.reshape(M, K // 8, 4, 2).permute(0, 1, 3, 2).reshape(M, K)
    else:
        return h
