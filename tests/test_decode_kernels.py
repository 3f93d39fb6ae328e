"""Fused decode kernels against the reference decoders under the Triton interpreter (odd sizes,
scales 1, 3, 8, both paddings) and the fast sine's accuracy. Their sm_80 / sm_90a compilation is in
test_kernels_compile.py (every configuration of nca_fast.kernels.catalogue)."""
import importlib
import os

import pytest
import torch

from nca_fast.decoders import build_decoder, decode, lppn_spec, pixel_shuffle_spec
from nca_fast.kernels.config import decode_problem


@pytest.fixture(scope="module")
def kernels():
    """nca_fast.kernels.decode with interpreted kernels (reloaded if another test module imported
    it before TRITON_INTERPRET was set)."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is set to something other than 1 and there is no GPU")
    import triton  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction

    from nca_fast.kernels import decode as K
    if os.environ.get("TRITON_INTERPRET") == "1" and not isinstance(K.lppn_kernel, InterpretedFunction):
        K = importlib.reload(K)
    return K


def _device():
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def test_fast_sin_max_error(kernels):
    import triton
    import triton.language as tl

    globals()["_fast_sin"] = kernels.fast_sin  # a jit function resolves callees in its globals

    @triton.jit
    def sin_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        tl.store(y_ptr + i, _fast_sin(tl.load(x_ptr + i, mask=m, other=0.0)), mask=m)  # noqa: F821

    x = torch.cat([torch.linspace(-4, 4, 20001), torch.linspace(-300, 300, 40001)]).to(_device())
    y = torch.empty_like(x)
    sin_kernel[(triton.cdiv(x.numel(), 8192),)](x, y, x.numel(), BLOCK=8192)
    err = (y.double() - torch.sin(x.double())).abs()
    # Stated accuracy: 4e-7 absolute on [-4, 4], 2e-6 on [-300, 300] (argument rounding dominates).
    assert err[:20001].max() < 4e-7, err[:20001].max()
    assert err.max() < 2e-6, err.max()


LPPN_CASES = [  # (scale, padding, frequencies, out_channels, hidden, layers, batch)
    (1, "circular", 0, 3, 32, 3, 2),
    (3, "replicate", 2, 9, 20, 2, 1),
    (3, "circular", 1, 4, 64, 1, 1),
    (8, "circular", 0, 3, 32, 3, 1),
    (8, "replicate", 3, 3, 16, 4, 1),
]


@pytest.mark.parametrize("scale,padding,freq,K,hidden,layers,B", LPPN_CASES)
def test_lppn_kernel_matches_reference(kernels, scale, padding, freq, K, hidden, layers, B):
    spec = lppn_spec(6, scale, K, hidden=hidden, layers=layers, padding=padding, frequencies=freq,
                     first_omega=12.0, hidden_omega=4.0)
    dec = build_decoder(spec, init_seed=scale + layers).to(_device())
    x = torch.randn(B, 6, 5, 7, device=_device())
    ref = dec(x)
    got = decode(dec, x, backend="triton")
    assert got.shape == (B, K, 5 * scale, 7 * scale) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_lppn_kernel_arbitrary_size_fp16_and_half_state(kernels):
    dec = build_decoder(lppn_spec(5, 3, 3, hidden=24, layers=2, frequencies=1), init_seed=7).to(_device())
    x = torch.randn(1, 5, 5, 7, device=_device())
    torch.testing.assert_close(decode(dec, x, backend="triton", size=(13, 9)), dec(x, (13, 9)),
                               rtol=1e-4, atol=1e-4)
    ref = dec(x)
    half = decode(dec, x, backend="triton", precision="fp16")
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, rtol=0, atol=2e-2)
    xh = x.half()
    torch.testing.assert_close(decode(dec, xh, backend="triton"), dec(xh), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("C,K,r,hidden", [(5, 3, 1, 0), (5, 3, 3, 0), (20, 4, 8, 24), (12, 3, 3, 128)])
def test_pixel_shuffle_kernel_matches_reference(kernels, C, K, r, hidden):
    dec = build_decoder(pixel_shuffle_spec(C, r, K, hidden), init_seed=r).to(_device())
    x = torch.randn(2, C, 5, 7, device=_device())
    ref = dec(x)
    torch.testing.assert_close(decode(dec, x, backend="triton"), ref, rtol=1e-4, atol=1e-4)
    half = decode(dec, x, backend="triton", precision="fp16")
    torch.testing.assert_close(half.float(), ref, rtol=0, atol=2e-2 * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("hidden", [64, 128])
def test_pixel_shuffle_kernel_before_sm90(kernels, monkeypatch, hidden):
    """What an A100 runs for an "ieee" head of 64+ hidden units (config.ps_decode_launch: 32 outputs a
    dot, the hidden layer in chunks of 64, recomputed per block of outputs): the reference's image."""
    from nca_fast.kernels import launch
    from nca_fast.kernels.config import head_config, ps_decode_launch

    spec = pixel_shuffle_spec(12, 8, 3, hidden)
    tile = ps_decode_launch(head_config(spec, 16), "ieee", (8, 0))
    assert (tile["NB"], tile["DHC"]) == (32, 64)
    assert ps_decode_launch(head_config(spec, 16), "ieee", (9, 0))["DHC"] == 0
    monkeypatch.setattr(launch, "capability", lambda device: (8, 0))
    dec = build_decoder(spec, init_seed=hidden).to(_device())
    x = torch.randn(2, 12, 3, 5, device=_device())
    torch.testing.assert_close(decode(dec, x, backend="triton"), dec(x), rtol=1e-4, atol=1e-4)


def test_packed_weights_follow_weight_updates(kernels):
    dec = build_decoder(pixel_shuffle_spec(4, 2, 3), init_seed=0).to(_device())
    x = torch.randn(1, 4, 3, 5, device=_device())
    decode(dec, x, backend="triton")
    with torch.no_grad():
        dec.w0.mul_(2.0)
    torch.testing.assert_close(decode(dec, x, backend="triton"), dec(x), rtol=1e-4, atol=1e-4)


def test_unavailable_reasons():
    x = torch.zeros(1, 4, 3, 3)
    big = build_decoder(lppn_spec(4, 2, 3, hidden=200, layers=1))
    assert "hidden width" in decode_problem(big.spec, x) or "need CUDA" in decode_problem(big.spec, x)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert "hidden width" in decode_problem(big.spec, x)
        with pytest.raises(RuntimeError, match="hidden width"):
            decode(big, x, backend="triton")


