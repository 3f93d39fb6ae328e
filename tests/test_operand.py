"""operand.py's renaming of a dot's K axis: ``as_a_operand(h) @ w[k_order]`` is ``h @ w``, under the
Triton interpreter (what it costs on a GPU: test_kernels_compile.py's shuffle check)."""
import pytest
import torch
import triton
import triton.language as tl

from nca_fast.kernels.config import interpreting
from nca_fast.kernels.operand import as_a_operand, k_order

pytestmark = pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by conftest.py without a GPU) or a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _hidden_then_dot(x, w0, w1, out, M: tl.constexpr, C: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                     DOT_T: tl.constexpr):
    """out = relu(x @ w0) @ w1, the hidden layer handed over as operand.py hands it over."""
    m = tl.arange(0, M)
    c = tl.arange(0, C)
    k = tl.arange(0, K)
    n = tl.arange(0, N)
    h = tl.dot(tl.load(x + m[:, None] * C + c[None, :]).to(DOT_T), tl.load(w0 + c[:, None] * K + k[None, :]).to(DOT_T))
    h = tl.maximum(h, 0.0).to(DOT_T)
    w = tl.load(w1 + k_order(k, DOT_T)[:, None] * N + n[None, :]).to(DOT_T)
    tl.store(out + m[:, None] * N + n[None, :], tl.dot(as_a_operand(h, M, K), w))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
@pytest.mark.parametrize("K", [16, 32, 128])
def test_renamed_k_gives_the_same_product(dtype, atol, K):
    g = torch.Generator().manual_seed(K)
    M, C, N = 64, 16, 16
    x, w0, w1 = torch.randn(M, C, generator=g), torch.randn(C, K, generator=g) / 4, torch.randn(K, N, generator=g) / 8
    out = torch.full((M, N), float("nan"), device=DEVICE)
    dot_t = tl.float32 if dtype == torch.float32 else tl.float16
    _hidden_then_dot[(1,)](x.to(DEVICE), w0.to(DEVICE), w1.to(DEVICE), out, M, C, K, N, dot_t)
    h = torch.relu(x.to(dtype).double() @ w0.to(dtype).double()).to(dtype)
    want = h.double() @ w1.to(dtype).double()
    torch.testing.assert_close(out.cpu().double(), want, atol=atol, rtol=atol)


@triton.jit
def _order(out, K: tl.constexpr, DOT_T: tl.constexpr):
    k = tl.arange(0, K)
    tl.store(out + k, k_order(k, DOT_T))


def test_k_order_is_the_permutation_as_a_operand_applies():
    """Column 8j + 2t + e of the accumulator becomes column 8j + 4e + t of the operand (32-bit),
    16-bit keeps the order: k_order maps each operand column back to its accumulator column."""
    K = 32
    got = torch.empty(K, dtype=torch.int32, device=DEVICE)
    _order[(1,)](got, K, tl.float32)
    want = [8 * j + 2 * t + e for j in range(K // 8) for e in range(2) for t in range(4)]
    assert got.cpu().tolist() == want
    _order[(1,)](got, K, tl.float16)
    assert got.cpu().tolist() == list(range(K))
