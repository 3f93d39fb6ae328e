"""The counter-based update mask (nca_fast.rng): Philox words, the mask rule, and the properties the
kernels and sharded rollouts rely on (independence of batch size, grid size, tiling; statistics)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import numpy_nca
import pytest
import torch

from nca_fast import NCA, growing_spec, rng, texture_spec

pytestmark = pytest.mark.usefixtures("single_thread")

M32 = 2**32 - 1
SEEDS = [0, 1, 12345, M32, 2**32, 2**32 + 77, 2**40 + 9, 2**63, 2**64 - 1]

# Random123's published known-answer vectors for philox4x32-10: (counter, key, result).
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


def words(t):
    return [int(v) for v in t]


@pytest.mark.parametrize("counter,key,want", KAT)
def test_philox_known_answers(counter, key, want):
    seed = key[0] | key[1] << 32
    assert numpy_nca.philox(*counter, seed) == want
    got = rng.philox4x32(*(torch.tensor([c]) for c in counter), seed)
    assert tuple(int(g) for g in got) == want


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_matches_pure_python(seed, np_rng):
    n = 300
    c = np_rng.integers(0, 2**32, size=(4, n), dtype=np.int64)
    c[:, :4] = [[0, M32, 0, 1], [M32, 0, 5, 2], [0, 2**32 - 2, M32, M32], [M32, 0, 3, 2**31]]
    c[2, 4:40] = 2**32 - 1 - np_rng.integers(0, 100, 36)  # step counters near 2**32 - 1
    got = rng.philox4x32(*(torch.from_numpy(ci) for ci in c), seed)
    assert all(g.dtype == torch.int64 and int(g.min()) >= 0 and int(g.max()) <= M32 for g in got)
    want = np.array([numpy_nca.philox(*(int(v) for v in c[:, i]), seed) for i in range(n)]).T
    np.testing.assert_array_equal(torch.stack(got).numpy(), want)


@pytest.mark.parametrize("seed", SEEDS)
def test_lean_philox_r0_matches_pure_python(seed, np_rng):
    """update_mask's Philox (r0 alone, high bits cleared only before a product) against the
    pure-Python one, on full-range words and on the broadcast counter shapes update_mask passes."""
    n = 300
    c = np_rng.integers(0, 2**32, size=(4, n), dtype=np.int64)
    c[:, :4] = [[0, M32, 0, 1], [M32, 0, 5, 2], [0, 2**32 - 2, M32, M32], [M32, 0, 3, 2**31]]
    want = [numpy_nca.philox(*(int(v) for v in c[:, i]), seed)[0] for i in range(n)]
    got = rng._philox_r0(*(torch.from_numpy(ci) for ci in c), seed)  # (torch: other devices)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(rng._philox_r0(*c, seed), want)  # (numpy: the CPU's)
    cols, rows = (torch.arange(2**32 - 5, 2**32 + 6) & M32).view(1, -1), torch.tensor([[0], [7], [M32]])
    args = (cols, rows, torch.tensor([[2**32 - 1]]), torch.tensor([[3]]))
    assert torch.equal(rng._philox_r0(*args, seed), rng.philox4x32(*args, seed)[0])
    assert np.array_equal(rng._philox_r0(*(a.numpy() for a in args), seed), rng.philox4x32(*args, seed)[0].numpy())


@pytest.mark.parametrize("seed,step,origin,batch_offset,rate", [
    (0, 0, (0, 0), 0, 0.5),
    (2**33 + 5, 2**32 - 1, (7, 2**32 - 3), 3, 0.25),  # column counter wraps modulo 2**32
    (99, 2**32 - 2, (-4, -9), 2**31, 0.9),            # negative origins wrap too
    (2**64 - 1, 12, (1000, 5), 0, 1.0 - 2**-24),
])
def test_update_mask_matches_pure_python(seed, step, origin, batch_offset, rate):
    B, H, W = 2, 7, 5
    got = rng.update_mask(B, H, W, seed=seed, step=step, fire_rate=rate, origin=origin,
                          batch_offset=batch_offset)
    assert got.dtype == torch.bool and got.shape == (B, 1, H, W)
    want = numpy_nca.fire_mask(B, H, W, seed=seed, step=step, fire_rate=rate, origin=origin,
                               batch_offset=batch_offset)
    np.testing.assert_array_equal(got.numpy(), want)


def test_fire_rule_is_strict_at_the_threshold():
    """A cell fires iff (r0 >> 8) < threshold: exactly at its own value it must not fire."""
    B, H, W, seed, step = 1, 3, 4, 2**32 + 3, 8
    for i, j in ((0, 0), (2, 3)):
        v = numpy_nca.philox(j, i, step, 0, seed)[0] >> 8
        at = rng.update_mask(B, H, W, seed=seed, step=step, fire_rate=v / 2**24)
        above = rng.update_mask(B, H, W, seed=seed, step=step, fire_rate=(v + 1) / 2**24)
        assert not at[0, 0, i, j] and above[0, 0, i, j]


def test_fire_threshold():
    assert rng.fire_threshold(0) == 0 and rng.fire_threshold(1) == 2**24
    assert rng.fire_threshold(0.5) == 2**23 and rng.fire_threshold(2**-24) == 1
    for bad in (-1e-9, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fire_rate must be in"):
            rng.fire_threshold(bad)


def test_mask_independent_of_batch_grid_and_tiling():
    kw = dict(seed=2**35 + 3, step=17, fire_rate=0.5)
    whole = rng.update_mask(5, 20, 30, **kw)
    assert torch.equal(rng.update_mask(2, 20, 30, batch_offset=3, **kw), whole[3:])  # batch shard
    assert torch.equal(rng.update_mask(5, 9, 13, **kw), whole[:, :, :9, :13])         # smaller grid
    for r, c, h, w in ((4, 7, 11, 9), (19, 29, 1, 1), (0, 13, 20, 17)):             # windows
        win = rng.update_mask(5, h, w, origin=(r, c), **kw)
        assert torch.equal(win, whole[:, :, r:r + h, c:c + w])
    assert not torch.equal(rng.update_mask(5, 11, 9, **kw), whole[:, :, 4:15, 7:16])  # origin matters


@pytest.mark.parametrize("spec", [growing_spec(channels=8, hidden=16), texture_spec(channels=6, hidden=12)],
                         ids=["growing_zeros", "texture_circular"])
def test_window_step_interior_equals_whole_grid_crop(spec):
    """A window stepped with its origin agrees with the whole-grid step wherever the padding does not
    reach: perception and the post-update alive mask read neighbours, so cells at distance >= 2."""
    model = NCA(spec, init_seed=3).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, spec.channels, 19, 23, generator=g, dtype=torch.float64) - 0.3
    r, c, h, w = 5, 4, 11, 14
    kw = dict(seed=2**32 + 11, step=4, backend="reference")
    with torch.no_grad():
        whole = model.step(x, **kw)
        win = model.step(x[:, :, r:r + h, c:c + w].contiguous(), origin=(r, c), **kw)
        wrong = model.step(x[:, :, r:r + h, c:c + w].contiguous(), origin=(0, 0), **kw)
    crop = whole[:, :, r + 2:r + h - 2, c + 2:c + w - 2]
    torch.testing.assert_close(win[:, :, 2:-2, 2:-2], crop, rtol=0, atol=1e-12)
    assert (crop != x[:, :, r + 2:r + h - 2, c + 2:c + w - 2]).any()
    assert (wrong[:, :, 2:-2, 2:-2] - crop).abs().max() > 1e-6  # a wrong origin draws another mask


def _lizard_like():
    return NCA(growing_spec(channels=8, hidden=16), init_seed=1)


def test_rollout_is_deterministic_and_resumable():
    model = _lizard_like()
    x0 = model.seed(batch=2, height=12, width=10)
    kw = dict(seed=2**32 + 5, backend="reference")
    full = model.rollout(x0, 100, **kw)
    assert torch.equal(model.rollout(x0, 100, **kw), full)  # bit-identical
    half = model.rollout(model.rollout(x0, 50, **kw), 50, start_step=50, **kw)
    assert torch.equal(half, full)
    assert (full != x0).sum() > 100  # it actually evolved
    assert not torch.equal(model.rollout(x0, 50, start_step=1, **kw),
                           model.rollout(x0, 50, **kw))  # the step counter matters
    assert not torch.equal(model.rollout(x0, 100, seed=2**32 + 6, backend="reference"), full)


@pytest.mark.parametrize("rate", [0.0, 2**-24, 0.05, 0.5, 0.9, 1.0])
def test_firing_fraction(rate):
    m = rng.update_mask(4, 96, 101, seed=7, step=3, fire_rate=rate)
    n = m.numel()
    if rate in (0.0, 1.0):
        assert int(m.sum()) == (n if rate else 0)
        return
    frac = m.double().mean().item()
    assert abs(frac - rate) <= 5 * (rate * (1 - rate) / n) ** 0.5 + 1.0 / n


def _corr(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


@pytest.mark.parametrize("rate", [0.5, 0.1])
def test_masks_uncorrelated(rate):
    kw = dict(seed=2**40 + 1, fire_rate=rate)
    m0 = rng.update_mask(2, 128, 128, step=10, **kw)
    m1 = rng.update_mask(2, 128, 128, step=11, **kw)
    pairs = {"consecutive steps": (m0, m1),
             "horizontal": (m0[..., :, :-1], m0[..., :, 1:]),
             "vertical": (m0[..., :-1, :], m0[..., 1:, :]),
             "batch": (m0[0], m0[1]),
             "seed": (m0, rng.update_mask(2, 128, 128, step=10, seed=2**40 + 2, fire_rate=rate)),
             "seed high word": (m0, rng.update_mask(2, 128, 128, step=10, seed=1, fire_rate=rate))}
    for name, (a, b) in pairs.items():
        assert abs(_corr(a, b)) < 4 / a.numel() ** 0.5, name
        assert not torch.equal(a, b), name


_TRITON_SCRIPT = textwrap.dedent("""
    import torch, triton, triton.language as tl
    from nca_fast import rng

    @triton.jit
    def words(seed, c_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        c0 = tl.load(c_ptr + i)
        c1 = tl.load(c_ptr + N + i)
        c2 = tl.load(c_ptr + 2 * N + i)
        c3 = tl.load(c_ptr + 3 * N + i)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
        tl.store(out_ptr + i, r0)
        tl.store(out_ptr + N + i, r1)
        tl.store(out_ptr + 2 * N + i, r2)
        tl.store(out_ptr + 3 * N + i, r3)

    N = 64
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2**32, (4, N), generator=g, dtype=torch.int64)
    c[:, 0] = 2**32 - 1
    c[2, 1:9] = 2**32 - 1 - torch.arange(8)
    for seed in (0, 12345, 2**32 - 1, 2**32 + 77, 2**40 + 9, 2**63 + 5, 2**64 - 1):
        out = torch.empty(4 * N, dtype=torch.int32)
        words[(1,)](seed, c.to(torch.int32).flatten(), out, N=N)  # int32 carries the uint32 bits
        want = torch.stack(rng.philox4x32(c[0], c[1], c[2], c[3], seed)).flatten()
        assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, want), seed
    print("PHILOX-OK")
""")


def test_triton_philox_matches_rng():
    """tl.philox (Triton interpreter, in a subprocess so TRITON_INTERPRET is set before import)
    returns the same words as nca_fast.rng.philox4x32: the convention the fused kernel relies on."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0 and "AssertionError" not in res.stderr:
        pytest.skip(f"Triton interpreter not usable here: {res.stderr.strip().splitlines()[-1:]}")
    assert res.returncode == 0 and "PHILOX-OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("B,H,W,origin,batch_offset", [
    (2, 37, 53, (5, 7), 0), (1, 61, 301, (2**32 - 3, 2**31), 3), (3, 1, 1, (0, 0), 2**32 - 1),
    (1, 2, 20000, (1, 2), 0)])  # a row longer than a mask band
@pytest.mark.parametrize("seed", [0, 12345678901234, 2**64 - 1])
def test_banded_update_mask_equals_one_philox_call(B, H, W, origin, batch_offset, seed):
    """update_mask draws in cache-sized bands of rows: the bands must not change a single bit."""
    for fire_rate, step in [(0.5, 7), (0.0, 0), (1.0, 2**32 - 1), (0.3, 123456)]:
        rows = torch.arange(H).view(1, H, 1) + origin[0]
        cols = torch.arange(W).view(1, 1, W) + origin[1]
        b = torch.arange(B).view(B, 1, 1) + batch_offset
        r0 = rng.philox4x32(cols, rows, torch.tensor(step), b, seed)[0]
        want = ((r0 >> 8) < rng.fire_threshold(fire_rate)).unsqueeze(1)
        got = rng.update_mask(B, H, W, seed=seed, step=step, fire_rate=fire_rate, origin=origin,
                              batch_offset=batch_offset)
        assert torch.equal(got, want)
