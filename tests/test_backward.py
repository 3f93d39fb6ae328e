"""Training through the fused path: the fused step's backward against the reference's autograd (under
the Triton interpreter: every padding mode, alive and not, clamps, explicit masks, fp32 and 16-bit),
bit-reproducible gradients, the reference fallback for wide models, checkpointed rollouts equal to
full ones, and a float64 gradcheck of the reference step."""
import os

import pytest
import torch

import nca_fast as nf
from nca_fast import rng
from nca_fast.kernels import op as kop
from nca_fast.spec import NCASpec

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="the fused path needs a GPU or the Triton interpreter")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _state(spec, g, B=2, H=7, W=9):
    x = torch.randn(B, spec.channels, H, W, generator=g) * 0.5
    if spec.alive_channel is not None:  # live and dead cells, so that both alive masks matter
        x[:, spec.alive_channel] = (torch.rand(B, H, W, generator=g) < 0.3) * torch.rand(B, H, W, generator=g)
    return x.to(DEVICE)


def _grads(model, x, gout, backend, dtype=torch.float32, **kw):
    """(y, dL/dx, {name: dL/dparam}) for L = sum(y * gout)."""
    model.zero_grad()
    xx = x.to(dtype, copy=True).requires_grad_(True)  # (a fresh leaf: x.grad would accumulate in place)
    y = model.step(xx, backend=backend, **kw)
    (y.float() * gout).sum().backward()
    return y.detach().float(), xx.grad.float(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _close(a, b, rel):
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= rel * scale, (float((a - b).abs().max()), scale)


CASES = {
    "growing-zeros": nf.growing_spec(),
    "growing-circular-alive-replicate": nf.growing_spec(padding="circular", alive_padding="replicate"),
    "growing-replicate-clamps": nf.growing_spec(padding="replicate", perception_clamp=(-1.0, 1.0),
                                                hidden_clamp=(0.0, 2.0), update_clamp=(-0.05, 0.05),
                                                state_clamp=(-1.5, 1.5)),
    "texture": nf.texture_spec(),
    "no-biases-4ch": NCASpec(channels=4, hidden=24, alive_channel=None, hidden_bias=False, update_bias=False,
                             padding="circular", step_size=0.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_backward_matches_reference_autograd(name):
    spec = CASES[name]
    g = torch.Generator().manual_seed(hash(name) % 1000)
    model = nf.NCA(spec, init_seed=3).to(DEVICE)
    model.fp32_matmul = "ieee"
    x = _state(spec, g)
    gout = torch.randn(x.shape, generator=g).to(DEVICE)
    yt, gxt, gpt = _grads(model, x, gout, "triton", seed=4, step=1)
    yr, gxr, gpr = _grads(model, x, gout, "reference", seed=4, step=1)
    _close(yt, yr, 1e-5)
    _close(gxt, gxr, 1e-5)
    for n in gpr:
        _close(gpt[n], gpr[n], 1e-5)
    assert float(gxr.abs().sum()) > 0 and all(float(v.abs().sum()) > 0 for v in gpr.values())


def test_explicit_update_mask_and_fire_rate():
    spec = nf.growing_spec()
    g = torch.Generator().manual_seed(2)
    model = nf.NCA(spec, init_seed=4).to(DEVICE)
    model.fp32_matmul = "ieee"
    x = _state(spec, g)
    gout = torch.randn(x.shape, generator=g).to(DEVICE)
    mask = (torch.rand(2, 1, 7, 9, generator=g) < 0.5).to(DEVICE)
    for kw in ({"update_mask": mask}, {"fire_rate": 1.0, "origin": (3, -5)}):
        got = _grads(model, x, gout, "triton", **kw)
        want = _grads(model, x, gout, "reference", **kw)
        for a, b in zip(got[:2], want[:2]):
            _close(a, b, 1e-5)
        for n in want[2]:
            _close(got[2][n], want[2][n], 1e-5)


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 5e-2), (torch.bfloat16, 5e-2)])
def test_16bit_states(dtype, rel):
    """16-bit forward, gradients in fp32 inside (returned in the state's dtype), against the reference
    autograd in fp32 on the same rounded state. Compared by norm: a hidden pre-activation within 16-bit
    rounding of zero flips its ReLU and moves that cell's whole contribution (a few of 126 cells here)."""
    spec = nf.texture_spec()
    g = torch.Generator().manual_seed(5)
    model = nf.NCA(spec, init_seed=5).to(DEVICE)
    x = _state(spec, g).to(dtype).float()
    gout = torch.randn(x.shape, generator=g).to(DEVICE)
    _, gxt, gpt = _grads(model, x, gout, "triton", dtype=dtype, seed=2)
    _, gxr, gpr = _grads(model, x, gout, "reference", seed=2)
    assert float((gxt - gxr).norm() / gxr.norm()) < rel / 5
    for n in gpr:
        assert float((gpt[n] - gpr[n]).norm() / gpr[n].norm()) < rel, n


def _growing_case(seed: int, B: int, H: int, W: int):
    """(model, x, gout): the growing model with random weights, a state and an incoming gradient."""
    spec = nf.growing_spec()
    g = torch.Generator().manual_seed(seed)
    model = nf.NCA(spec, init_seed=seed).to(DEVICE)
    x = _state(spec, g, B=B, H=H, W=W)
    return model, x, torch.randn(x.shape, generator=g).to(DEVICE)


def test_gradients_are_bit_identical_run_to_run():
    model, x, gout = _growing_case(6, B=2, H=11, W=13)
    a = _grads(model, x, gout, "triton", seed=1)
    b = _grads(model, x, gout, "triton", seed=1)
    assert torch.equal(a[1], b[1]) and all(torch.equal(a[2][n], b[2][n]) for n in a[2])


@pytest.mark.parametrize("name", ["growing-zeros", "texture"])
def test_many_tile_streams_match_one(name, monkeypatch):
    """A GPU's grid: several tile streams, each with a program per hidden chunk (and, with clamps, the
    update pass beside the MLP pass), against the interpreter's one stream; and NaN-poisoned outputs
    (every cell and every partial sum must be written)."""
    from nca_fast.kernels import launch
    spec = CASES[name]
    g = torch.Generator().manual_seed(8)
    model = nf.NCA(spec, init_seed=8).to(DEVICE)
    x = _state(spec, g, B=3, H=9, W=11)
    gout = torch.randn(x.shape, generator=g).to(DEVICE)
    one = _grads(model, x, gout, "triton", seed=2)
    real_empty = torch.empty

    def poisoned(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(launch, "grid_programs", lambda n_tiles, device: 24)  # (5 and 4 tile streams)
    monkeypatch.setattr(launch.torch, "empty", poisoned)
    many = _grads(model, x, gout, "triton", seed=2)
    _close(many[1], one[1], 1e-5)
    for n in one[2]:
        _close(many[2][n], one[2][n], 1e-5)


def test_batches_beyond_32_bit_indexing_run_in_slices(monkeypatch):
    """A batch whose perception gradients exceed 32-bit indexing runs in slices of whole images (the
    masks keyed on each image's global batch index), with the gradients of one launch; an image that
    alone exceeds it is refused with the reason."""
    model, x, gout = _growing_case(9, B=3, H=5, W=6)
    whole = _grads(model, x, gout, "triton", seed=4)
    monkeypatch.setattr(kop, "INT32_MAX", 2 * 5 * 6 * 3 * 16)  # two images a launch: [0, 2), [2, 3)
    sliced = _grads(model, x, gout, "triton", seed=4)
    _close(sliced[1], whole[1], 1e-6)
    for n in whole[2]:
        _close(sliced[2][n], whole[2][n], 1e-5)
    monkeypatch.setattr(kop, "INT32_MAX", 5 * 6 * 3 * 16 - 1)
    with pytest.raises(ValueError, match="32 bits: a 5x6 image"):
        _grads(model, x, gout, "triton", seed=4)
    with pytest.raises(ValueError, match="32 bits: a 5x6 image"):  # a rollout: before its first step
        model.rollout(x.clone().requires_grad_(True), 2, backend="triton")


@pytest.mark.parametrize("padding", ["zeros", "circular", "replicate"])
@pytest.mark.parametrize("H, W", [(1, 1), (2, 5), (7, 3)])
def test_transposed_perception_kernel_matches_the_reference(padding, H, W):
    """The fused transposed perception (slabs summed, padding folded, added into the residual
    gradient) against ``reference.perceive_vjp``: every padding mode, grids of 1 and 2 cells a side,
    NaN in the slabs' padding channels (never written by the backward, so never read)."""
    from nca_fast.kernels.config import filter_scales, step_config
    from nca_fast.kernels.launch import launch_perceive_vjp
    from nca_fast.reference import perceive_vjp
    g = torch.Generator().manual_seed(H * 10 + W)
    for spec in (nf.growing_spec(channels=5, padding=padding), nf.texture_spec(padding=padding)):
        cfg = step_config(spec, "tf32")
        B, C, F, CP = 2, spec.channels, spec.n_filters, cfg.CP
        slabs = torch.randn(3, B, H, W, F, CP, generator=g, dtype=torch.float64)
        slabs[..., C:] = float("nan")
        gy = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
        want = gy + perceive_vjp(slabs.sum(0)[..., :C].permute(0, 3, 4, 1, 2).reshape(B, F * C, H, W), spec)
        fscale = torch.tensor(filter_scales(spec), dtype=torch.float32)
        got = launch_perceive_vjp(cfg, slabs.float().reshape(3, B, H, W, F * CP).to(DEVICE),
                                  gy.float().to(DEVICE).contiguous(memory_format=torch.channels_last),
                                  fscale.to(DEVICE))
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=1e-5)


def test_wide_models_fall_back_to_the_reference_backward(monkeypatch):
    """32 channels: beyond the fused backward's reach; the op's backward recomputes through the reference."""
    spec = nf.growing_spec(channels=32, hidden=64)
    g = torch.Generator().manual_seed(7)
    model = nf.NCA(spec, init_seed=7).to(DEVICE)
    model.fp32_matmul = "ieee"
    x = _state(spec, g)
    gout = torch.randn(x.shape, generator=g).to(DEVICE)
    used = []
    monkeypatch.setattr(kop, "_reference_backward", lambda *a: used.append(1) or REF(*a))
    got = _grads(model, x, gout, "triton", seed=3)
    want = _grads(model, x, gout, "reference", seed=3)
    assert used
    _close(got[1], want[1], 1e-5)
    for n in want[2]:
        _close(got[2][n], want[2][n], 1e-5)


REF = kop._reference_backward


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_checkpointed_rollout_equals_the_full_one(backend):
    """A rollout's gradients do not depend on how it is cut into checkpointed segments (bit for bit),
    and on the fused path they match the reference's."""
    spec = nf.growing_spec()
    g = torch.Generator().manual_seed(8)
    model = nf.NCA(spec, init_seed=8).to(DEVICE)
    model.fp32_matmul = "ieee"
    x = _state(spec, g, B=1, H=8, W=8)
    x[:, 3:, 3:5, 3:5] = 1.0

    def run(every, be=backend):
        model.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = model.rollout(xx, 6, seed=2, backend=be, checkpoint_every=every)
        y[:, :4].square().sum().backward()
        return y.detach(), xx.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    full, seg2, seg4 = run(6), run(2), run(4)
    for other in (seg2, seg4):
        assert torch.equal(other[0], full[0]) and torch.equal(other[1], full[1])
        assert all(torch.equal(other[2][n], full[2][n]) for n in full[2])
    if backend == "triton":
        ref = run(3, "reference")
        _close(full[1], ref[1], 1e-4)
        for n in ref[2]:
            _close(full[2][n], ref[2][n], 1e-4)


def _rollout_grads(model, x, w, backend, dtype=torch.float32, per_step=False):
    """(states after steps 2, 4, 6; dL/dx; {name: dL/dparam}) of L = sum(states * w), from
    ``model.rollout(every=2)`` or from ``model.step`` six times."""
    model.zero_grad()
    xx = x.to(dtype, copy=True).requires_grad_(True)  # (a fresh leaf: x.grad would accumulate in place)
    if per_step:
        y, kept = xx, []
        for k in range(6):
            y = model.step(y, seed=3, step=k, backend=backend)
            kept += [y] if k % 2 else []
        frames = torch.stack(kept)
    else:
        frames = model.rollout(xx, 6, seed=3, every=2, backend=backend)
    (frames.float() * w).sum().backward()
    return frames.detach().float(), xx.grad.float(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["growing-circular-alive-replicate", "growing-replicate-clamps", "texture"])
def test_fused_rollout_is_one_node_matching_the_reference(name, monkeypatch):
    """A differentiable fused rollout is one autograd node whose gradients (kept states in the loss,
    buffers NaN-poisoned) match the reference's autograd and the fused op stepped six times."""
    from nca_fast.kernels import launch
    spec = CASES[name]
    g = torch.Generator().manual_seed(11)
    model = nf.NCA(spec, init_seed=11).to(DEVICE)
    model.fp32_matmul = "ieee"
    x = _state(spec, g, B=2, H=7, W=9)
    w = torch.randn((3,) + tuple(x.shape), generator=g).to(DEVICE)
    ref = _rollout_grads(model, x, w, "reference")
    op = _rollout_grads(model, x, w, "triton", per_step=True)
    real_empty = torch.empty
    monkeypatch.setattr(launch.torch, "empty", lambda *a, **k: (lambda t: t.fill_(float("nan"))
                                                                if t.is_floating_point() else t)(real_empty(*a, **k)))
    fused = _rollout_grads(model, x, w, "triton")
    xx = x.clone().requires_grad_(True)
    node = model.rollout(xx, 6, seed=3, every=2, backend="triton").grad_fn
    assert type(node).__name__ == "_FusedRolloutFnBackward" and node.next_functions[0][0].variable is xx
    for got in (fused, op):
        _close(got[0], ref[0], 1e-5)
        _close(got[1], ref[1], 1e-4)
        for n in ref[2]:
            _close(got[2][n], ref[2][n], 1e-4)
    assert float(ref[1].abs().sum()) > 0 and all(float(v.abs().sum()) > 0 for v in ref[2].values())


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_16bit_fused_rollout(dtype, rel):
    """A 16-bit fused rollout (gradients kept in fp32 between its steps) against the reference's fp32
    autograd from the same rounded state, by norm (ReLUs within rounding of zero flip)."""
    spec = nf.texture_spec()
    g = torch.Generator().manual_seed(12)
    model = nf.NCA(spec, init_seed=12).to(DEVICE)
    x = _state(spec, g).to(dtype).float()
    w = torch.randn((3,) + tuple(x.shape), generator=g).to(DEVICE)
    _, gxt, gpt = _rollout_grads(model, x, w, "triton", dtype=dtype)
    _, gxr, gpr = _rollout_grads(model, x, w, "reference")
    assert float((gxt - gxr).norm() / gxr.norm()) < rel / 5
    for n in gpr:
        assert float((gpt[n] - gpr[n]).norm() / gpr[n].norm()) < rel, n


def test_captured_training_rollouts_match_uncaptured(monkeypatch):
    """The CUDA-graph path of differentiable rollouts with a recorder for CUDA graphs: a replay re-runs
    the recorded launches with allocation forbidden (a graph's pointers are fixed), each rollout length
    and segmentation is captured once into buffers that grow without moving, and training iterations
    (new weights, seeds and lengths) and two interleaved rollouts (two forwards, then both backwards)
    give the uncaptured path's gradients bit for bit."""
    from nca_fast.kernels import rollout_grad as rg
    recorded = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn
            self.buffers = None  # the rollout's buffers when it was captured
            recorded.append(self)

        def replay(self):
            def refuse(*a, **k):
                raise AssertionError("a replay allocated")
            r = rg._GRAPHED[model]
            assert {t.data_ptr() for t in self.buffers} <= {t.data_ptr() for t in r.tensors()}, "a buffer moved"
            with monkeypatch.context() as m:
                for name in ("empty", "empty_like", "zeros", "zeros_like", "tensor", "empty_strided"):
                    m.setattr(torch, name, refuse)
                self.fn()

    real_capture = rg._Rollout.capture

    def capture(self, plan):
        real_capture(self, plan)
        for rec in recorded[-2:]:
            rec.buffers = list(self.tensors())

    spec = CASES["growing-replicate-clamps"]
    g = torch.Generator().manual_seed(13)
    model = nf.NCA(spec, init_seed=13).to(DEVICE)
    x = _state(spec, g, B=2, H=6, W=7)
    w = torch.randn((3,) + tuple(x.shape), generator=g).to(DEVICE)

    def iteration(k, backward=True):  # rollouts of 4 and 6 steps (checkpointed, or not) share buffers
        xx = x.clone().requires_grad_(True)
        frames = model.rollout(xx, 4 + 2 * (k % 2), seed=k, every=2, backend="triton",
                               checkpoint_every=3 if k == 7 else None)
        loss = (frames.float() * w[:len(frames)]).sum()
        return (xx, loss) if not backward else (loss.backward(), xx.grad)[1]

    def train(captured):
        monkeypatch.setattr(rg, "use_graphs", lambda t: captured)
        monkeypatch.setattr(rg, "cuda_graph", Recorder)
        monkeypatch.setattr(rg._Rollout, "capture", capture)
        out, m = [], nf.NCA(spec, init_seed=13).to(DEVICE)
        model.load_state_dict(m.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for k in range(3):
            opt.zero_grad()
            out += [iteration(k)] + [p.grad.clone() for p in model.parameters()]
            opt.step()
        a, b = iteration(7, False), iteration(8, False)  # two rollouts' graphs alive at once
        model.zero_grad()
        b[1].backward()
        a[1].backward()
        return out + [a[0].grad, b[0].grad] + [p.grad.clone() for p in model.parameters()]

    plain = train(False)
    assert not recorded and rg.held_bytes(model) == 0
    captured = train(True)
    assert len(recorded) == 6  # a forward and a backward graph for each (steps, segments): 4, 6, 6 in 3
    assert rg.held_bytes(model) >= 8 * x.numel() * 4  # (states, kept states, gradients: counted as free)
    assert all(torch.equal(p, c) for p, c in zip(plain, captured))


def test_a_failed_capture_falls_back_to_plain_launches(monkeypatch):
    """A CUDA-graph capture that fails warns once and the model launches its kernels from then on, with
    the same gradients."""
    from nca_fast.kernels import rollout_grad as rg
    model, x, _ = _growing_case(15, B=1, H=5, W=6)

    def grads():
        model.zero_grad()
        xx = x.clone().requires_grad_(True)
        model.rollout(xx, 2, seed=1, backend="triton")[:, :4].sum().backward()
        return [xx.grad] + [p.grad.clone() for p in model.parameters()]

    plain = grads()
    calls = []

    def broken(fn):
        calls.append(fn)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(rg, "use_graphs", lambda t: True)
    monkeypatch.setattr(rg, "cuda_graph", broken)
    with pytest.warns(RuntimeWarning, match="capturing a rollout's CUDA graphs failed"):
        first = grads()
    second = grads()
    assert len(calls) == 1 and not rg.captured(model)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(plain, first, second))


def test_a_second_backward_through_a_rollout_node(monkeypatch):
    """``backward(retain_graph=True)`` twice: the second runs the rollout's forward again (its buffers
    went with the first) and gives the same gradients; with the graphs' shared buffers too."""
    from nca_fast.kernels import rollout_grad as rg
    model, x, _ = _growing_case(18, B=1, H=5, W=6)
    for captured in (False, True):
        monkeypatch.setattr(rg, "use_graphs", lambda t, c=captured: c)
        monkeypatch.setattr(rg, "cuda_graph", lambda fn: type("G", (), {"replay": staticmethod(fn)})())
        xx = x.clone().requires_grad_(True)
        loss = model.rollout(xx, 3, seed=5, backend="triton", checkpoint_every=2)[:, :4].square().sum()
        grads = []
        for _ in range(2):
            model.zero_grad()
            xx.grad = None
            loss.backward(retain_graph=True)
            grads.append([xx.grad] + [p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_backward_launcher_refuses_what_its_kernel_cannot_take():
    """``launch_step_backward`` names the problem before launching: more images than its scratch, a
    16-bit gradient, and gy in place of g (a stream's chunk programs read g after chunk 0 wrote gy)."""
    from nca_fast.kernels import launch
    from nca_fast.kernels.config import step_config
    model, x, _ = _growing_case(19, B=2, H=4, W=5)
    cfg = step_config(model.spec, "tf32")
    x = x.contiguous(memory_format=torch.channels_last)
    g = torch.zeros_like(x)
    bufs = launch.backward_buffers(cfg, (1,) + tuple(x.shape[1:]), x.device)
    weights = model.packed_weights(x.dtype, grad=True)
    ctr = launch.counter_tensor(0, 0, x.device)
    for args, match in (((x, g, torch.zeros_like(g), bufs), "2 images, scratch for 1"),
                        ((x[:1], g[:1].half(), torch.zeros_like(g[:1]), bufs), "takes fp32 gradients"),
                        ((x[:1], g[:1], g[:1], bufs), "gy may not be g")):
        xx, gg, gy, b = args
        with pytest.raises(ValueError, match=match):
            launch.launch_step_backward(cfg, model.spec, weights, xx, None, gg, gy, b, ctr, fire_rate=0.5)


def test_a_rollout_never_differentiated_is_freed():
    """A differentiable rollout whose backward never runs leaves nothing behind (its outputs are not
    held by its own node's context: a reference cycle through C++ that no collector frees)."""
    import gc
    import weakref
    model, x, _ = _growing_case(16, B=1, H=5, W=6)
    y = model.rollout(x.clone().requires_grad_(True), 2, every=1, backend="triton")
    ref = weakref.ref(y)
    del y
    gc.collect()
    assert ref() is None


def test_a_rollout_beyond_memory_is_refused_before_it_starts(monkeypatch):
    """A differentiable fused rollout whose buffers cannot fit says so before any step runs."""
    from nca_fast.kernels import rollout_grad as rg
    from nca_fast.kernels.config import step_config
    from nca_fast.utils import checks
    model, x, _ = _growing_case(17, B=2, H=6, W=7)
    plan = rg.RolloutPlan(model.spec, step_config(model.spec, "tf32"), "tf32", tuple(x.shape), x.dtype,
                          x.device, 9, 3, (0, 0), None)
    need = rg.rollout_bytes(plan)
    assert need >= (3 + 2 + 1) * x.numel() * 4  # (3 checkpoints, 2 inner states, the output at least)
    monkeypatch.setattr(checks, "_available_bytes", lambda device: need // 2)
    monkeypatch.setattr(rg, "launch_step", None)  # (nothing may run)
    with pytest.raises(MemoryError, match="a differentiable 9-step rollout of 2x16x6x7 float32 states"):
        model.rollout(x.clone().requires_grad_(True), 9, backend="triton", checkpoint_every=3)


def test_differentiable_rollout_under_torch_compile():
    """Traced by torch.compile (fullgraph), a differentiable fused rollout runs the op step by step
    (the rollout node is not traceable) with the rollout node's gradients."""
    model, x, _ = _growing_case(14, B=1, H=6, W=7)
    model.fp32_matmul = "ieee"

    def grads(f):
        model.zero_grad()
        xx = x.clone().requires_grad_(True)
        f(xx)[:, :4].square().sum().backward()
        return [xx.grad] + [p.grad.clone() for p in model.parameters()]

    def f(xx):
        return model.rollout(xx, 3, seed=1, backend="triton")

    eager, compiled = grads(f), grads(torch.compile(f, backend="eager", fullgraph=True))
    for a, b in zip(compiled, eager):
        _close(a, b, 1e-6)


def test_rollout_every_keeps_the_graph():
    spec = nf.texture_spec()
    model = nf.NCA(spec, init_seed=9).to(DEVICE)
    x = (torch.rand(1, spec.channels, 6, 6) - 0.5).to(DEVICE)
    frames = model.rollout(x, 4, every=2, backend="triton", checkpoint_every=3)
    assert frames.shape == (2, 1, spec.channels, 6, 6) and frames.requires_grad
    frames.sum().backward()
    assert model.w1.grad is not None and model.w1.grad.abs().sum() > 0


def test_reference_step_gradcheck_float64():
    spec = NCASpec(channels=4, hidden=6, padding="circular", hidden_clamp=(0.0, 3.0))
    model = nf.NCA(spec, init_seed=1).double()
    x = (torch.rand(1, 4, 4, 5, dtype=torch.float64) * 0.5 + 0.1).requires_grad_(True)
    mask = rng.update_mask(1, 4, 5, seed=0, step=0, fire_rate=0.5)
    params = tuple(model.parameters())

    def f(xx, *ps):
        return nf.reference.step(xx, dict(zip(model.spec.parameter_shapes(), ps)), spec, mask)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["pixel_shuffle", "lppn"])
def test_fused_decode_trains_with_the_nca(kind):
    """A rollout and a fused decode in one graph: the NCA's and the decoder's gradients match the
    reference path's."""
    from nca_fast.decoders import build_decoder, decode, lppn_spec, pixel_shuffle_spec

    spec = nf.texture_spec()
    dspec = (pixel_shuffle_spec(spec.channels, scale=3, out_channels=3, hidden=16) if kind == "pixel_shuffle"
             else lppn_spec(spec.channels, scale=3, out_channels=3, hidden=16, layers=2))
    model = nf.NCA(spec, init_seed=10).to(DEVICE)
    model.fp32_matmul = "ieee"
    dec = build_decoder(dspec, init_seed=11).to(DEVICE)
    x = (torch.rand(1, spec.channels, 5, 7, generator=torch.Generator().manual_seed(12)) - 0.5).to(DEVICE)

    def grads(backend):
        model.zero_grad()
        dec.zero_grad()
        img = decode(dec, model.rollout(x, 2, seed=1, backend=backend), backend=backend)
        img.square().mean().backward()
        return img.detach(), {n: p.grad.clone() for n, p in [*model.named_parameters(), *dec.named_parameters()]}

    (it, gt), (ir, gr) = grads("triton"), grads("reference")
    _close(it, ir, 1e-5)
    for n in gr:
        _close(gt[n], gr[n], 1e-4)
        assert float(gr[n].abs().sum()) > 0, n


@pytest.mark.parametrize("steps", [1, 3], ids=["step", "rollout"])
def test_a_gradient_of_the_gradient_is_refused(steps):
    """The fused backward is once-differentiable: a backward recording a graph (create_graph=True, as
    a gradient penalty's ``autograd.grad`` asks) raises at once, naming the way out, rather than
    returning unconnected (None) gradients."""
    model, x, _ = _growing_case(15, B=1, H=5, W=6)
    y = (model.step(x, seed=1, backend="triton") if steps == 1 else
         model.rollout(x.requires_grad_(True), steps, seed=1, backend="triton"))
    with pytest.raises(RuntimeError, match="once-differentiable.*backend='reference'"):
        torch.autograd.grad(y.square().sum(), list(model.parameters()), create_graph=True, allow_unused=True)
