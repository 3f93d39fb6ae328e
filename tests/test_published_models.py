"""The published models in ../shared/models load and behave: lizards grow (upright), textures settle."""
import functools
import json
from pathlib import Path

import pytest
import torch

import nca_fast
from nca_fast import growing_spec, texture_spec

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
pytestmark = pytest.mark.skipif(not MODELS.is_dir(), reason=f"published models not found at {MODELS}")

LIZARDS = {
    "ex1": "distill-growing/ex1_lizard.json",
    "ex2": "distill-growing/ex2_lizard.json",
    "ex3": "distill-growing/ex3_lizard.json",
    "port": "ports/chenmingxiang110_remaster_1.pth",
}
TFJS = "sos-growing/no_tail_model.json"
TEXTURES = "distill-textures/models.json"
SIZE, STEPS = 72, 200


@functools.lru_cache(maxsize=None)
def grown(key: str) -> torch.Tensor:
    """The state ``[C, 72, 72]`` after 200 reference steps from the seed (cached across tests)."""
    model = nca_fast.load(MODELS / (LIZARDS.get(key) or key))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only contend on a busy CI machine
    try:
        return model.rollout(model.seed(1, SIZE, SIZE), STEPS, seed=0, backend="reference")[0]
    finally:
        torch.set_num_threads(before)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("path, channels, hidden, update_bias", [
    (LIZARDS["ex1"], 16, 128, True), (LIZARDS["ex2"], 16, 128, True), (LIZARDS["ex3"], 16, 128, True),
    (LIZARDS["port"], 16, 128, False), (TFJS, 16, 128, True),
])
def test_growing_models_load(path, channels, hidden, update_bias):
    m = nca_fast.load(MODELS / path)
    assert m.spec == growing_spec(update_bias=update_bias, name=Path(path).stem)
    assert all(torch.isfinite(p).all() and p.abs().max() > 0 for p in m.parameters())


def test_all_texture_models_load():
    names = json.loads((MODELS / TEXTURES).read_text())["model_names"]
    assert len(names) == 66 and "mondrian" in names
    w1s = []
    for name in names:
        m = nca_fast.load(MODELS / TEXTURES, name=name)
        assert m.spec == texture_spec(name=name)
        w1s.append(m.w1.detach())
    w1s = torch.stack(w1s).flatten(1)
    assert torch.cdist(w1s, w1s).add(torch.eye(len(names)) * 1e9).min() > 0.1  # every tile distinct


@pytest.mark.parametrize("key", LIZARDS)
def test_lizard_grows(key):
    x = grown(key)
    assert torch.isfinite(x).all()
    alive = x[3] > 0.1
    assert 300 < alive.sum() < 2000, "a lizard covers several hundred cells of the 72x72 grid"
    rows, cols = alive.nonzero().T
    assert rows.min() > 2 and cols.min() > 2 and rows.max() < SIZE - 3 and cols.max() < SIZE - 3
    rgb = (1 - x[3].clamp(0, 1) + x[:3]).clamp(0, 1)[:, alive]  # the lizard's own pixels
    assert rgb.std() > 0.05 and 0.2 < rgb.mean() < 0.9, "coloured, neither white nor black"
    assert rgb[1].mean() > rgb[0].mean() and rgb[1].mean() > rgb[2].mean(), "a green lizard"


@pytest.mark.parametrize("key", ["ex2", "ex3", "port"])
def test_lizards_share_the_upright_silhouette(key):
    """The same emoji: each silhouette matches ex1's; the port's would not if it grew transposed."""
    ref, alive = grown("ex1")[3] > 0.1, grown(key)[3] > 0.1
    assert iou(ref, alive) > 0.6
    assert iou(ref, alive) > iou(ref, alive.T) + 0.2


def test_tfjs_model_stays_bounded():
    """``no_tail_model`` is the adversarial "virus" CA of the Adversarial Reprogramming notebook
    (trained to run in ~10% of a grown lizard's cells), so alone it spreads over the grid rather
    than growing a lizard. Read with its interleaved perception it stays bounded (|x| ~ 2); read as
    blocked it diverges past 1e10 within 100 steps."""
    x = grown(TFJS)
    assert torch.isfinite(x).all() and x.abs().max() < 10
    assert (x[3] > 0.1).sum() > 300, "it spreads from the seed"


@pytest.mark.parametrize("name", ["bubbly_0101", "chequered_0121", "grid_0002"])
def test_texture_is_stationary(name, single_thread):
    m = nca_fast.load(MODELS / TEXTURES, name=name)
    x = m.rollout(m.seed(1, 48, 40), 200, seed=1, backend="reference")
    y = m.rollout(x, 100, seed=1, start_step=200, backend="reference")
    a, b = m.to_rgb(x)[0], m.to_rgb(y)[0]
    assert torch.isfinite(y).all() and y.abs().max() <= 2.0  # the state clamp
    assert a.std() > 0.1 and b.std() > 0.1, "a textured image, not a flat colour"
    assert 0.7 < b.std() / a.std() < 1.4
    assert (a.mean((1, 2)) - b.mean((1, 2))).abs().max() < 0.1, "colour statistics settle"
    assert (a - b).abs().mean() > 1e-3, "still alive: the texture keeps moving"
