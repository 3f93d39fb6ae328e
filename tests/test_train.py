"""Training: Distill's growing recipe end to end through the CLI on a tiny target (the loss falls at
least 10x and the saved model grows the target), bit-identical resume from a checkpoint, argument and
checkpoint errors, the pool's damage, and texture training with a user-supplied feature network."""
import numpy as np
import pytest
import torch

import nca_fast as nf
from nca_fast.cli import main
from nca_fast.train import (
    GrowingConfig,
    TextureConfig,
    gram,
    load_target,
    rgba_loss,
    style_loss,
    train_growing,
    train_texture,
)
from nca_fast.train.pool import circle_masks

Image = pytest.importorskip("PIL.Image", reason="the target image needs Pillow (the formats extra)")
ImageDraw = pytest.importorskip("PIL.ImageDraw")


@pytest.fixture(scope="module")
def target_png(tmp_path_factory):
    """A 24x24 RGBA image: a red disc with a blue square on a transparent background."""
    im = Image.new("RGBA", (24, 24), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.ellipse((3, 3, 20, 20), fill=(230, 60, 40, 255))
    d.rectangle((9, 9, 14, 14), fill=(40, 90, 220, 255))
    path = tmp_path_factory.mktemp("target") / "target.png"
    im.save(path)
    return path


TINY = ["--size", "12", "--padding", "4", "--steps", "24", "32", "--hidden", "64", "--pool", "64"]


def test_cli_learns_a_tiny_target_and_the_model_grows_it(target_png, tmp_path, capsys):
    out = tmp_path / "grown.safetensors"
    assert main(["train", str(target_png), "--out", str(out), *TINY, "--damage", "1", "--iterations", "450",
                 "--lr-decay-at", "350", "--quiet"]) == 0
    line = capsys.readouterr().out
    first, last = (float(v) for v in line.split("loss ")[1].split(" (")[0].split(" -> "))
    assert last * 10 <= first, line
    model = nf.load(out).requires_grad_(False)
    target = load_target(target_png, 12, 4)
    seed = model.seed(1, 20, 20)
    grown = model.rollout(seed, 48, seed=123)  # other masks than in training, and longer
    assert float(rgba_loss(grown, target)) * 8 <= float(rgba_loss(seed, target))


def test_resume_continues_bit_for_bit(target_png, tmp_path):
    target = load_target(target_png, 8, 2)
    cfg = dict(target_size=8, padding=2, batch=4, pool=8, damage=1, min_steps=4, max_steps=6, lr_decay_at=3)
    spec = nf.growing_spec(hidden=16)
    straight = train_growing(target, GrowingConfig(iterations=6, **cfg), spec=spec, progress=False)
    ck = tmp_path / "state.safetensors"
    train_growing(target, GrowingConfig(iterations=4, **cfg), spec=spec, checkpoint=ck, checkpoint_interval=2,
                  progress=False)
    resumed = train_growing(target, GrowingConfig(iterations=6, **cfg), spec=spec, checkpoint=ck, resume=True,
                            progress=False)
    assert resumed.losses == straight.losses
    for n, p in straight.model.named_parameters():
        assert torch.equal(p, getattr(resumed.model, n)), n
    with pytest.raises(ValueError, match="another model spec"):
        train_growing(target, GrowingConfig(iterations=7, **cfg), spec=nf.growing_spec(hidden=8), checkpoint=ck,
                      resume=True, progress=False)
    with pytest.raises(ValueError, match="another target"):
        train_growing(load_target(target_png, 6, 3), GrowingConfig(iterations=7, **cfg), spec=spec,
                      checkpoint=ck, resume=True, progress=False)
    with pytest.warns(UserWarning, match="holds 6 iterations, as many as the 5 asked for: nothing more to train"):
        done = train_growing(target, GrowingConfig(iterations=5, **cfg), spec=spec, checkpoint=ck, resume=True,
                             progress=False)
    assert done.losses == straight.losses


def test_cli_resumes_into_another_output_file(target_png, tmp_path, capsys):
    """The spec's name is the output file's: a resumed run may write another one."""
    ck = str(tmp_path / "ck.safetensors")
    common = ["train", str(target_png), "--checkpoint", ck, "--quiet", *TINY, "--steps", "2", "3"]
    assert main([*common, "--out", str(tmp_path / "a.safetensors"), "--iterations", "1"]) == 0
    assert main([*common, "--out", str(tmp_path / "b.safetensors"), "--iterations", "2", "--resume"]) == 0
    assert "2 iterations" in capsys.readouterr().out


def test_recipe_details_as_distill():
    """The learning rate drops after iteration 2000 (Keras' PiecewiseConstantDecay on the 0-based step),
    rollouts are 64-95 steps, the texture schedule is MultiStepLR([1000, 2000], 0.3) at 1e-3."""
    cfg = GrowingConfig()
    assert cfg.lr_at(2000) == 2e-3 and cfg.lr_at(2001) == pytest.approx(2e-4)
    assert (cfg.min_steps, cfg.max_steps) == (64, 95)
    tex = TextureConfig()
    assert [tex.lr_at(i) for i in (999, 1000, 2000)] == pytest.approx([1e-3, 3e-4, 9e-5])
    assert (tex.min_steps, tex.max_steps) == (32, 95)
    with pytest.raises(ValueError, match="lr_decay in"):
        TextureConfig(lr_decay=0.0)


def test_target_is_resized_premultiplied(tmp_path):
    """No colour of a transparent pixel bleeds into the edge (Pillow resizes RGBA premultiplied)."""
    im = Image.new("RGBA", (80, 80), (255, 255, 255, 0))
    ImageDraw.Draw(im).rectangle((0, 0, 39, 79), fill=(255, 0, 0, 255))
    im.save(tmp_path / "half.png")
    t = load_target(tmp_path / "half.png", 40, 0)
    assert float(t[1:3].abs().max()) < 1e-6  # no green or blue anywhere
    torch.testing.assert_close(t[0], t[3])  # premultiplied pure red: r == alpha, at the edge too
    assert 0.5 < float(t[3, 20, 19]) < 1 and float(t[3, 20, 21]) < 0.5


def test_cli_refuses_bad_arguments_before_training(target_png, tmp_path, capsys):
    out = str(tmp_path / "m.safetensors")
    cases = [
        (["--out", str(target_png)], "--out"),
        (["--out", out, "--resume"], "--resume needs --checkpoint"),
        (["--out", out, "--checkpoint", out], "same file"),
        (["--out", out, "--lr", "nan"], "--lr"),
        (["--out", out, "--steps", "9", "3"], "max_steps"),
        (["--out", out, "--damage", "8"], "damage"),
        (["--out", out, "--pool", "4"], "pool"),
        (["--out", out, "--channels", "3"], "--channels must be >= 4 (RGBA, then hidden channels)"),
    ]
    for extra, message in cases:
        assert main(["train", str(target_png), *extra, "--quiet"]) == 2
        assert message in capsys.readouterr().err, extra
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    assert main(["train", str(target_png), "--out", out, "--checkpoint", str(corrupt), "--resume", "--quiet",
                 *TINY, "--iterations", "1"]) == 2
    assert "corrupt training checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_circle_masks_are_discs_inside_the_grid():
    m = circle_masks(64, 40, 30, torch.Generator().manual_seed(0))
    assert m.shape == (64, 1, 40, 30) and m.dtype == torch.bool
    area = m.float().mean(dim=(1, 2, 3))
    assert (area > 0).all() and (area < 0.5).all()


def test_texture_training_with_a_user_feature_network():
    """A fixed random two-layer conv net stands in for VGG. The training loss first rises (the zero
    state's flat grey is near a stripe pattern's colour statistics; the first updates scatter and
    overflow), then falls to a fraction of its peak; the trained model grows, from the seed, a state
    whose style loss is well below the seed's and that stays in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    convs = [torch.randn(8, 3, 3, 3, generator=g) * 0.3, torch.randn(8, 8, 3, 3, generator=g) * 0.2]

    def features(img):
        f1 = torch.relu(torch.nn.functional.conv2d(img, convs[0], padding=1))
        return [f1, torch.relu(torch.nn.functional.conv2d(f1, convs[1], padding=1))]

    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    stripes = torch.stack([((xx + yy) % 4 < 2).float(), torch.zeros(16, 16), ((xx + yy) % 4 >= 2).float()])
    cfg = TextureConfig(size=16, batch=2, pool=8, min_steps=8, max_steps=12, iterations=200)
    result = train_texture(stripes, features, cfg, spec=nf.texture_spec(hidden=32), progress=False)
    tens = [sum(result.losses[i:i + 10]) / 10 for i in range(0, 200, 10)]
    assert tens[-1] < 0.1 * max(tens), tens
    model, grams = result.model, [gram(f) for f in features(stripes[None])]
    x = model.rollout(model.seed(2, 16, 16), 40, seed=5)
    grown, seed = (float(style_loss(features, model.to_rgb(s), grams).mean()) for s in (x, model.seed(1, 16, 16)))
    assert grown < 0.6 * seed and x.abs().max() < 1.05, (grown, seed)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        train_texture(stripes[:2], features, cfg, progress=False)


def test_bad_targets_and_devices_are_refused_before_training(tmp_path):
    from nca_fast import media
    from nca_fast.utils.checks import device_arg

    clear = tmp_path / "clear.png"
    media.write_png(clear, np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="clear.png: the target image is fully transparent"):
        load_target(clear)

    with pytest.raises(ValueError, match=r"\[4, H, W\]"):
        train_growing(torch.zeros(3, 8, 8), GrowingConfig(iterations=1), progress=False)
    with pytest.raises(ValueError, match="RGBA in channels 0-3"):
        train_growing(torch.zeros(4, 8, 8), GrowingConfig(iterations=1), spec=nf.texture_spec(), progress=False)
    with pytest.raises(ValueError, match="not a torch device"):
        device_arg("gpu0")
    assert device_arg("cpu") == torch.device("cpu") and device_arg("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            device_arg("cuda")
