"""The reference step (nca_fast.reference and NCA.step(backend='reference')) against the independent
NumPy twin in numpy_nca.py, in float64, for the growing and texture semantics and random specs."""
import numpy as np
import numpy_nca
import pytest
import torch

from nca_fast import NCA, Filter, NCASpec, growing_spec, reference, texture_spec

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-10
PADDINGS = ("zeros", "circular", "replicate")
SHAPES = [(2, 13, 21), (1, 1, 1), (1, 2, 3), (3, 5, 1)]  # (B, H, W)


def _random_filters(n, rng):
    return tuple(Filter(f"rand{i}", rng.normal(size=(3, 3)) * 0.5) for i in range(n))


# name -> spec builder(rng). Clamps sit inside the spread of the crafted values so each one bites.
CASES = {
    "growing": lambda rng: growing_spec(channels=16, hidden=32),
    "texture": lambda rng: texture_spec(channels=12, hidden=24),
    "one_filter_no_bias": lambda rng: NCASpec(
        channels=5, hidden=7, filters=_random_filters(1, rng), hidden_bias=False, update_bias=False,
        alive_channel=0, alive_threshold=0.05, perception_clamp=(-0.8, 0.9), hidden_clamp=(0.05, 0.5),
        update_clamp=(-0.3, 0.2), state_clamp=(-1.5, 1.4), step_size=0.75, render="rgb_affine"),
    "five_filters_hidden_bias": lambda rng: NCASpec(
        channels=4, hidden=9, filters=_random_filters(5, rng), update_bias=False, step_size=0.5),
    "two_filters_update_bias_no_alive": lambda rng: NCASpec(
        channels=3, hidden=6, filters=_random_filters(2, rng), hidden_bias=False, alive_channel=None,
        perception_clamp=(-1.0, 1.0), update_clamp=(-0.5, 0.5), state_clamp=(-1.0, 1.0),
        render="rgb_affine"),
}


def random_params(spec, rng, gain=2.0):
    """float32-representable float64 weights (NCA stores float32), large enough to hit the clamps."""
    fan_in = spec.perception_size
    w = {"w1": rng.normal(size=(spec.hidden, fan_in)) * gain / np.sqrt(fan_in),
         "w2": rng.normal(size=(spec.channels, spec.hidden)) * gain / np.sqrt(spec.hidden)}
    if spec.hidden_bias:
        w["b1"] = rng.normal(size=spec.hidden) * 0.5
    if spec.update_bias:
        w["b2"] = rng.normal(size=spec.channels) * 0.3
    return {k: v.astype(np.float32).astype(np.float64) for k, v in w.items()}


def crafted_state(spec, shape, rng):
    """Random state ``[B, C, H, W]``; the alive channel mixes live (>= 0.1) and dead cells, with a dead
    band so that whole neighbourhoods die."""
    B, H, W = shape
    x = rng.normal(size=(B, spec.channels, H, W)) * 1.5
    if spec.alive_channel is not None:
        live = rng.random((B, H, W)) < 0.3
        a = np.where(live, rng.uniform(0.1, 1.0, (B, H, W)), rng.uniform(-0.2, spec.alive_threshold, (B, H, W)))
        a[:, H // 3: H // 3 + 4, :] = -0.05  # a band of dead neighbourhoods
        x[:, spec.alive_channel] = a
    return x


def t64(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def assert_exercised(spec, parts):
    """Every clamp of the spec clipped something on both sides, and the alive mask killed live values."""
    for name, key in (("perception", "p_raw"), ("update", "dx_raw"), ("state", "y_raw")):
        r = getattr(spec, f"{name}_clamp")
        if r is not None:
            assert (parts[key] < r[0]).any() and (parts[key] > r[1]).any(), f"{name} clamp never clipped"
    if spec.hidden_clamp is not None:
        lo, hi = spec.hidden_clamp
        assert (parts["h_raw"] > hi).any(), "hidden clamp never clipped from above"
        if lo > 0:
            assert (parts["h_raw"] < lo).any(), "hidden clamp never clipped from below"
    if spec.alive_channel is not None:
        live = parts["alive"]
        assert live.any(), "no cell survived"
        assert (~live & (parts["y_raw"] != 0)).any(), "the alive mask never zeroed a nonzero cell"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("masked", [False, True], ids=["all_fire", "mask"])
def test_reference_step_matches_numpy(case, padding, shape, masked, np_rng):
    spec = CASES[case](np_rng).replace(padding=padding)
    params = random_params(spec, np_rng)
    x = crafted_state(spec, shape, np_rng)
    mask = np_rng.random((shape[0], 1) + shape[1:]) < 0.5 if masked else None

    parts = numpy_nca.step_parts(x, params, spec, mask)
    if shape[1] * shape[2] >= 100:  # big enough that every clamp and the alive mask must bite
        assert_exercised(spec, parts)
        assert mask is None or ((~mask).any() and mask.any())

    y = reference.step(t64(x), {k: t64(v) for k, v in params.items()}, spec,
                       None if mask is None else torch.as_tensor(mask))
    assert y.dtype == torch.float64 and y.shape == x.shape
    np.testing.assert_allclose(y.numpy(), parts["y"], rtol=0, atol=TOL)

    if masked:  # the module path: NCA.step with an explicit update mask
        model = NCA(spec, {k: torch.as_tensor(v) for k, v in params.items()})
        ym = model.step(t64(x), update_mask=torch.as_tensor(mask), backend="reference")
        np.testing.assert_allclose(ym.detach().numpy(), parts["y"], rtol=0, atol=TOL)


@pytest.mark.parametrize("case", ["growing", "texture", "five_filters_hidden_bias"])
@pytest.mark.parametrize("seed,step,origin,fire_rate", [
    (0, 0, (0, 0), None), (12345, 7, (3, -5), 0.3), (2**40 + 9, 2**32 - 1, (100, 2**31), 0.8)])
def test_random_mask_step_matches_numpy_philox(case, seed, step, origin, fire_rate, np_rng):
    spec = CASES[case](np_rng)
    params = random_params(spec, np_rng)
    B, H, W = 2, 11, 9
    x = crafted_state(spec, (B, H, W), np_rng)
    rate = spec.fire_rate if fire_rate is None else fire_rate
    mask = numpy_nca.fire_mask(B, H, W, seed=seed, step=step, fire_rate=rate, origin=origin)
    assert mask.any() and (~mask).any()
    want = numpy_nca.step(x, params, spec, mask)

    model = NCA(spec, {k: torch.as_tensor(v) for k, v in params.items()})
    got = model.step(t64(x), seed=seed, step=step, origin=origin, fire_rate=fire_rate, backend="reference")
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=TOL)
    # and the mask really mattered: all-fire gives something else
    assert not np.allclose(numpy_nca.step(x, params, spec, None), want, atol=1e-6)


def test_alive_before_and_after_are_anded():
    """A bias-only update: alpha -0.5 everywhere kills cells that were alive before but not after;
    alpha +0.5 does not revive cells that were dead before."""
    spec = growing_spec(channels=4, hidden=2)
    params = {"w1": np.zeros((2, 12)), "b1": np.zeros(2), "w2": np.zeros((4, 2)), "b2": np.zeros(4)}
    x = np.zeros((1, 4, 9, 9))
    x[0, 3, 2, 2] = 0.55  # alive before (0.55), dead after (0.05) -> its whole neighbourhood dies
    x[0, 3, 6, 6] = 1.0   # alive before and after (0.5)
    for sign in (-1, +1):
        params["b2"] = np.array([0.0, 0.0, 0.0, 0.5 * sign])
        want = numpy_nca.step(x, params, spec)
        got = reference.step(t64(x), {k: t64(v) for k, v in params.items()}, spec, None).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
        live = np.abs(got[0]).sum(0) > 0
        before = np.zeros((9, 9), bool)
        before[1:4, 1:4] = before[5:8, 5:8] = True  # 3x3 neighbourhoods of the two live cells
        if sign < 0:
            assert not live[1:4, 1:4].any()  # alive before, dead after
            assert live[5:8, 5:8].all() and live.sum() == 9
        else:
            assert (live == before).all()  # +0.5 made every alpha > 0.1 but only the old live ones stay
            np.testing.assert_allclose(got[0, 3][before], x[0, 3][before] + 0.5)


@pytest.mark.parametrize("padding", PADDINGS)
def test_alive_pool_border(padding):
    """With a negative threshold and alpha below it everywhere, no border cell may see a 0 from
    outside the grid (the zero-padding pool ignores outside cells); a live corner is seen across
    the border only under circular padding."""
    spec = growing_spec(channels=4, hidden=2, alive_threshold=-0.5, padding=padding)
    x = torch.full((1, 4, 5, 7), -1.0, dtype=torch.float64)
    assert not reference.alive_mask(x, spec).any()
    assert not numpy_nca.alive(x.numpy(), 3, -0.5, padding).any()
    x[0, 3, 0, 0] = 0.0  # one live corner: under wrap padding it is seen from the opposite corners
    got = reference.alive_mask(x, spec)[0, 0].numpy()
    np.testing.assert_array_equal(got, numpy_nca.alive(x.numpy(), 3, -0.5, padding)[0, 0])
    assert got[-1, -1] == (padding == "circular") and got[1, 1] and not got[2, 2]


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("alive_padding", ["ignore", "circular", "replicate"])
def test_alive_padding_apart_from_perception(padding, alive_padding, np_rng):
    """The alive pool pads by its own field: every pairing with the perception padding matches the
    NumPy twin, live cells on the border included."""
    spec = growing_spec(channels=5, hidden=6, padding=padding, alive_padding=alive_padding, alive_threshold=0.1)
    params = random_params(spec, np_rng)
    x = np_rng.standard_normal((2, 5, 6, 9)) * 0.3
    x[:, 3] = (np_rng.random((2, 6, 9)) < 0.3) * 0.3
    want = numpy_nca.step(x, params, spec)
    got = reference.step(t64(x), {k: t64(v) for k, v in params.items()}, spec, None)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    assert spec.alive_pool_padding == alive_padding
    assert growing_spec(padding=padding).alive_pool_padding == ("ignore" if padding == "zeros" else padding)


def test_comparison_detects_wrong_semantics(np_rng):
    """The NumPy twin is sensitive to the conventions it pins: interleaved order, the padding mode
    and transposed filters all change the result beyond the tolerance."""
    spec = CASES["growing"](np_rng)
    params = random_params(spec, np_rng)
    x = crafted_state(spec, (1, 13, 21), np_rng)
    want = numpy_nca.step(x, params, spec)
    C, F = spec.channels, spec.n_filters
    interleaved = dict(params, w1=params["w1"].reshape(-1, C, F).transpose(0, 2, 1).reshape(-1, C * F))
    transposed = spec.replace(filters=tuple(Filter(f.name, np.array(f.taps).T) for f in spec.filters))
    for s, p in ((spec, interleaved), (spec.replace(padding="circular"), params), (transposed, params)):
        got = reference.step(t64(x), {k: t64(v) for k, v in p.items()}, s, None).numpy()
        assert np.abs(got - want).max() > 1e-3


def test_float32_reference_close_to_numpy(np_rng):
    """float32 state through NCA.step: same result within float32 rounding."""
    spec = CASES["texture"](np_rng)
    params = random_params(spec, np_rng, gain=1.0)
    x = crafted_state(spec, (2, 13, 21), np_rng) * 0.5
    mask = np_rng.random((2, 1, 13, 21)) < 0.5
    model = NCA(spec, {k: torch.as_tensor(v) for k, v in params.items()})
    got = model.step(torch.as_tensor(x, dtype=torch.float32), update_mask=torch.as_tensor(mask),
                     backend="reference")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.detach().numpy(), numpy_nca.step(x, params, spec, mask), rtol=0, atol=1e-4)


@pytest.mark.parametrize("padding", ["zeros", "circular", "replicate"])
@pytest.mark.parametrize("H, W", [(1, 1), (1, 5), (4, 3), (7, 9)])
def test_perceive_vjp_is_autograds(padding, H, W):
    """The transposed perception (the fused backward's last stage) equals autograd's VJP of perceive."""
    spec = texture_spec(padding=padding)
    g = torch.Generator().manual_seed(H * 10 + W)
    x = torch.randn(2, spec.channels, H, W, generator=g, dtype=torch.float64)
    gp = torch.randn(2, spec.channels * spec.n_filters, H, W, generator=g, dtype=torch.float64)
    want = torch.func.vjp(lambda t: reference.perceive(t, spec), x)[1](gp)[0]
    torch.testing.assert_close(reference.perceive_vjp(gp, spec), want, atol=1e-12, rtol=0)
