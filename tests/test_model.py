"""The NCA module: weights, seeds, rollout/frames, images, NCASpec JSON, and every input check."""
import inspect
import json

import numpy as np
import pytest
import torch

from nca_fast import NCA, Filter, NCASpec, growing_spec, reference, texture_spec

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def model():
    return NCA(growing_spec(channels=8, hidden=16), init_seed=1)


@pytest.fixture
def x(model):
    return model.seed(batch=2, height=9, width=11)


def rand_state(model, B=2, H=9, W=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, model.spec.channels, H, W, generator=g) * 4 - 2).to(dtype)


# ---- weights -----------------------------------------------------------------------------------
def test_state_dict_round_trip(model):
    sd = model.state_dict()
    assert set(sd) == {"w1", "b1", "w2", "b2"} and sd["w1"].shape == (16, 24)
    other = NCA(model.spec, init_seed=2)
    x = rand_state(model)
    assert not torch.equal(other.step(x, backend="reference"), model.step(x, backend="reference"))
    other.load_state_dict(sd)
    assert torch.equal(other.step(x, backend="reference"), model.step(x, backend="reference"))
    again = NCA(model.spec, {k: v.clone() for k, v in sd.items()})
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), sd.values()))


def test_spec_without_biases_has_no_bias_parameters():
    m = NCA(growing_spec(channels=4, hidden=5, hidden_bias=False, update_bias=False))
    assert set(m.state_dict()) == {"w1", "w2"} and set(m.params()) == {"w1", "w2"}


def test_init_seed_is_deterministic():
    spec = texture_spec(channels=6, hidden=7)
    assert torch.equal(NCA(spec, init_seed=4).w1, NCA(spec, init_seed=4).w1)
    assert not torch.equal(NCA(spec, init_seed=4).w1, NCA(spec, init_seed=5).w1)


def test_to_float64_and_device(model):
    x = rand_state(model, dtype=torch.float64)
    y32 = model.step(x, seed=3, backend="reference")  # float32 weights, computed in float64
    m64 = model.to(torch.float64)
    assert m64 is model and all(p.dtype == torch.float64 for p in model.parameters())
    assert model.params(torch.float32)["w1"].dtype == torch.float32
    y64 = model.step(x, seed=3, backend="reference")
    assert y64.dtype == torch.float64 and torch.equal(y64, y32)  # weights were float32-exact
    assert model.to("cpu").w1.device.type == "cpu"
    assert model.seed(1, 3, 3).device.type == "cpu"


def test_constructor_errors():
    spec = growing_spec(channels=4, hidden=5)
    good = {"w1": torch.zeros(5, 12), "b1": torch.zeros(5), "w2": torch.zeros(4, 5), "b2": torch.zeros(4)}
    with pytest.raises(TypeError, match="spec must be an NCASpec"):
        NCA({"channels": 4})
    with pytest.raises(ValueError, match=r"missing \['b2'\]"):
        NCA(spec, {k: v for k, v in good.items() if k != "b2"})
    with pytest.raises(ValueError, match=r"unexpected \['b3'\]"):
        NCA(spec, dict(good, b3=torch.zeros(4)))
    with pytest.raises(ValueError, match=r"weight 'w1' has shape \(12, 5\)"):
        NCA(spec, dict(good, w1=torch.zeros(12, 5)))
    with pytest.raises(ValueError, match="'b1' must be finite floating point"):
        NCA(spec, dict(good, b1=torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.0])))
    with pytest.raises(ValueError, match="'w2' must be finite floating point"):
        NCA(spec, dict(good, w2=torch.zeros(4, 5, dtype=torch.int64)))


# ---- seeds -------------------------------------------------------------------------------------
@pytest.mark.parametrize("H,W", [(9, 11), (1, 1), (4, 7)])
def test_seed_center(H, W):
    m = NCA(growing_spec(channels=6, hidden=4))
    s = m.seed(batch=3, height=H, width=W, dtype=torch.float64)
    assert s.shape == (3, 6, H, W) and s.dtype == torch.float64
    want = torch.zeros_like(s)
    want[:, 3:, H // 2, W // 2] = 1
    assert torch.equal(s, want)
    s = NCA(growing_spec(channels=6, hidden=4, alive_channel=1)).seed(1, H, W)
    assert s[0, :, H // 2, W // 2].tolist() == [0, 1, 1, 1, 1, 1] and s.sum() == 5


def test_seed_zeros():
    m = NCA(texture_spec(channels=5, hidden=4))
    s = m.seed(2, 5, 3)
    assert s.shape == (2, 5, 5, 3) and s.dtype == torch.float32 and not s.any()


@pytest.mark.parametrize("kw,match", [
    (dict(batch=0), "batch must be a positive int"), (dict(height=-1), "height must be a positive int"),
    (dict(width=2.0), "width must be a positive int"), (dict(height="8"), "height must be a positive int")])
def test_seed_errors(model, kw, match):
    with pytest.raises(ValueError, match=match):
        model.seed(**kw)


# ---- rollout and frames --------------------------------------------------------------------------
def repeated_steps(model, x, n, seed, start=0):
    out = []
    for k in range(n):
        x = model.step(x, seed=seed, step=start + k, backend="reference").detach()
        out.append(x)
    return out


@pytest.mark.parametrize("steps,every", [(7, 3), (6, 1), (5, 5), (2, 4)])
def test_rollout_every_matches_repeated_steps(model, x, steps, every):
    seed, start = 2**33 + 1, 4
    want = repeated_steps(model, x, steps, seed, start)
    got = model.rollout(x, steps, seed=seed, start_step=start, every=every, backend="reference")
    T = steps // every
    assert got.shape == (T,) + tuple(x.shape) and got.requires_grad == (T > 0)  # (trainable weights: it records)
    for t in range(T):
        assert torch.equal(got[t], want[(t + 1) * every - 1])
    final = model.rollout(x, steps, seed=seed, start_step=start, backend="reference")
    assert final.shape == x.shape and torch.equal(final, want[-1])


@pytest.mark.parametrize("trainable", [True, False])
def test_rollout_zero_steps_returns_a_copy(model, x, trainable):
    model.requires_grad_(trainable)
    y = model.rollout(x, 0)
    assert torch.equal(y, x) and y is not x and y.data_ptr() != x.data_ptr()
    assert model.rollout(x, 0, every=2).shape == (0,) + tuple(x.shape)


def test_rollout_records_autograd_only_when_something_requires_grad(model, x):
    """Like any module call: trainable weights (or a state that requires grad) under grad mode record
    the graph; a frozen model, or torch.no_grad(), runs the inference path."""
    assert model.rollout(x, 2, backend="reference").requires_grad
    with torch.no_grad():
        assert not model.rollout(x, 2, backend="reference").requires_grad
    frozen = NCA(model.spec, model.params()).requires_grad_(False)
    assert not frozen.rollout(x, 2, backend="reference").requires_grad
    assert frozen.rollout(x.clone().requires_grad_(True), 2, backend="reference").requires_grad


def test_frames_streams(model, x):
    it = model.frames(x, 7, seed=9, start_step=2, every=2, backend="reference")
    assert inspect.isgenerator(it)
    k, first = next(it)  # lazy: one state at a time
    want = repeated_steps(model, x, 7, 9, 2)
    assert k == 2 and torch.equal(first, want[1])
    rest = [(k, s.clone()) for k, s in it]
    assert [k for k, _ in rest] == [4, 6]
    for k, s in rest:
        assert torch.equal(s, want[k - 1])


def test_frames_hold_no_autograd_graph(model, x):
    """A long stream must not keep every step's graph alive; step() itself stays differentiable."""
    assert not any(s.requires_grad for _, s in model.frames(x, 2, backend="reference"))
    assert model.step(x, backend="reference").requires_grad


def test_auto_backend_equals_reference_float32(model):
    x = rand_state(model, B=2, H=13, W=21)
    for step in range(3):
        a = model.step(x, seed=5, step=step, backend="auto")
        r = model.step(x, seed=5, step=step, backend="reference")
        torch.testing.assert_close(a, r, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.rollout(x, 10, seed=5), model.rollout(x, 10, seed=5, backend="reference"),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_states_compute_in_float32(model, dtype):
    x = rand_state(model, dtype=dtype)
    y = model.step(x, seed=1, backend="reference")
    assert y.dtype == dtype
    want = model.step(x.float(), seed=1, backend="reference").to(dtype)
    assert torch.equal(y, want)


def test_reference_step_function_matches_module(model):
    x = rand_state(model)
    mask = torch.rand(2, 1, 9, 11, generator=torch.Generator().manual_seed(0)) < 0.5
    got = model.step(x, update_mask=mask, backend="reference")
    torch.testing.assert_close(got, reference.step(x, model.params(), model.spec, mask), rtol=0, atol=0)


# ---- images ------------------------------------------------------------------------------------
def test_to_rgb_and_rgba_growing(model):
    x = rand_state(model, dtype=torch.float64)
    xn = x.numpy()
    a = np.clip(xn[:, 3:4], 0, 1)
    rgb = np.clip(1 - a + xn[:, :3], 0, 1)
    got = model.to_rgb(x)
    assert got.shape == (2, 3, 9, 11) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), rgb, rtol=0, atol=1e-15)
    rgba = model.to_rgba(x)
    assert rgba.shape == (2, 4, 9, 11)
    np.testing.assert_allclose(rgba.numpy(), np.concatenate([rgb, a], 1), rtol=0, atol=1e-15)
    assert 0 < rgb.mean() < 1 and (rgb == 0).any() and (rgb == 1).any()  # both ends clipped
    img = model.to_rgb(model.seed(1, 3, 3))[0]  # seed: black (rgb 0, alpha 1) on white (alpha 0)
    assert img[:, 1, 1].tolist() == [0, 0, 0] and img.sum() == 3 * 8


def test_to_rgb_texture():
    m = NCA(texture_spec(channels=6, hidden=4))
    x = rand_state(m, dtype=torch.float64)
    want = np.clip(x.numpy()[:, :3] * 0.5 + 0.5, 0, 1)
    np.testing.assert_allclose(m.to_rgb(x).numpy(), want, rtol=0, atol=1e-15)
    assert (want > 0).any() and (want < 1).any() and (want == 0).any() and (want == 1).any()
    with pytest.raises(ValueError, match="no alpha channel; use to_rgb"):
        m.to_rgba(x)


# ---- NCASpec JSON ------------------------------------------------------------------------------
SPECS = [growing_spec(), texture_spec(),
         NCASpec(channels=5, hidden=3, filters=(Filter("r", np.arange(9.0).reshape(3, 3) / 7),
                                                 Filter.preset("sobel_y", scale=0.25)),
                 padding="replicate", hidden_bias=False, alive_channel=None, perception_clamp=(-1, 2),
                 step_size=0.25, fire_rate=0.0, render="rgb_affine", name="custom")]


@pytest.mark.parametrize("spec", SPECS, ids=["growing", "texture", "custom"])
def test_spec_json_round_trip(spec):
    s = spec.to_json()
    back = NCASpec.from_json(s)
    assert back == spec and back.to_json() == s
    assert NCASpec.from_dict(json.loads(s)) == spec


def test_filter_presets():
    assert Filter.preset("sobel_x").taps == ((-0.125, 0, 0.125), (-0.25, 0, 0.25), (-0.125, 0, 0.125))
    assert Filter.preset("sobel_y").taps == ((-0.125, -0.25, -0.125), (0, 0, 0), (0.125, 0.25, 0.125))
    assert Filter.preset("laplacian").taps[1] == (0.25, -1.5, 0.25)
    assert Filter.preset("identity").taps == ((0, 0, 0), (0, 1, 0), (0, 0, 0))


@pytest.mark.parametrize("kw,match", [
    (dict(channels=0), "channels must be a positive int"),
    (dict(channels=4.0), "channels must be a positive int"),
    (dict(hidden=-1), "hidden must be a positive int"),
    (dict(filters=()), "at least one perception filter"),
    (dict(padding="reflect"), "padding must be one of"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(fire_rate=1.5), "fire_rate must be in"),
    (dict(alive_channel=16), "alive_channel 16 out of range"),
    (dict(render="rgb"), "render must be one of"),
    (dict(channels=3, alive_channel=None), "needs at least 4 channels"),
    (dict(seed_kind="noise"), "seed_kind must be one of"),
    (dict(state_clamp=(1.0, -1.0)), "state clamp must be"),
    (dict(filters=(Filter.preset("identity"), dict(name="bad", taps=((1, 2), (3, 4))))), "taps must be 3x3"),
    (dict(channels=True), "channels must be a positive int"),
    (dict(step_size="x"), "step_size must be a finite number"),
    (dict(step_size=float("nan")), "step_size must be a finite number"),
    (dict(alive_threshold=None), "alive_threshold must be a finite number"),
    (dict(hidden_bias="false"), "hidden_bias must be True or False"),
    (dict(alive_channel=True), "alive_channel must be an int or None"),
])
def test_spec_validation_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        growing_spec(**kw)


def test_spec_dict_and_filter_errors():
    with pytest.raises(ValueError, match=r"unknown NCASpec fields: \['colour'\]"):
        NCASpec.from_dict(dict(growing_spec().to_dict(), colour=1))
    with pytest.raises(ValueError, match="unknown filter preset 'sobel'"):
        Filter.preset("sobel")
    with pytest.raises(ValueError, match="taps must be finite"):
        Filter("nan", ((0, 0, 0), (0, float("nan"), 0), (0, 0, 0)))
    with pytest.raises(ValueError, match="taps must be 3x3"):
        Filter("big", np.zeros((3, 4)))


# ---- input checks of step / rollout / frames -------------------------------------------------------
STATE_ERRORS = [
    (lambda m, x: x.numpy(), TypeError, "state must be a torch.Tensor"),
    (lambda m, x: x[0], ValueError, r"state must be \[B, C, H, W\], got shape \(8, 9, 11\)"),
    (lambda m, x: x[:, :5], ValueError, "state has 5 channels, the model has 8"),
    (lambda m, x: x.to(torch.int32), ValueError, "state dtype torch.int32 not supported"),
    (lambda m, x: x[:, :, :0], ValueError, "empty dimension"),
]


@pytest.mark.parametrize("make,exc,match", STATE_ERRORS, ids=["numpy", "ndim", "channels", "dtype", "empty"])
def test_state_errors(model, x, make, exc, match):
    bad = make(model, x)
    for call in (lambda: model.step(bad), lambda: model.rollout(bad, 3), lambda: next(model.frames(bad, 3)),
                 lambda: model.to_rgb(bad)):
        with pytest.raises(exc, match=match):
            call()


def test_device_mismatch(model, x):
    on_meta = NCA(model.spec).to("meta")  # a second device on a CPU-only machine
    with pytest.raises(ValueError, match="state is on cpu but the model is on meta"):
        on_meta.step(x)
    with pytest.raises(ValueError, match="update_mask is on meta, state on cpu"):
        model.step(x, update_mask=torch.ones(2, 1, 9, 11, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("kw,match", [
    (dict(update_mask=torch.ones(2, 1, 9, 11)), "update_mask must be bool, got torch.float32"),
    (dict(update_mask=torch.ones(2, 9, 11, dtype=torch.bool)), r"update_mask must be \[B, 1, H, W\]"),
    (dict(update_mask=torch.ones(1, 1, 9, 11, dtype=torch.bool)), r"update_mask must be \[B, 1, H, W\]"),
    (dict(fire_rate=-0.1), "fire_rate must be in"), (dict(fire_rate=1.01), "fire_rate must be in"),
    (dict(seed=-1), "seed must be an int"), (dict(seed=2**64), "seed must be an int"),
    (dict(seed=1.0), "seed must be an int"), (dict(seed=True), "seed must be an int"),
    (dict(step=-1), "step must be an int"), (dict(step=2**32), "step must be an int"),
    (dict(step=3.0), "step must be an int"),
    (dict(origin=(1,)), "origin must be"), (dict(origin=(1.0, 2)), "origin must be"),
    (dict(origin=(1, 2, 3)), "origin must be"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_step_argument_errors(model, x, kw, match):
    with pytest.raises(ValueError, match=match):
        model.step(x, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(steps=-1), "steps must be a non-negative int"), (dict(steps=2.0), "steps must be a non-negative int"),
    (dict(every=0), "every must be a positive int"), (dict(seed=-3), "seed must be an int"),
    (dict(start_step=2**32), "step must be an int"), (dict(origin=(0, 0.5)), "origin must be"),
    (dict(backend="numpy"), "backend must be one of"),
])
def test_rollout_and_frames_argument_errors(model, x, kw, match):
    kw = dict(dict(steps=3), **kw)
    with pytest.raises(ValueError, match=match):
        model.rollout(x, **kw)
    with pytest.raises(ValueError, match=match):
        next(model.frames(x, **kw))


def test_triton_backend_unavailable_on_cpu(model, x, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # other test modules turn the interpreter on
    for call in (lambda: model.step(x, backend="triton"), lambda: model.rollout(x, 2, backend="triton")):
        with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
            call()


def test_auto_rollout_reuses_its_own_buffers_but_never_the_input():
    """On a CPU, frames() ping-pongs two buffers of its own: the caller's state is never written,
    and every yielded state equals the reference's."""
    model = NCA(growing_spec(), init_seed=3)
    x = model.seed(2, 19, 23)
    x[:, 3:] += 0.3 * torch.rand(2, 13, 19, 23, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    auto = [s.clone() for _, s in model.frames(x, 5, seed=2, backend="auto")]
    ref = [s.clone() for _, s in model.frames(x, 5, seed=2, backend="reference")]
    assert torch.equal(x, before)
    for a, r in zip(auto, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_packed_weights_follow_the_parameters():
    """The fused path's packed weights are repacked after an optimizer's or a no_grad in-place change;
    a write through ``.data`` (unversioned) needs ``forget_packed``."""
    model = NCA(growing_spec(channels=4, hidden=8), init_seed=1)
    first = model.packed_weights(torch.float32)
    assert model.packed_weights(torch.float32) is first
    with torch.no_grad():
        model.w2.add_(1.0)
    second = model.packed_weights(torch.float32)
    assert second is not first
    model.w2.data.zero_()
    assert model.packed_weights(torch.float32) is second  # the blind spot the docstring names
    model.forget_packed()
    assert not bool(model.packed_weights(torch.float32)[2].any())  # (w1, wb, w2, b2, scales)
