"""The ``info`` and ``run`` commands, called in-process through ``nca_fast.cli.main``."""
from pathlib import Path

import numpy as np
import pytest
import torch

from nca_fast.cli import main

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
LIZARD = MODELS / "distill-growing" / "ex1_lizard.json"
TEXTURES = MODELS / "distill-textures" / "models.json"
needs_models = pytest.mark.skipif(not MODELS.is_dir(), reason=f"published models not found at {MODELS}")
pytestmark = pytest.mark.usefixtures("single_thread")


def _frames(path):
    import imageio.v3 as iio
    return iio.imread(path, index=None)


@needs_models
def test_info_on_a_file(capsys):
    assert main(["info", str(LIZARD)]) == 0
    out = capsys.readouterr().out
    assert "ex1_lizard" in out and "sobel_x" in out and "zeros" in out
    assert "8,336" in out  # 128*48 + 128 + 16*128 + 16


@needs_models
def test_info_on_a_texture(capsys):
    assert main(["info", str(TEXTURES), "--name", "mondrian"]) == 0
    out = capsys.readouterr().out
    assert "mondrian" in out and "laplacian" in out and "circular" in out and "5,868" in out


@pytest.mark.parametrize("builtin, params", [("growing", "8,336"), ("texture", "5,868")])
def test_info_on_a_builtin(capsys, builtin, params):
    assert main(["info", builtin]) == 0
    assert params in capsys.readouterr().out


def test_run_png(tmp_path):
    out = tmp_path / "final.png"
    assert main(["run", "growing", "--size", "9x13", "--steps", "7", "--scale-up", "2",
                 "--out", str(out)]) == 0
    img = _frames(out)
    assert img.shape == (18, 26, 3) and img.dtype == np.uint8
    assert [p.name for p in tmp_path.iterdir()] == ["final.png"]


@needs_models
def test_run_png_of_a_published_lizard(tmp_path):
    out = tmp_path / "lizard.png"
    assert main(["run", str(LIZARD), "--steps", "60", "--size", "40", "--seed", "3", "--out", str(out)]) == 0
    img = _frames(out)
    assert img.shape == (40, 40, 3) and img.min() < 200 and img.max() == 255  # a shape on white


def test_run_gif(tmp_path):
    out = tmp_path / "roll.gif"
    assert main(["run", "growing", "--size", "11x8", "--steps", "10", "--every", "5", "--batch", "2",
                 "--out", str(out)]) == 0
    frames = _frames(out)
    assert frames.shape[:3] == (3, 11, 16)  # the seed + steps 5 and 10; two grids side by side


@pytest.mark.parametrize("scale, shape", [(2, (30, 42)), (1, (16, 22))])  # yuv420p: odd sides padded
def test_run_mp4(tmp_path, capsys, scale, shape):
    try:
        import imageio_ffmpeg
        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"imageio-ffmpeg unavailable: {e}")
    out = tmp_path / "roll.mp4"
    assert main(["run", "texture", "--size", "15x21", "--steps", "6", "--every", "2", "--scale-up", str(scale),
                 "--fps", "10", "--out", str(out)]) == 0
    assert _frames(out).shape[:3] == (4, *shape)
    said = capsys.readouterr().out
    assert f"{15 * scale}x{21 * scale} pixels" in said
    assert (f"padded to {shape[0]}x{shape[1]}" in said) == (scale == 1)


@pytest.mark.parametrize("args, message", [
    (["--size", "7y8"], "--size must be HxW"),
    (["--size", "0x5"], "sides must be in"),
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--every", "0"], "--every must be >= 1"),
    (["--fps", "0"], "--fps must be > 0"),
    (["--every", "5"], "--every and --fps are for videos (.gif, .mp4): a .png holds the final frame"),
    (["--steps", "4", "--every", "100", "--out", "OUT/x.gif"], "--every 100 is more than --steps 4"),
    (["--out", "OUT/x.jpg"], "unknown extension '.jpg'"),
    (["--out", "OUT/missing/x.png"], "output folder does not exist"),
    (["--name", "mondrian"], "takes no --name"),
    (["--device", "nodevice"], "nodevice"),
])
def test_run_rejects_bad_arguments(tmp_path, capsys, args, message):
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "x.png")]
    assert main(["run", "growing", *args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_run_without_cuda(tmp_path, capsys):
    assert main(["run", "growing", "--device", "cuda", "--out", str(tmp_path / "x.png")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_run_and_info_on_bad_models(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none.json"), "--out", str(tmp_path / "x.png")]) == 2
    assert "model file not found" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{oops")
    assert main(["info", str(tmp_path / "junk.json")]) == 2
    assert "corrupt or truncated JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.json"]


@needs_models
def test_unknown_texture_name_lists_names(capsys):
    assert main(["info", str(TEXTURES), "--name", "zebra"]) == 2
    assert "no model 'zebra'" in (err := capsys.readouterr().err) and "mondrian" in err


@pytest.mark.parametrize("kind, scale, ext, size", [("pixel_shuffle", None, ".gif", (36, 36)),
                                                     ("lppn", 5, ".png", (45, 45))])
def test_run_through_a_decoder(tmp_path, kind, scale, ext, size):
    from nca_fast.decoders import build_decoder, save_decoder
    from nca_fast.decoders.spec import lppn_spec, pixel_shuffle_spec

    make = pixel_shuffle_spec if kind == "pixel_shuffle" else lppn_spec
    save_decoder(build_decoder(make(16, scale=4)), tmp_path / "dec.safetensors")
    out = tmp_path / f"hires{ext}"
    args = ["run", "growing", "--size", "9x9", "--steps", "4", "--decoder", str(tmp_path / "dec.safetensors"),
            "--out", str(out)] + (["--scale", str(scale)] if scale else [])
    assert main(args) == 0
    assert _frames(out).shape[-3:-1] == size


def test_run_decoder_errors(tmp_path, capsys):
    from nca_fast.decoders import build_decoder, save_decoder
    from nca_fast.decoders.spec import pixel_shuffle_spec

    save_decoder(build_decoder(pixel_shuffle_spec(12, scale=4)), tmp_path / "tex.safetensors")
    out = str(tmp_path / "x.png")
    assert main(["run", "growing", "--decoder", str(tmp_path / "tex.safetensors"), "--out", out]) == 2
    assert "takes 12 channels, the model has 16" in capsys.readouterr().err
    assert main(["run", "texture", "--decoder", str(tmp_path / "tex.safetensors"), "--scale", "3",
                 "--out", out]) == 2
    assert "renders at scale 4 only" in capsys.readouterr().err
    assert main(["run", "texture", "--scale", "3", "--out", out]) == 2
    assert "--scale needs --decoder" in capsys.readouterr().err


def test_help_describes_each_command_in_whole_sentences(capfd):
    """``--help`` descriptions are a docstring's first paragraph, not its first line (which stopped
    mid-sentence), and ``kernels --filter`` matching nothing is an error, not "0 passed"."""
    for argv, tail in ((["kernels", "--help"], "persistent loop costs"), (["run", "--help"], None)):
        with pytest.raises(SystemExit):
            main(argv)
        out = " ".join(capfd.readouterr().out.split())
        assert tail is None or tail in out
    assert main(["kernels", "--filter", "no-such-kernel"]) == 2
    # (under the interpreter the command re-runs itself in a clean process: its own arguments, its fds)
    assert "--filter 'no-such-kernel' matches no configuration" in capfd.readouterr().err
