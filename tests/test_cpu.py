"""The CPU fast path (nca_fast.cpu) against the reference step and the reference update mask."""
import multiprocessing
import threading

import pytest
import torch

from nca_fast import NCA, Filter, cpu, cpu_backward, growing_spec, reference, rng, texture_spec


def _params(spec, seed=0):
    return {k: v.detach() for k, v in NCA(spec, init_seed=seed).params().items()}


def _state(spec, B, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, spec.channels, H, W, generator=g) * 2 - 0.7
    if spec.alive_channel is not None:  # a mix of live and dead cells
        x[:, spec.alive_channel] = torch.rand(B, H, W, generator=g) * 0.3
    return x


def _close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.fixture(params=[1, 3], ids=["inline", "3threads"])
def threads(request, monkeypatch):
    """Run bands on the calling thread, or on a pool of 3 workers (whatever the machine has)."""
    monkeypatch.setattr(cpu, "THREADS", request.param)
    return request.param


SPECS = {
    "growing": growing_spec(),
    "texture": texture_spec(),  # circular padding, every clamp (no filter scale folding), no alive
    "replicate_alive": growing_spec(channels=6, hidden=20, padding="replicate", alive_channel=4),
    "circular_alive_clamped": growing_spec(channels=5, hidden=9, padding="circular",
                                           hidden_clamp=(0.0, 0.3), update_clamp=(-0.05, 0.05)),
    "no_bias_step_size": growing_spec(channels=4, hidden=8, hidden_bias=False, update_bias=False,
                                      step_size=0.37, state_clamp=(-0.5, 0.8)),
    # no identity (the band gets a slot outside the matmul), a zero filter, a non-separable one
    "zero_filter": growing_spec(channels=4, hidden=7, filters=(
        Filter.preset("laplacian"), Filter("zero", ((0, 0, 0),) * 3), Filter.preset("sobel_y", 0.3))),
    # a scaled identity after another filter, a second identity, a one-tap shifted filter, a
    # negative hidden clamp (relu+clamp folded), an alive threshold below the zero padding's 0
    "odd_filters": growing_spec(channels=4, hidden=6, alive_channel=0, alive_threshold=-0.05,
                                hidden_clamp=(-1.0, 0.2), filters=(
        Filter.preset("sobel_x", 0.7), Filter.preset("identity", 0.5), Filter.preset("identity"),
        Filter("shift", ((0, 0, 0), (0, 0, 0), (0, 0, -2.0))))),
    # the alive pool padded apart from the perception (Cells-to-Pixels growing models: circular / ignore)
    "alive_ignore_circular": growing_spec(channels=5, hidden=7, padding="circular", alive_padding="ignore"),
    "alive_circular_zeros": growing_spec(channels=5, hidden=7, padding="zeros", alive_padding="circular"),
    "alive_replicate_circular": growing_spec(channels=5, hidden=7, padding="circular", alive_padding="replicate",
                                             alive_threshold=-0.05),
    "clamped_identity": growing_spec(channels=4, hidden=5, padding="replicate", alive_channel=None,
                                     perception_clamp=(-0.3, 0.25),
                                     filters=(Filter.preset("identity"), Filter.preset("sobel_x"))),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 13, 7), (2, 1, 5), (1, 29, 31)])
@pytest.mark.parametrize("masked", [False, True])
def test_step_matches_reference(name, shape, masked, threads, monkeypatch):
    monkeypatch.setattr(cpu, "BAND_CELLS", 40)  # several bands, a partial last band
    spec = SPECS[name]
    B, H, W = shape
    x, params = _state(spec, B, H, W, seed=H), _params(spec, seed=W)
    mask = rng.update_mask(B, H, W, seed=3, step=1, fire_rate=0.5) if masked else None
    _close(cpu.step(x, params, spec, mask), reference.step(x, params, spec, mask))


@pytest.mark.parametrize("band_cells", [1, 7, 100000])
@pytest.mark.parametrize("padding", ["zeros", "circular", "replicate"])
def test_band_sizes(band_cells, padding, threads, monkeypatch):
    """One row per band (band smaller than a row), odd bands, and the whole grid in one band."""
    monkeypatch.setattr(cpu, "BAND_CELLS", band_cells)
    spec = growing_spec(padding=padding)
    x, params = _state(spec, 2, 11, 9), _params(spec)
    mask = rng.update_mask(2, 11, 9, seed=0, step=5, fire_rate=0.5)
    _close(cpu.step(x, params, spec, mask), reference.step(x, params, spec, mask))


def test_one_by_one_grid(threads):
    for padding in ("zeros", "circular", "replicate"):
        spec = growing_spec(channels=5, hidden=6, padding=padding)
        x, params = _state(spec, 2, 1, 1), _params(spec)
        _close(cpu.step(x, params, spec, None), reference.step(x, params, spec, None))


def test_alive_mask_of_grown_pattern(threads, monkeypatch):
    """Live cells in a dead grid: bands entirely dead, entirely alive, and mixed."""
    monkeypatch.setattr(cpu, "BAND_CELLS", 60)
    spec = growing_spec()
    x, params = torch.zeros(1, 16, 30, 20), _params(spec)
    x[:, 3:, 9:21, 4:15] = _state(spec, 1, 12, 11, seed=5)[:, 3:].abs() + 0.05
    mask = rng.update_mask(1, 30, 20, seed=1, step=2, fire_rate=0.5)
    for _ in range(3):
        y = cpu.step(x, params, spec, mask)
        _close(y, reference.step(x, params, spec, mask))
        x = y
    assert (x[:, 3] > 0.1).any() and (x == 0).all(1).any()


def test_out_is_filled_and_checked(threads, monkeypatch):
    monkeypatch.setattr(cpu, "BAND_CELLS", 50)
    spec = growing_spec()
    x, params = _state(spec, 2, 17, 12), _params(spec)
    mask = rng.update_mask(2, 17, 12, seed=0, step=0, fire_rate=0.5)
    out = torch.full_like(x, float("nan"))
    assert cpu.step(x, params, spec, mask, out=out) is out
    _close(out, reference.step(x, params, spec, mask))
    with pytest.raises(ValueError, match="shape"):
        cpu.step(x, params, spec, mask, out=torch.empty(2, 16, 17, 11))
    with pytest.raises(ValueError, match="contiguous"):
        cpu.step(x, params, spec, mask, out=torch.empty(2, 16, 12, 17).transpose(2, 3))
    with pytest.raises(ValueError, match="overlaps"):
        cpu.step(x, params, spec, mask, out=x)


def test_keep_is_filled_and_checked():
    """``keep=`` receives the alive mask the step applied; a wrong buffer, a model without an alive
    mask or a step autograd records (the reference, which fills nothing) is refused."""
    spec = growing_spec()
    x, params = _state(spec, 2, 11, 9), _params(spec)
    x[:, spec.alive_channel, :5] = 0.0  # (dead rows: cells the alive mask zeroes)
    mask = rng.update_mask(2, 11, 9, seed=0, step=0, fire_rate=0.5)
    keep = torch.ones(2, 11, 9, dtype=torch.bool)
    y = cpu.step(x, params, spec, mask, keep=keep)
    want = reference.alive_mask(x, spec) & reference.alive_mask(y, spec)
    assert torch.equal(keep, want[:, 0]) and not keep.all()
    for bad in (torch.ones(2, 11, 8, dtype=torch.bool), torch.ones(2, 11, 9),
                torch.ones(2, 9, 11, dtype=torch.bool).transpose(1, 2)):
        with pytest.raises(ValueError, match="keep must be a contiguous bool tensor of shape"):
            cpu.step(x, params, spec, mask, keep=bad)
    with pytest.raises(ValueError, match="no alive channel"):
        tex = texture_spec()
        cpu.step(_state(tex, 2, 11, 9), _params(tex), tex, None, keep=keep)
    with pytest.raises(ValueError, match="autograd"):
        cpu.step(x.requires_grad_(), params, spec, mask, keep=keep)


def test_buffers_reused_across_shapes(threads):
    spec = texture_spec()
    params = _params(spec)
    for B, H, W in [(1, 40, 40), (2, 9, 13), (1, 40, 40), (1, 3, 70), (1, 200, 41)]:
        x = _state(spec, B, H, W, seed=H * W)
        _close(cpu.step(x, params, spec, None), reference.step(x, params, spec, None))
    cpu.clear_buffers()
    x = _state(spec, 1, 9, 9)
    _close(cpu.step(x, params, spec, None), reference.step(x, params, spec, None))


def test_pool_keeps_callers_thread_count(monkeypatch):
    """Pinning the workers single-threaded must not change the thread count of the caller, or of
    threads started later."""
    monkeypatch.setattr(cpu, "BAND_CELLS", 30)
    before = torch.get_num_threads()
    for n in (2, 3):
        monkeypatch.setattr(cpu, "THREADS", n)
        spec = growing_spec(channels=4, hidden=5)
        x, params = _state(spec, 1, 20, 20), _params(spec)
        _close(cpu.step(x, params, spec, None), reference.step(x, params, spec, None))
        assert torch.get_num_threads() == before
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [before]


def test_does_not_modify_input_and_float64(threads):
    spec = growing_spec(channels=5, hidden=6)
    params = _params(spec)
    x = _state(spec, 1, 6, 6)
    x0 = x.clone()
    cpu.step(x, params, spec, None)
    assert torch.equal(x, x0)
    p64 = {k: v.double() for k, v in params.items()}
    torch.testing.assert_close(cpu.step(x.double(), p64, spec, None),
                               reference.step(x.double(), p64, spec, None))


def test_non_contiguous_input(threads, monkeypatch):
    monkeypatch.setattr(cpu, "BAND_CELLS", 30)
    spec = growing_spec(channels=4, hidden=5)
    x, params = _state(spec, 1, 11, 13), _params(spec)
    xt = x.transpose(2, 3)  # [1, 4, 13, 11], not contiguous
    mask = rng.update_mask(1, 11, 13, seed=0, step=0, fire_rate=0.5).transpose(2, 3)  # neither
    _close(cpu.step(xt, params, spec, mask), reference.step(xt, params, spec, mask))


def test_autograd_falls_back_to_reference(threads):
    """``cpu.step`` itself records nothing: under autograd it runs the reference (``cpu_backward.step``
    is the CPU path with a backward)."""
    spec = growing_spec(channels=4, hidden=6)
    params = {k: v.clone().requires_grad_() for k, v in _params(spec).items()}
    y = cpu.step(_state(spec, 1, 5, 5), params, spec, None)
    y.sum().backward()
    assert params["w1"].grad is not None


def _grads(step, x, params, gy):
    """``(y, gx, {name: grad})`` of ``step(x, params)`` for output gradient ``gy``."""
    x = x.clone().requires_grad_()
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    y = step(x, params)
    got = torch.autograd.grad(y, [x, *params.values()], gy)
    return y.detach(), got[0], dict(zip(params, got[1:]))


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 13, 7), (2, 1, 5)])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-4), (torch.float64, 1e-12, 1e-10)])
def test_backward_matches_reference(name, shape, dtype, atol, rtol, threads, monkeypatch):
    """The CPU path's backward against the reference's autograd: the state's and every weight's
    gradient, alive-masked, clamped, every padding, masked and not."""
    monkeypatch.setattr(cpu, "BAND_CELLS", 40)
    monkeypatch.setattr(cpu_backward, "MLP_CHUNK_CELLS", 7)  # several chunks, a partial last one
    spec = SPECS[name]
    B, H, W = shape
    x = _state(spec, B, H, W, seed=H).to(dtype)
    params = {k: v.to(dtype) for k, v in _params(spec, seed=W).items()}
    gy = torch.randn(B, spec.channels, H, W, generator=torch.Generator().manual_seed(W), dtype=dtype)
    for mask in (None, rng.update_mask(B, H, W, seed=3, step=1, fire_rate=0.5)):
        y, gx, gw = _grads(lambda x, p: cpu_backward.step(x, p, spec, mask), x, params, gy)
        y_ref, gx_ref, gw_ref = _grads(lambda x, p: reference.step(x, p, spec, mask), x, params, gy)
        torch.testing.assert_close(y, y_ref, atol=atol * 2, rtol=rtol)
        torch.testing.assert_close(gx, gx_ref, atol=atol, rtol=rtol)
        for k in params:  # (sums over every cell: a looser absolute tolerance)
            torch.testing.assert_close(gw[k], gw_ref[k], atol=atol * 10, rtol=rtol, msg=lambda m: f"{k}: {m}")
        gx2, gw2 = cpu_backward.step_vjp(x, params, spec, mask, gy)  # (the alive mask recomputed, not kept)
        torch.testing.assert_close(gx2, gx_ref, atol=atol, rtol=rtol)
        for k in params:
            torch.testing.assert_close(gw2[k], gw_ref[k], atol=atol * 10, rtol=rtol)


def test_backward_saves_one_state_and_is_reproducible(threads):
    """Autograd keeps the step's input, its update and alive masks and the weights (nothing of size
    hidden x cells), and the gradients are bit-identical run to run."""
    spec = growing_spec()
    x = _state(spec, 2, 12, 10)
    params = _params(spec)
    mask = rng.update_mask(2, 12, 10, seed=3, step=1, fire_rate=0.5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        runs = [_grads(lambda x, p: cpu_backward.step(x, p, spec, mask), x, params, torch.ones_like(x))
                for _ in range(2)]
    weights = sum(v.numel() for v in params.values())
    assert sum(saved) == 2 * (x.numel() + 2 * mask.numel() + weights)  # the state, mask and alive mask
    assert torch.equal(runs[0][1], runs[1][1]) and all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in params)


@pytest.mark.parametrize("backend, fits, checkpoint_every", [("cpu", True, None), ("cpu", True, 2),
                                                             ("auto", False, None)])
def test_rollout_trains_through_it(backend, fits, checkpoint_every, threads, monkeypatch):
    """A rollout trains through the CPU path with ``backend='cpu'``, and with ``'auto'`` when the
    reference's graph would not fit in memory: its gradients are the reference's (with and without
    checkpointed segments)."""
    monkeypatch.setattr(cpu, "BAND_CELLS", 64)
    monkeypatch.setattr(NCA, "_graph_fits", lambda self, *a: fits)
    calls = []
    step = cpu.step
    monkeypatch.setattr(cpu, "step", lambda *a, **k: calls.append(1) or step(*a, **k))
    model = NCA(growing_spec(channels=6, hidden=12), init_seed=2)
    x = _state(model.spec, 2, 11, 9)
    grads = {}
    for b in (backend, "reference"):
        model.zero_grad()
        y = model.rollout(x, 5, seed=7, backend=b, checkpoint_every=checkpoint_every)
        y[:, :4].square().mean().backward()
        grads[b] = {k: v.grad.clone() for k, v in model.named_parameters()}
    assert calls  # the CPU path ran
    for k, want in grads["reference"].items():
        torch.testing.assert_close(grads[backend][k], want, atol=1e-6, rtol=1e-4)


def test_double_backward_is_refused_not_wrong():
    """The backward is once-differentiable: a backward that records a graph for a gradient of the
    gradient raises at once (the reference has it), also through ``autograd.grad`` with
    ``allow_unused`` (a gradient penalty), where it would otherwise return None."""
    spec = growing_spec(channels=4, hidden=6)
    params = {n: t.requires_grad_() for n, t in _params(spec).items()}
    x = _state(spec, 1, 5, 5).requires_grad_()
    y = cpu_backward.step(cpu_backward.step(x, params, spec, None), params, spec, None)
    with pytest.raises(RuntimeError, match="once-differentiable.*backend='reference'"):
        torch.autograd.grad(y.square().sum(), list(params.values()), create_graph=True, allow_unused=True)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    gx, = torch.autograd.grad(y.square().sum(), x)  # (first order: as before)
    assert gx.shape == x.shape


def test_auto_trains_with_the_reference_while_its_graph_fits(monkeypatch):
    monkeypatch.setattr(cpu, "step", lambda *a, **k: pytest.fail("the CPU path ran"))
    model = NCA(growing_spec(channels=6, hidden=12), init_seed=2)
    model.rollout(_state(model.spec, 1, 6, 6), 3, seed=7).sum().backward()
    assert model.w1.grad is not None


def test_weights_that_require_grad_under_no_grad(threads, monkeypatch):
    """Worker threads do not inherit the caller's no_grad: parameters must still work there."""
    monkeypatch.setattr(cpu, "BAND_CELLS", 32)
    model = NCA(growing_spec(), init_seed=4)
    x = _state(model.spec, 1, 12, 10)
    with torch.no_grad():
        y = cpu.step(x, model.params(), model.spec, None)
        assert not y.requires_grad
        _close(y, reference.step(x, model.params(), model.spec, None))


def test_model_auto_uses_it(threads, monkeypatch):
    monkeypatch.setattr(cpu, "BAND_CELLS", 32)
    model = NCA(growing_spec(), init_seed=4)
    x = _state(model.spec, 1, 12, 10)
    calls = []
    step = cpu.step
    monkeypatch.setattr(cpu, "step", lambda *a, **k: calls.append(1) or step(*a, **k))
    with torch.no_grad():
        _close(model.step(x, seed=2, step=3, backend="auto"),
               model.step(x, seed=2, step=3, backend="reference"))
    assert calls


@pytest.mark.parametrize("padding, alive_padding", [("zeros", None), ("circular", None), ("replicate", None),
                                                    ("circular", "ignore"), ("zeros", "circular")])
def test_any_band_order(padding, alive_padding, monkeypatch):
    """Bands finished in any order (as threads may) read only their neighbours' finished rows,
    wrapping around with circular padding: here the unwritten rows are NaN, and the order shuffled."""
    monkeypatch.setattr(cpu, "BAND_CELLS", 24)
    monkeypatch.setattr(cpu, "THREADS", 1)
    init = cpu._Step.__init__
    order = torch.Generator().manual_seed(0)

    def shuffled(self, *a, **k):
        init(self, *a, **k)
        perm = torch.randperm(len(self.bands), generator=order).tolist()
        self.counter = iter(perm + [len(self.bands)])
        self.y_rowmax[:, slice(1, -1) if self.apad == "zeros" else slice(None)].fill_(float("nan"))
        self.out.fill_(float("nan"))
    monkeypatch.setattr(cpu._Step, "__init__", shuffled)
    spec = growing_spec(channels=5, hidden=6, padding=padding, alive_channel=4, alive_padding=alive_padding)
    params = _params(spec)
    for seed in range(6):
        x = _state(spec, 2, 14, 6, seed=seed)
        x[:, 4] *= 1.2
        mask = rng.update_mask(2, 14, 6, seed=seed, step=0, fire_rate=0.5)
        _close(cpu.step(x, params, spec, mask), reference.step(x, params, spec, mask))


def test_band_rows_and_pool():
    assert cpu._band_rows(1024, 1024) == cpu.BAND_CELLS // 1024
    assert cpu._band_rows(64, 64) == 64 and cpu._band_rows(3, 5000) == 3 and cpu._band_rows(2, 10**6) == 1
    n = cpu.POOL_BANDS_PER_THREAD * cpu.BAND_CELLS
    assert not cpu._on_pool(2 * n, 2) and cpu._on_pool(2 * n + 1, 2)  # (more than that many bands a thread)
    assert not cpu._on_pool(10**8, 1) and cpu._on_pool(3 * n + 1, 3)


def test_filters_compile_to_few_ops():
    """The growing model's bank: the band itself for the identity, Sobels as separable passes with
    a unit coefficient each (3 ops); the Laplacian as taps; with a perception clamp no rescaling."""
    spec = growing_spec(filters=(Filter.preset("identity"), Filter.preset("sobel_x"),
                                 Filter.preset("sobel_y"), Filter.preset("laplacian"),
                                 Filter("zero", ((0, 0, 0),) * 3)))
    slot, plans = cpu._compile_filters(spec.filters, True)
    assert slot == 0 and [p.kind for p in plans] == ["input", "separable", "separable", "taps", "zero"]
    for p in plans[1:3]:
        assert all(ps.terms[0][2] == 1.0 for ps in p.passes)
        assert sum(len(ps.terms) - 1 for ps in p.passes) == 3
    slot, plans = cpu._compile_filters(spec.filters, False)
    assert [p.scale for p in plans] == [1.0] * 5


def test_large_grid_on_huge_pages(threads):
    """An output big enough for the huge-page allocation (>= 8 MiB)."""
    spec = growing_spec(channels=8, hidden=16)
    x, params = _state(spec, 1, 260, 270), _params(spec)
    mask = rng.update_mask(1, 260, 270, seed=0, step=0, fire_rate=0.5)
    _close(cpu.step(x, params, spec, mask), reference.step(x, params, spec, mask))


def _step_in_child(q, x, params, spec, want):
    cpu.THREADS = 2
    cpu.BAND_CELLS = 64
    q.put(bool(torch.allclose(cpu.step(x, params, spec, None), want, atol=2e-5)))


def test_pool_after_fork(monkeypatch):
    """A forked child (DataLoader workers) has no pool threads: it must make its own, not hang.
    (The child does not run the reference: torch's OpenMP ops can hang after a fork.)"""
    monkeypatch.setattr(cpu, "THREADS", 2)
    monkeypatch.setattr(cpu, "BAND_CELLS", 64)
    spec = growing_spec(channels=4, hidden=5)
    x, params = _state(spec, 1, 30, 20), _params(spec)
    want = cpu.step(x, params, spec, None)  # the parent's pool exists
    _close(want, reference.step(x, params, spec, None))
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_step_in_child, args=(q, x, params, spec, want))
    p.start()
    try:
        assert q.get(timeout=30) is True
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_differentiable_rollout_beyond_memory_is_refused_before_it_runs(monkeypatch, backend):
    """Its checkpoints (one per segment) and one segment's graph are counted before any step runs;
    the message names the rollout and the largest grid that fits."""
    from nca_fast.utils import checks

    model = NCA(growing_spec(channels=4, hidden=8), init_seed=1)
    x = _state(model.spec, 2, 6, 7)
    state = x.numel() * 4
    monkeypatch.setattr(checks, "_available_bytes", lambda device: 50 * state)
    monkeypatch.setattr(cpu, "step", lambda *a, **k: pytest.fail("a step ran"))
    monkeypatch.setattr(reference, "step", lambda *a, **k: pytest.fail("a step ran"))
    with pytest.raises(MemoryError, match=f"a differentiable 10000-step rollout of 2x4x6x7 float32 states "
                                          f"\\({backend}; checkpoint segments of 100 steps\\).*cells fit"):
        model.rollout(x.requires_grad_(), 10000, backend=backend)
