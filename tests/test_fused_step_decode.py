"""The pixel-shuffle head fused into the step (models without alive masks) or into finalize (alive
models), against the reference rollout decoded by the reference decoder, under the interpreter."""
import pytest
import torch

import nca_fast as nf
from nca_fast.decoders import build_decoder, decode, lppn_spec, pixel_shuffle_spec, render_frames
from nca_fast.kernels.config import interpreting

pytestmark = pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by conftest.py without a GPU) or a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model_and_state(spec, seed, B=2, H=5, W=35):
    g = torch.Generator().manual_seed(seed)
    model = nf.NCA(spec, init_seed=seed).to(DEVICE).requires_grad_(False)
    model.fp32_matmul = "ieee"
    x = torch.randn(B, spec.channels, H, W, generator=g) * 0.3
    if spec.alive_channel is not None:
        x[:, spec.alive_channel] = (torch.rand(B, H, W, generator=g) < 0.3) * 0.3
    return model, x.to(DEVICE)


@pytest.mark.parametrize("spec", [nf.texture_spec(), nf.growing_spec(),
                                  nf.texture_spec(padding="replicate"), nf.growing_spec(padding="circular")],
                         ids=["texture-circular", "growing-zeros", "texture-replicate", "growing-circular"])
@pytest.mark.parametrize("scale, hidden, K", [(1, 0, 3), (3, 0, 4), (8, 32, 3)])
def test_fused_render_matches_reference(spec, scale, hidden, K):
    model, x = _model_and_state(spec, scale + hidden)
    dec = build_decoder(pixel_shuffle_spec(spec.channels, scale=scale, out_channels=K, hidden=hidden),
                        init_seed=scale).to(DEVICE)
    frames = [(k, img.clone()) for k, img in render_frames(model, dec, x, 3, seed=2, every=2, backend="triton")]
    assert [k for k, _ in frames] == [2]
    ref_state = model.rollout(x, 2, seed=2, backend="reference")
    ref = decode(dec, ref_state, backend="reference")
    assert frames[0][1].shape == (2, K, 5 * scale, 35 * scale)
    torch.testing.assert_close(frames[0][1], ref, atol=2e-5, rtol=2e-5)


def test_render_frames_uses_the_fused_pass_and_poisoned_frame_is_overwritten():
    spec = nf.texture_spec()
    model, x = _model_and_state(spec, 4, B=1, H=3, W=33)
    dec = build_decoder(pixel_shuffle_spec(spec.channels, scale=2), init_seed=1).to(DEVICE)
    r = model.fused_rollout(x.shape, x.dtype, steps=1, decoder=dec)
    r.image.fill_(float("nan"))
    r(x, seed=3, start_step=4)
    ref = decode(dec, model.step(x, seed=3, step=4, backend="reference"), backend="reference")
    torch.testing.assert_close(r.image, ref, atol=2e-5, rtol=2e-5)
    fused = [img.clone() for _, img in render_frames(model, dec, x, 2, seed=3, backend="triton")]
    plain = [img for _, img in render_frames(model, dec, x, 2, seed=3, backend="reference")]
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_fused_render_rejects_what_it_cannot_fuse():
    spec = nf.texture_spec()
    model, x = _model_and_state(spec, 5, B=1, H=3, W=3)
    with pytest.raises(ValueError, match="only pixel_shuffle"):
        model.fused_rollout(x.shape, x.dtype, 1, decoder=build_decoder(lppn_spec(12, scale=2)))
    with pytest.raises(ValueError, match="decoder takes 16 channels"):
        model.fused_rollout(x.shape, x.dtype, 1, decoder=build_decoder(pixel_shuffle_spec(16, scale=2)))
