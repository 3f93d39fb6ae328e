"""fit_decoder lowers the loss on a small synthetic target; the fit-decoder CLI writes a loadable file."""
import pytest
import torch

import nca_fast
from nca_fast.decoders import build_decoder, fit_decoder, load_decoder, lppn_spec, pixel_shuffle_spec


@pytest.fixture(scope="module")
def model():
    return nca_fast.NCA(nca_fast.texture_spec(channels=8, hidden=32), init_seed=3)


@pytest.mark.parametrize("kind,teacher", [
    ("lppn", lppn_spec(8, 4, 3, hidden=16, layers=2, padding="circular")),
    ("pixel_shuffle", pixel_shuffle_spec(8, 4, 3)),
])
def test_fit_lowers_the_loss(model, kind, teacher, single_thread):
    """The target is a teacher decoder's rendering of the same grown state, so it is reachable."""
    grid, scale = (7, 9), 4
    x = model.rollout(model.seed(1, *grid), 48, seed=0, backend="reference")
    target = build_decoder(teacher, init_seed=11)(x)[0].detach()
    target = (target - target.min()) / (target.max() - target.min())  # into [0, 1]
    fit = fit_decoder(model, target, scale, kind=kind, grow_steps=48, n_states=1, steps=150,
                      hidden=16 if kind == "lppn" else None, layers=2 if kind == "lppn" else None)
    assert fit.target.shape == (1, 3, 28, 36) and fit.states.shape == (1, 8, 7, 9)
    assert fit.losses[-1] < 0.3 * fit.losses[0], (fit.losses[0], fit.losses[-1])
    # the fitted decoder renders what was optimised
    err = torch.mean((fit.decoder(fit.states) - fit.target) ** 2).item()
    assert err == pytest.approx(fit.losses[-1], rel=0.2)


def test_fit_rejects_bad_input(model):
    with pytest.raises(ValueError, match=r"\[K, H, W\]"):
        fit_decoder(model, torch.zeros(5, 5), 2)
    with pytest.raises(ValueError, match="scale"):
        fit_decoder(model, torch.zeros(3, 8, 8), 0)
    with pytest.raises(ValueError, match="kind"):
        fit_decoder(model, torch.zeros(3, 8, 8), 2, kind="nearest", steps=1, grow_steps=24)


def test_cli_fit_decoder_writes_a_decoder(tmp_path, monkeypatch, capsys, model, single_thread):
    Image = pytest.importorskip("PIL.Image")
    from nca_fast import cli
    from nca_fast.commands import fit_decoder as cmd
    img = (torch.rand(3, 5, 6).repeat_interleave(4, 1).repeat_interleave(4, 2) * 255).byte()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "target.png")
    monkeypatch.setattr(cmd, "load_model", lambda path, name=None: model)
    out = tmp_path / "dec.safetensors"
    rc = cli.main(["fit-decoder", "texture", str(tmp_path / "target.png"), "--scale", "4", "--kind",
                   "lppn", "--steps", "5", "--grow-steps", "24", "--hidden", "8", "--layers", "1",
                   "--out", str(out)])
    assert rc == 0
    dec = load_decoder(out)
    assert (dec.spec.kind, dec.spec.channels, dec.spec.scale, dec.spec.out_channels) == ("lppn", 8, 4, 3)
    assert cli.main(["fit-decoder", "texture", str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    for extra, message in ((["--steps", "0"], "--steps must be in [1, 10000000], got 0"),
                           (["--scale", "0"], "--scale must be in [1, 256], got 0"),
                           (["--kind", "pixel_shuffle", "--layers", "3"], "--layers is for lppn decoders"),
                           (["--grow-steps", "16"], "need grow_steps (--grow-steps) >= 24, got 16")):
        assert cli.main(["fit-decoder", "texture", str(tmp_path / "target.png"), *extra, "--out",
                         str(tmp_path / "x.safetensors")]) == 2
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "x.safetensors").exists()
