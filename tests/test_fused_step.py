"""The fused Triton step against the reference, under the Triton interpreter on the CPU.

Tolerance (float32): the interpreter computes tl.dot in exact fp32, so the fused step differs from the
reference only by summation order: perception sums <= 9 taps, the MLP K <= 4*64 and 256 terms, of
O(1) values -> a few ulp of the largest partial sum; 1e-5 absolute on states of O(1) leaves an order
of magnitude of margin while catching any wrong tap, weight or mask (errors >= 1e-3). 16-bit states
round the state (and the dot operands) to 11 / 8 significant bits: tolerances are set from that.
On a GPU, TF32 dots are checked by benchmarks/gpu_check.py instead.
"""
import math
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import nca_fast as nf
from nca_fast import rng
from nca_fast.kernels import launch
from nca_fast.kernels.config import interpreting, step_config
from nca_fast.spec import Filter, NCASpec

pytestmark = pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by conftest.py without a GPU) or a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "models"


def random_spec(g: torch.Generator, **over) -> NCASpec:
    """A random architecture: channels 4-23, hidden 16-128, 1-5 filters (random taps included); the
    chunked MLP of wider models is tested apart (test_chunked_mlp)."""
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]
    C = pick([4, 5, 12, 16, 23])
    names = pick([("identity", "sobel_x", "sobel_y"), ("identity", "sobel_x", "sobel_y", "laplacian"),
                  ("identity",), ("sobel_y", "laplacian")])
    filters = [Filter.preset(n) for n in names]
    if pick([False, True]):
        filters.append(Filter("random", tuple(map(tuple, torch.randn(3, 3, generator=g).tolist()))))
    clamps = pick([False, True])
    d = dict(channels=C, hidden=pick([16, 40, 96, 128]), filters=tuple(filters),
             padding=pick(["zeros", "circular", "replicate"]), hidden_bias=pick([True, False]),
             update_bias=pick([True, False]), fire_rate=pick([0.25, 0.5, 1.0]), step_size=pick([1.0, 0.5]),
             alive_channel=pick([None, 3]), alive_padding=pick([None, None, "ignore", "circular", "replicate"]),
             perception_clamp=(-1.0, 1.0) if clamps else None, hidden_clamp=(0.0, 2.0) if clamps else None,
             update_clamp=(-0.05, 0.05) if clamps else None, state_clamp=(-1.5, 1.5) if clamps else None)
    d.update(over)
    return NCASpec(**d)


def random_model(spec: NCASpec, g: torch.Generator) -> nf.NCA:
    w = {n: torch.randn(s, generator=g) * (1.0 / math.sqrt(s[-1]) if len(s) == 2 else 0.1)
         for n, s in spec.parameter_shapes().items()}
    m = nf.NCA(spec, w).to(DEVICE).requires_grad_(False)  # the forward alone (test_backward.py: the backward)
    m.fp32_matmul = "ieee"
    return m


def random_state(spec: NCASpec, g: torch.Generator, B=3, H=13, W=21) -> torch.Tensor:
    x = torch.randn(B, spec.channels, H, W, generator=g) * 0.5
    if spec.alive_channel is not None:  # a mix of live and dead cells so both alive masks matter
        live = torch.rand(B, H, W, generator=g) < 0.08
        x[:, spec.alive_channel] = live * torch.rand(B, H, W, generator=g) * 0.5
    return x.to(DEVICE)


@pytest.mark.parametrize("case", range(8))
def test_fused_step_matches_reference_on_random_specs(case):
    g = torch.Generator().manual_seed(1000 + case)
    spec = random_spec(g)
    model, x = random_model(spec, g), random_state(spec, g)
    y = model.step(x, seed=case, step=7, backend="triton")
    r = model.step(x, seed=case, step=7, backend="reference")
    torch.testing.assert_close(y, r, atol=1e-5, rtol=1e-5)
    if spec.alive_channel is not None:  # the alive masks really killed cells
        assert (r.abs().sum(1) == 0).any()


@pytest.mark.parametrize("padding", ["zeros", "circular", "replicate"])
def test_fused_rollout_matches_reference(padding):
    """Several steps exercise the pending alive form (the next step materialises the last one's
    alive masks on the fly) and the in-kernel masks of successive steps."""
    g = torch.Generator().manual_seed(7)
    spec = nf.growing_spec(padding=padding)
    model = random_model(spec, g)
    x = random_state(spec, g, B=2, H=9, W=19)
    y = model.rollout(x, 3, seed=3, start_step=11, backend="triton")
    r = model.rollout(x, 3, seed=3, start_step=11, backend="reference")
    torch.testing.assert_close(y, r, atol=2e-5, rtol=2e-5)
    frames = model.rollout(x, 3, seed=3, start_step=11, every=1, backend="triton")
    torch.testing.assert_close(frames[-1], y, atol=0, rtol=0)


@pytest.mark.parametrize("padding, alive_padding", [("circular", "ignore"), ("zeros", "circular"),
                                                    ("replicate", "ignore")])
def test_fused_alive_padding_apart_from_perception(padding, alive_padding):
    """The alive pool pads by its own field in the step, the pending form and finalize."""
    g = torch.Generator().manual_seed(17)
    spec = nf.growing_spec(padding=padding, alive_padding=alive_padding)
    model = random_model(spec, g)
    x = random_state(spec, g, B=2, H=7, W=11)
    x[:, 3, 0, :] = 0.3  # live cells on the border
    torch.testing.assert_close(model.step(x, seed=2, step=1, backend="triton"),
                               model.step(x, seed=2, step=1, backend="reference"), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(model.rollout(x, 3, seed=3, backend="triton"),
                               model.rollout(x, 3, seed=3, backend="reference"), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("padding", ["zeros", "circular", "replicate"])
@pytest.mark.parametrize("model_name, precision", [("growing", "ieee"), ("texture", "ieee"), ("growing", "tf32"),
                                                   ("texture", "tf32")])
def test_interior_and_border_kernels_together(padding, model_name, precision):
    """Grids wide enough for interior tiles (one row of 64 cells whose neighbourhood is inside the
    grid, 2 cells deep in the pending form) beside the border ring: a step and a 3-step rollout (the
    pending form) equal the reference; odd sizes, batch 2, NCHW and channels-last inputs. "tf32" (the
    interpreter's dots are exact fp32) is the path whose fp32 rollout puts the alive bits into the taps."""
    g = torch.Generator().manual_seed(23)
    spec = (nf.growing_spec if model_name == "growing" else nf.texture_spec)(padding=padding)
    model = random_model(spec, g)
    model.fp32_matmul = precision
    cfg = step_config(spec, "ieee")
    for B, H, W in [(2, 7, 71), (1, 6, 133)]:
        assert launch.regions(cfg, H, W, pending=True)[0] < H  # there are interior tiles
        x = random_state(spec, g, B=B, H=H, W=W)
        y = model.step(x, seed=4, step=2, backend="triton")
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, model.step(x, seed=4, step=2, backend="reference"), atol=1e-5, rtol=1e-5)
        xc = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model.step(xc, seed=4, step=2, backend="triton"), y, atol=0, rtol=0)
        torch.testing.assert_close(model.rollout(x, 3, seed=5, backend="triton"),
                                   model.rollout(x, 3, seed=5, backend="reference"), atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("loads", ["prefetch", "tma"])
@pytest.mark.parametrize("model_name, dtype", [("growing", torch.float32), ("growing", torch.float16),
                                               ("texture", torch.float32), ("texture", torch.float16)])
def test_interior_loads(monkeypatch, loads, model_name, dtype):
    """The opt-in interior loads (NCA_FAST_INTERIOR_LOADS) give the plain kernel's rollout bit for bit
    (the same values reach the same arithmetic), into NaN-poisoned buffers; "tma" copies through a
    tensor descriptor where the strides allow it (12 fp16 channels are 24 B: plain loads)."""
    g = torch.Generator().manual_seed(29)
    spec = (nf.growing_spec if model_name == "growing" else nf.texture_spec)(padding="circular")
    model = random_model(spec, g)
    x = random_state(spec, g, B=2, H=7, W=71).to(dtype)
    want = model.fused_rollout(x.shape, dtype, steps=3)(x, seed=5).clone()
    monkeypatch.setenv("NCA_FAST_INTERIOR_LOADS", loads)
    descs = []
    make = launch.tma_descriptor
    monkeypatch.setattr(launch, "tma_descriptor", lambda cfg, src: descs.append(make(cfg, src)) or descs[-1])
    r = model.fused_rollout(x.shape, dtype, steps=3)
    assert r.cfg.LOADS == loads
    for b in r.bufs:
        b.fill_(float("nan"))
    torch.testing.assert_close(r(x, seed=5), want, atol=0, rtol=0)
    tma = loads == "tma" and (model_name == "growing" or dtype == torch.float32)
    assert len(descs) == 3 and all((d is not None) == tma for d in descs), descs
    # wider models load plainly (a tile's copies would outgrow shared memory)
    assert step_config(nf.growing_spec(channels=32), "tf32", loads).LOADS == "plain"
    with pytest.raises(ValueError, match="loads must be one of"):
        step_config(spec, "tf32", "bulk")
    monkeypatch.setenv("NCA_FAST_INTERIOR_LOADS", "warp")
    with pytest.raises(ValueError, match="NCA_FAST_INTERIOR_LOADS must be one of"):
        model.fused_rollout(x.shape, dtype, steps=1)


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 3e-5, 3e-5), (torch.float16, 2e-2, 2e-2)])
def test_chunked_mlp(dtype, atol, rtol):
    """40 channels x 200 hidden units: the perception in channel chunks of 16 (the K loop of layer 1)
    and the hidden layer in chunks, interior and border tiles, a step and a rollout (fp32: an alive
    model in its pending form; fp16: none, whose rounding could flip an alive decision)."""
    g = torch.Generator().manual_seed(31)
    spec = nf.growing_spec(channels=40, hidden=200, padding="circular", alive_padding="replicate",
                           perception_clamp=(-2.0, 2.0), **({} if dtype == torch.float32 else {"alive_channel": None}))
    model = random_model(spec, g)
    cfg = step_config(spec, "ieee" if dtype == torch.float32 else "fp16")
    assert cfg.CP // cfg.CC == 4 and cfg.HP // cfg.HC >= 2
    x = random_state(spec, g, B=1, H=6, W=69)
    assert launch.regions(cfg, 6, 69, pending=True)[0] < 6
    xd = x.to(dtype).double()
    torch.testing.assert_close(model.step(x.to(dtype), seed=1, backend="triton").double(),
                               model.double().step(xd, seed=1, backend="reference"), atol=atol, rtol=rtol)
    model.float()
    torch.testing.assert_close(model.rollout(x.to(dtype), 2, seed=2, backend="triton").double(),
                               model.double().rollout(xd, 2, seed=2, backend="reference"), atol=atol, rtol=rtol)


@pytest.mark.parametrize("lo, code", [(-0.5, 2), (0.0, 2), (0.1, 1)])
def test_hidden_clamp_after_the_relu(lo, code):
    """The hidden clamp follows the ReLU: a lower bound <= 0 does nothing there, so the kernel applies
    the upper bound only (H_CLAMP 2); a positive one is applied (H_CLAMP 1). Both equal the reference,
    interior and border tiles; the upper bound is set low enough to bind."""
    g = torch.Generator().manual_seed(37)
    spec = nf.texture_spec(hidden_clamp=(lo, 0.15))
    assert step_config(spec, "ieee").H_CLAMP == code
    model = random_model(spec, g)
    x = random_state(spec, g, B=2, H=5, W=67)
    y = model.step(x, seed=3, backend="triton")
    torch.testing.assert_close(y, model.step(x, seed=3, backend="reference"), atol=1e-5, rtol=1e-5)
    unclamped = nf.NCA(nf.texture_spec(hidden_clamp=None), model.state_dict()).requires_grad_(False)
    unclamped.fp32_matmul = "ieee"
    assert not torch.equal(y, unclamped.step(x, seed=3, backend="triton"))  # (the clamp binds)


def test_interior_tiles_cover_the_grid():
    """Interior tiles (each row's last one overlapping the one before, as the kernel places them)
    cover the interior rectangle exactly, inside the margin; interior + ring = every cell once."""
    spec = nf.growing_spec()
    cfg = step_config(spec, "fp16")
    for H, W in [(1, 1), (3, 66), (4, 66), (5, 68), (9, 200), (70, 3), (6, 131)]:
        for pending in (False, True):
            top, bot, left, right = launch.regions(cfg, H, W, pending)
            assert 0 <= top <= bot <= H and 0 <= left <= right <= W
            m = cfg.margin(pending)
            covered = torch.zeros(H, W, dtype=torch.bool)
            n = launch.interior_tiles(cfg, 1, top, bot, left, right)
            per_row = -(-(right - left) // cfg.BW) if n else 1
            for t in range(n):
                i, r = top + t // per_row, t % per_row
                j0 = min(left + r * cfg.BW, right - cfg.BW)
                assert left <= j0 and j0 + cfg.BW <= right
                covered[i, j0:j0 + cfg.BW] = True
            if top < bot:
                assert top >= m and bot <= H - m and left >= m and right <= W - m
                assert covered[top:bot, left:right].all() and covered.sum() == (bot - top) * (right - left)
            else:
                assert n == 0
            ring = top * W + (H - bot) * W + (bot - top) * (left + W - right)
            assert int(covered.sum()) + ring == H * W


def test_in_kernel_masks_are_bit_identical():
    """With w = 0 and b2 = 1 the update is exactly the fire mask: y - x == mask, bit for bit."""
    spec = NCASpec(channels=4, hidden=16, alive_channel=None, hidden_bias=False, fire_rate=0.37)
    w = {"w1": torch.zeros(16, 12), "w2": torch.zeros(4, 16), "b2": torch.ones(4)}
    model = nf.NCA(spec, w).to(DEVICE).requires_grad_(False)
    x = torch.zeros(3, 4, 13, 21, device=DEVICE)
    for seed, step, origin in [(0, 0, (0, 0)), (2**40 + 5, 2**32 - 1, (-7, 1000))]:
        y = model.step(x, seed=seed, step=step, origin=origin, backend="triton")
        mask = rng.update_mask(3, 13, 21, seed=seed, step=step, fire_rate=0.37, origin=origin, device=DEVICE)
        assert torch.equal(y != 0, mask.expand_as(y))
        assert 0.2 < mask.float().mean() < 0.55


def test_explicit_update_mask_and_fire_rate_override():
    g = torch.Generator().manual_seed(3)
    spec = nf.growing_spec()
    model, x = random_model(spec, g), random_state(spec, g)
    mask = torch.rand(3, 1, 13, 21, generator=g).to(DEVICE) < 0.5
    torch.testing.assert_close(model.step(x, update_mask=mask, backend="triton"),
                               model.step(x, update_mask=mask, backend="reference"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.step(x, fire_rate=1.0, backend="triton"),
                               model.step(x, fire_rate=1.0, backend="reference"), atol=1e-5, rtol=1e-5)


def test_output_buffers_poisoned_with_nan_are_fully_written():
    """Every output cell (odd sizes, edge tiles, the mask bytes) is written by the launcher."""
    g = torch.Generator().manual_seed(5)
    spec = nf.growing_spec()
    model, x = random_model(spec, g), random_state(spec, g, B=2, H=5, W=35)
    x = x.contiguous(memory_format=torch.channels_last)  # the launchers' layout
    cfg = step_config(spec, "ieee")
    packed = model.packed_weights(x.dtype)
    y = torch.full_like(x, float("nan"))
    pre = torch.full((2, 5, 35), 255, dtype=torch.uint8, device=DEVICE)
    out = torch.full_like(x, float("nan"))
    launch.launch_step(cfg, spec, packed, x, None, y, pre, launch.counter_tensor(1, 2, DEVICE), fire_rate=0.5)
    launch.launch_finalize(cfg, spec, y, pre, out)
    assert torch.isfinite(out).all() and (pre <= 1).all()
    torch.testing.assert_close(out, model.step(x, seed=1, step=2, backend="reference"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float16, 2e-2, 2e-2), (torch.bfloat16, 1e-1, 5e-2)])
def test_16bit_states(dtype, atol, rtol):
    g = torch.Generator().manual_seed(11)
    spec = nf.texture_spec()
    model = random_model(spec, g)
    x = random_state(spec, g, B=2, H=7, W=17)
    y = model.step(x.to(dtype), seed=1, backend="triton")
    assert y.dtype == dtype
    r = model.step(x.double(), seed=1, backend="reference")
    torch.testing.assert_close(y.double(), r, atol=atol, rtol=rtol)


def _shared(path):
    if not (SHARED / path).exists():
        pytest.skip(f"shared model {path} not found under {SHARED}")
    return nf.load(SHARED / path, **({"name": "bubbly_0101"} if "textures" in path else {})).requires_grad_(False)


@pytest.mark.parametrize("path", ["distill-growing/ex1_lizard.json", "distill-growing/ex2_lizard.json",
                                  "distill-growing/ex3_lizard.json", "distill-textures/models.json"])
def test_published_models_fused_equals_reference(path):
    model = _shared(path).to(DEVICE)
    model.fp32_matmul = "ieee"
    x = model.seed(2, 16, 16, device=DEVICE)
    if model.spec.seed_kind == "zeros":
        x = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE) - 0.5
    x = model.rollout(x, 12, seed=1, backend="reference")  # some structure to perceive
    torch.testing.assert_close(model.step(x, seed=2, step=12, backend="triton"),
                               model.step(x, seed=2, step=12, backend="reference"), atol=1e-5, rtol=1e-5)


# ---- dispatch -------------------------------------------------------------------------------
def test_dispatch_rules(monkeypatch, caplog):
    model = nf.NCA(nf.growing_spec())
    x = model.seed(1, 8, 8)
    # auto on a CPU never picks the fused kernels, even when the interpreter could run them
    with caplog.at_level("INFO", logger="nca_fast"):
        model.step(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: state on cpu"):
        model.step(x, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="float64"):
        model.double().step(x.double(), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        model.step(x, backend="cuda")


def test_unsupported_sizes_are_named():
    model = nf.NCA(NCASpec(channels=65, hidden=16, alive_channel=None))
    with pytest.raises(RuntimeError, match="65 channels"):
        model.step(torch.zeros(1, 65, 4, 4), backend="triton")
    model = nf.NCA(NCASpec(channels=4, hidden=300, alive_channel=None))
    with pytest.raises(RuntimeError, match="hidden width 300"):
        model.step(torch.zeros(1, 4, 4, 4), backend="triton")


def test_op_works_under_torch_compile_fullgraph():
    spec = nf.texture_spec()
    g = torch.Generator().manual_seed(2)
    model = random_model(spec, g)
    x = random_state(spec, g, B=1, H=5, W=9)
    packed = model.packed_weights(x.dtype)
    ctr = launch.counter_tensor(4, 5, DEVICE)

    def f(x):
        return torch.ops.nca_fast.fused_step(x, *packed, ctr, None, spec.json, 0.5, 0, 0, "ieee")[0] * 2

    y = torch.compile(f, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(y / 2, model.step(x, seed=4, step=5, backend="reference"), atol=1e-5, rtol=1e-5)
    step = torch.compile(lambda x: model.step(x, seed=4, step=5, backend="triton"), fullgraph=True,
                         backend="eager")
    torch.testing.assert_close(step(x), y / 2, atol=1e-6, rtol=1e-6)
    torch.library.opcheck(torch.ops.nca_fast.fused_step.default,
                          (x, *packed, ctr, None, spec.json, 0.5, 0, 0, "ieee"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    life = torch.empty(0, dtype=torch.uint8, device=DEVICE)
    torch.library.opcheck(torch.ops.nca_fast.fused_step_backward.default,
                          (x, life, torch.ones_like(x), *packed, ctr, None, spec.json, 0.5, 0, 0, "ieee"),
                          test_utils=("test_schema", "test_faketensor"))


def test_fused_rollout_object_reuses_buffers_and_takes_new_counters():
    """FusedRollout (the CUDA-graph-capturable form) equals model.rollout for any seed / start step,
    and its buffers are allocated once."""
    g = torch.Generator().manual_seed(9)
    spec = nf.growing_spec()
    model = random_model(spec, g)
    x = random_state(spec, g, B=1, H=6, W=33)
    r = model.fused_rollout(x.shape, x.dtype, steps=2)
    ptrs = [b.data_ptr() for b in r.bufs]
    for seed, start in [(1, 0), (5, 40)]:
        y = r(x, seed=seed, start_step=start)
        torch.testing.assert_close(y, model.rollout(x, 2, seed=seed, start_step=start, backend="reference"),
                                   atol=2e-5, rtol=2e-5)
    assert [b.data_ptr() for b in r.bufs] == ptrs
    with pytest.raises(ValueError, match="built for"):
        r(x[:, :, :5], seed=0)


class _NewStorages(TorchDispatchMode):
    """Records the storages of state-sized tensors (``shape``) that ops create (not their inputs')."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.seen = tuple(shape), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = lambda t: [a for a in pytree.tree_leaves(t) if isinstance(a, torch.Tensor)]
        inputs = {a.untyped_storage().data_ptr() for a in leaves((args, kwargs))}
        for o in leaves(out):
            ptr = o.untyped_storage().data_ptr()
            if tuple(o.shape) == self.shape and ptr not in inputs:
                self.seen.setdefault(ptr, str(func))
        return out


@pytest.mark.parametrize("spec", [nf.growing_spec(), nf.texture_spec()], ids=["alive", "texture"])
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_rollout_holds_two_state_buffers(spec, steps):
    """A fused rollout allocates two state buffers whatever its length (the result is one of them;
    an NCHW input is converted into the other; an alive model's true state is finalized into the one
    the last step read), leaves its input alone, and equals the reference."""
    g = torch.Generator().manual_seed(22)
    model = random_model(spec, g)
    x = random_state(spec, g, B=2, H=9, W=23)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        before = inp.clone()
        with _NewStorages(x.shape) as allocs:
            y = model.rollout(inp, steps, seed=3, backend="triton")
        assert len(allocs.seen) == (2 if steps else 1), allocs.seen  # (0 steps: a copy of x)
        assert torch.equal(inp, before)
        torch.testing.assert_close(y, model.rollout(x, steps, seed=3, backend="reference"), atol=2e-5, rtol=2e-5)
    with _NewStorages(x.shape) as allocs:
        got = [s.clone() for _, s in model.frames(x, 4, seed=3, every=1, backend="triton")]
    assert len(allocs.seen) == 2 + 4, allocs.seen  # (the 4 clones are ours)
    want = model.rollout(x, 4, seed=3, every=1, backend="reference")
    torch.testing.assert_close(torch.stack(got), want, atol=2e-5, rtol=2e-5)


def test_launchers_make_their_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: every launcher first makes its first tensor's
    device current (a model on cuda:1 while cuda:0 is current)."""
    entered = []

    class Device:
        def __init__(self, d):
            entered.append(d)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class OnCuda1(torch.Tensor):
        is_cuda = property(lambda self: True)
        device = property(lambda self: torch.device("cuda", 1))

    monkeypatch.setattr(torch.cuda, "device", Device)
    for name in ("launch_step", "launch_step_backward", "launch_reduce_partials", "launch_perceive_vjp",
                 "launch_finalize", "launch_pixel_shuffle", "launch_lppn"):
        assert hasattr(getattr(launch, name), "__wrapped__"), name
    run = launch.on_device(lambda cfg, t: t.device)
    assert run(None, torch.Tensor._make_subclass(OnCuda1, torch.zeros(1))) == torch.device("cuda", 1)
    assert entered == [torch.device("cuda", 1)]
    assert run(None, torch.zeros(1)) == torch.device("cpu") and len(entered) == 1  # (CPU: nothing entered)


def test_batches_beyond_32_bit_offsets_launch_in_slices(monkeypatch):
    """The border and finalize kernels index ``cell * C`` in 32 bits: a batch of more elements is
    launched in slices of images (here the limit lowered to two images a launch), with the same
    states and in-kernel masks as one launch (bit for bit on a GPU; in the interpreter ``tl.dot`` is
    NumPy's matmul, whose OpenBLAS kernels round a row by where it sits in the block, and slicing moves
    the border ring's tiles: there the states agree to an ulp and their masks bit for bit)."""
    assert [(s.start, s.stop) for s in launch.batch_slices(5, launch.MAX_LAUNCH_ELEMENTS // 2)] == [(0, 2), (2, 4),
                                                                                                     (4, 5)]
    g = torch.Generator().manual_seed(29)
    spec = nf.growing_spec()
    model = random_model(spec, g)
    x = random_state(spec, g, B=3, H=7, W=71)
    whole = model.step(x, seed=4, step=2, backend="triton"), model.rollout(x, 3, seed=5, backend="triton")
    calls = []
    monkeypatch.setattr(launch, "MAX_LAUNCH_ELEMENTS", 2 * spec.channels * 7 * 71)
    monkeypatch.setattr(launch, "batch_slices", lambda B, n, f=launch.batch_slices: calls.append(B) or f(B, n))
    sliced = model.step(x, seed=4, step=2, backend="triton"), model.rollout(x, 3, seed=5, backend="triton")
    assert 2 in calls and 1 in calls  # (the slices were launched: 2 images, then 1)
    tol = 1e-6 if interpreting() else 0
    for a, b in zip(sliced, whole):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
        assert torch.equal(a == 0, b == 0)  # (the dead cells: the alive masks alike)
    torch.testing.assert_close(sliced[1], model.rollout(x, 3, seed=5, backend="reference"), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("programs", [2, 3])
def test_persistent_grid_with_spare_programs(monkeypatch, programs):
    """On a GPU the persistent grid has fewer programs than tiles; in the last round some programs
    have no tile left and must write nothing (here: 2 images x 4 tiles over 2 or 3 programs)."""
    monkeypatch.setattr(launch, "grid_programs", lambda n_tiles, device: programs)
    g = torch.Generator().manual_seed(21)
    spec = nf.growing_spec()
    model, x = random_model(spec, g), random_state(spec, g, B=2, H=7, W=40)
    torch.testing.assert_close(model.rollout(x, 2, seed=1, backend="triton"),
                               model.rollout(x, 2, seed=1, backend="reference"), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("target", [4, 7, 11, 20])
def test_interior_grid_steps_rows_with_carries(monkeypatch, target):
    """The interior's grid is a multiple of the segments a row has (3 here: 130 interior columns in
    64-cell tiles), and each program walks down its column of segments KP = programs / 3 rows a
    tile, carrying into the next image (KP = 1, 2, 3 and 6 over 3 images of 3 or 5 interior rows:
    spare rounds, and KP beyond an image's rows): the reference's states."""
    seen = []

    def programs(n_tiles, device):
        seen.append(n_tiles)
        return target
    monkeypatch.setattr(launch, "grid_programs", programs)
    cfg = step_config(nf.growing_spec(), "tf32")
    for pending in (False, True):
        top, bot, left, right = launch.regions(cfg, 7, 134, pending)
        n = launch.interior_tiles(cfg, 3, top, bot, left, right)
        got = launch.interior_programs(cfg, n, left, right, torch.device("cpu"))
        assert got % 3 == 0 and got == min(n, 3 * max(1, target // 3))
    g = torch.Generator().manual_seed(target)
    spec = nf.growing_spec()
    model, x = random_model(spec, g), random_state(spec, g, B=3, H=7, W=134)
    torch.testing.assert_close(model.rollout(x, 2, seed=3, backend="triton"),
                               model.rollout(x, 2, seed=3, backend="reference"), atol=2e-5, rtol=2e-5)
    assert seen


@pytest.mark.skipif(not interpreting(), reason="runs step._round_down under the Triton interpreter")
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # (7e4 -> fp16 inf: intended)
def test_round_down_is_exact_for_every_fp16_value():
    """For every fp16 value v, v > t exactly when v > step._round_down(t): the interior compares a
    16-bit state's alpha maxima with it, unwidened (thresholds that fp16 rounds up, down, to 0, to
    +-inf, and fp16 values themselves)."""
    import triton
    import triton.language as tl

    from nca_fast.kernels import step

    globals()["_round_down"] = step._round_down  # (a jit function resolves callees in its globals)

    @triton.jit
    def round_down_kernel(t_ptr, out_ptr):
        i = tl.program_id(0)
        out_ptr += i
        tl.store(out_ptr, _round_down(tl.load(t_ptr + i), tl.float16).to(tl.float32))  # noqa: F821

    ts = torch.tensor([0.1, -0.1, 0.125, 0.125 - 3e-5, -0.125 + 3e-5, 1e-9, -1e-9, 0.0, 7e4, -7e4, 65519.0,
                       1e6, -1e-30, 6e-8, math.inf, -math.inf], dtype=torch.float32)
    out = torch.empty_like(ts)
    round_down_kernel[(len(ts),)](ts, out)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).double()
    for t, lo in zip(ts.double().tolist(), out.double().tolist()):
        assert torch.tensor(lo, dtype=torch.float16).item() == lo and lo <= t, (t, lo)
        assert torch.equal(every > t, every > lo), (t, lo)


def test_alive_threshold_rounded_up_in_16_bits():
    """A threshold that fp16 rounds up (0.125 - 3e-5 -> 0.125): alpha exactly 0.125 is alive (the
    reference compares exactly); a kernel comparing with the rounded threshold would kill those
    cells. No update (w2 = b2 = 0), so the states are exact and must equal the reference bit for bit."""
    spec = nf.growing_spec(alive_threshold=0.125 - 3e-5)
    g = torch.Generator().manual_seed(5)
    model = random_model(spec, g)
    with torch.no_grad():
        for name in ("w2", "b2"):
            if hasattr(model, name):
                getattr(model, name).zero_()
    x = random_state(spec, g, B=2, H=9, W=70)
    pick = torch.randint(0, 3, x[:, 3].shape, generator=g).to(x.device)
    x[:, 3] = torch.tensor([0.0, 0.125, 0.12493896484375], device=x.device)[pick]
    x = x.half()
    got = model.rollout(x, 2, seed=1, backend="triton")
    want = model.double().rollout(x.double(), 2, seed=1, backend="reference")
    assert torch.equal(got.double(), want)
    assert (want[:, 3] == 0.125).any() and (want[:, 3] == 0).any()
