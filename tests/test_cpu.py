"""The CPU fast path (nca_fast.cpu) against the reference step and the reference update mask."""
import pytest
import torch

from nca_fast import NCA, Filter, cpu, growing_spec, reference, rng, texture_spec


def _params(spec, seed=0):
    return {k: v.detach() for k, v in NCA(spec, init_seed=seed).params().items()}


def _state(spec, B, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, spec.channels, H, W, generator=g) * 2 - 0.7
    if spec.alive_channel is not None:  # a mix of live and dead cells
        x[:, spec.alive_channel] = torch.rand(B, H, W, generator=g) * 0.3
    return x


SPECS = {
    "growing": growing_spec(),
    "texture": texture_spec(),  # circular padding, every clamp, no alive channel
    "replicate_alive": growing_spec(channels=6, hidden=20, padding="replicate", alive_channel=4),
    "circular_alive_clamped": growing_spec(channels=5, hidden=9, padding="circular",
                                           hidden_clamp=(0.0, 0.3), update_clamp=(-0.05, 0.05)),
    "no_bias_step_size": growing_spec(channels=4, hidden=8, hidden_bias=False, update_bias=False,
                                      step_size=0.37, state_clamp=(-0.5, 0.8)),
    "zero_filter": growing_spec(channels=4, hidden=7, filters=(
        Filter.preset("laplacian"), Filter("zero", ((0, 0, 0),) * 3), Filter.preset("sobel_y", 0.3))),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 13, 7), (2, 1, 5), (1, 29, 31)])
@pytest.mark.parametrize("masked", [False, True])
def test_step_matches_reference(name, shape, masked, monkeypatch):
    monkeypatch.setattr(cpu, "BAND_CELLS", 40)  # several bands, a partial last band
    spec = SPECS[name]
    B, H, W = shape
    x, params = _state(spec, B, H, W, seed=H), _params(spec, seed=W)
    mask = rng.update_mask(B, H, W, seed=3, step=1, fire_rate=0.5) if masked else None
    want = reference.step(x, params, spec, mask)
    got = cpu.step(x, params, spec, mask)
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("band_cells", [1, 7, 100000])
def test_band_sizes(band_cells, monkeypatch):
    """One row per band (band smaller than a row), odd bands, and the whole grid in one band."""
    monkeypatch.setattr(cpu, "BAND_CELLS", band_cells)
    spec = growing_spec()
    x, params = _state(spec, 2, 11, 9), _params(spec)
    mask = rng.update_mask(2, 11, 9, seed=0, step=5, fire_rate=0.5)
    torch.testing.assert_close(cpu.step(x, params, spec, mask), reference.step(x, params, spec, mask),
                               atol=2e-5, rtol=1e-5)


def test_buffers_reused_across_shapes():
    spec = texture_spec()
    params = _params(spec)
    for B, H, W in [(1, 40, 40), (2, 9, 13), (1, 40, 40), (1, 3, 70)]:
        x = _state(spec, B, H, W, seed=H * W)
        torch.testing.assert_close(cpu.step(x, params, spec, None), reference.step(x, params, spec, None),
                                   atol=2e-5, rtol=1e-5)
    cpu.clear_buffers()


def test_does_not_modify_input_and_float64():
    spec = growing_spec(channels=5, hidden=6)
    params = _params(spec)
    x = _state(spec, 1, 6, 6)
    x0 = x.clone()
    cpu.step(x, params, spec, None)
    assert torch.equal(x, x0)
    p64 = {k: v.double() for k, v in params.items()}
    torch.testing.assert_close(cpu.step(x.double(), p64, spec, None),
                               reference.step(x.double(), p64, spec, None))


def test_autograd_falls_back_to_reference():
    spec = growing_spec(channels=4, hidden=6)
    params = {k: v.clone().requires_grad_() for k, v in _params(spec).items()}
    y = cpu.step(_state(spec, 1, 5, 5), params, spec, None)
    y.sum().backward()
    assert params["w1"].grad is not None


def test_model_auto_uses_it():
    model = NCA(growing_spec(), init_seed=4)
    x = _state(model.spec, 1, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(model.step(x, seed=2, step=3, backend="auto"),
                                   model.step(x, seed=2, step=3, backend="reference"), atol=2e-5, rtol=1e-5)


