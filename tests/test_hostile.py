"""Hostile files and careless commands: nothing overwritten, no hang, no memory bomb, clear errors.

Every case here was a finding of a fuzzing session; behaviour on valid inputs is tested elsewhere.
"""
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import nca_fast
from nca_fast import backend, media
from nca_fast.cli import main
from nca_fast.decoders import DecoderSpec, build_decoder, decode, lppn_spec, pixel_shuffle_spec, save_decoder
from nca_fast.io import ModelFormatError
from nca_fast.spec import NCASpec, growing_spec
from nca_fast.utils.files import InputFileError, atomic_output

ROOT = Path(__file__).resolve().parents[1]
TB = 1 << 40
pytestmark = pytest.mark.usefixtures("single_thread")


def _cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "nca_fast.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---- files lost or overwritten ----------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".png", ".gif", ".mp4"])
def test_planted_symlinks_are_not_followed(tmp_path, ext):
    """Symlinks planted at every name the old writer would have used (and more) stay untouched:
    the temporary file lives in a fresh private folder with a random name."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    stem = "out"
    for pid in range(os.getpid() - 50, os.getpid() + 50):
        (tmp_path / f".{stem}.{pid}.partial{ext}").symlink_to(victim)
    frame = np.zeros((4, 6, 3), np.uint8)
    if ext == ".png":
        media.write_png(tmp_path / f"{stem}{ext}", frame)
    else:
        media.write_video(tmp_path / f"{stem}{ext}", [frame, frame], fps=5)
    assert victim.read_text() == "precious"
    assert (tmp_path / f"{stem}{ext}").stat().st_size > 0
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder: give a file name"):
        nca_fast.save(nca_fast.NCA(growing_spec(channels=4, hidden=8)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]


def test_a_killed_writers_temporary_folder_goes_with_the_next_write(tmp_path):
    """SIGKILL leaves a writer's temporary folder (nothing can unwind): the next write of the same
    file deletes it, keeping a live writer's and another host's (whose process ids mean nothing)."""
    from nca_fast.utils import files

    out = tmp_path / "x.gif"
    proc = subprocess.Popen([sys.executable, "-c", "import os, signal, sys\n"
                             "from nca_fast.utils.files import atomic_output\n"
                             "with atomic_output(sys.argv[1]) as tmp:\n"
                             "    tmp.write_bytes(b'half')\n"
                             "    os.kill(os.getpid(), signal.SIGKILL)", str(out)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.wait(timeout=60) == -signal.SIGKILL
    orphan, = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    live = tmp_path / f"{files._partial_prefix(out)}{os.getpid()}.abc.partial"
    other_host = tmp_path / f".x.gif.elsewhere.{proc.pid}.abc.partial"
    live.mkdir()
    other_host.mkdir()
    files.atomic_write_bytes(out, b"GIF89a")
    assert not orphan.exists() and live.is_dir() and other_host.is_dir() and out.read_bytes() == b"GIF89a"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signals_during_a_video_leave_no_temporary_file(tmp_path, sig):
    out = tmp_path / "long.gif"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "nca_fast.cli", "run", "growing", "--size", "16",
                             "--steps", "100000", "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) != 0
    finally:
        proc.kill()
    assert list(tmp_path.iterdir()) == []


def test_fit_decoder_refuses_to_replace_its_inputs(tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    nca_fast.save(nca_fast.NCA(growing_spec(channels=4, hidden=8)), model)
    image = tmp_path / "t.png"
    media.write_png(image, np.zeros((8, 8, 3), np.uint8))
    before = {p: p.read_bytes() for p in (model, image)}
    for out, message in ((model, "is the model file"), (image, "unknown extension"),
                         (tmp_path / "d.pt", "unknown extension")):
        assert main(["fit-decoder", str(model), str(image), "--scale", "2", "--steps", "1", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    link = tmp_path / "link.safetensors"
    link.symlink_to(model)
    assert main(["fit-decoder", str(model), str(image), "--out", str(link)]) == 2
    assert "is the model file" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (model, image)} == before


def test_non_finite_weights_are_never_written(tmp_path, capsys):
    model = nca_fast.NCA(growing_spec(channels=4, hidden=8))
    with torch.no_grad():
        model.b1[0] = float("nan")
    with pytest.raises(ValueError, match="'b1' has NaN"):
        nca_fast.save(model, tmp_path / "m.safetensors")
    dec = build_decoder(pixel_shuffle_spec(4, 2))
    with torch.no_grad():
        dec.w0[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'w0' has NaN, inf"):
        save_decoder(dec, tmp_path / "d.safetensors")
    assert list(tmp_path.iterdir()) == []
    # a good decoder file survives a diverging fit
    good = tmp_path / "dec.safetensors"
    save_decoder(build_decoder(pixel_shuffle_spec(16, 2)), good)
    before = good.read_bytes()
    image = tmp_path / "t.png"
    media.write_png(image, np.full((8, 8, 3), 200, np.uint8))
    for lr in ("inf", "nan", "-1"):
        assert main(["fit-decoder", "growing", str(image), "--scale", "2", "--kind", "pixel_shuffle", "--lr", lr,
                     "--steps", "2", "--grow-steps", "2", "--out", str(good)]) == 2
        assert "--lr must be a finite positive number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="NaN or inf"):
        nca_fast.fit_decoder(nca_fast.NCA(growing_spec()), torch.full((3, 8, 8), float("nan")), 2, steps=1)
    assert good.read_bytes() == before


def test_weights_beyond_float32_are_refused_on_load(tmp_path):
    from safetensors.torch import save
    spec = growing_spec(channels=4, hidden=8)
    tensors = {k: torch.zeros(v, dtype=torch.float64) for k, v in spec.parameter_shapes().items()}
    tensors["w2"][0, 0] = 1e300  # finite in float64, inf once float32
    meta = {"format": "nca_fast", "format_version": "1", "spec": spec.to_json()}
    (tmp_path / "big.safetensors").write_bytes(save(tensors, metadata=meta))
    with pytest.raises(ModelFormatError, match="'w2' must be finite"):
        nca_fast.load(tmp_path / "big.safetensors")


def test_saved_files_get_the_same_permissions(tmp_path):
    nca_fast.save(nca_fast.NCA(growing_spec(channels=4, hidden=8)), tmp_path / "m.safetensors")
    save_decoder(build_decoder(pixel_shuffle_spec(4, 2)), tmp_path / "d.safetensors")
    media.write_png(tmp_path / "i.png", np.zeros((2, 2, 3), np.uint8))
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o666 & ~mask}, modes


# ---- hangs and unbounded memory -----------------------------------------------------------------
def _tfjs_cycle():
    nodes = [{"name": "c1", "op": "Conv2D", "input": ["loop_a", "k"]},
             {"name": "loop_a", "op": "Identity", "input": ["loop_b"]},
             {"name": "loop_b", "op": "Relu", "input": ["loop_a"]},
             {"name": "c2", "op": "Conv2D", "input": ["loop_a", "k"]},
             {"name": "k", "op": "Identity", "input": ["k"]}]
    return {"format": "graph-model", "modelTopology": {"node": nodes}}


def test_tfjs_graph_cycle_is_named(tmp_path):
    path = tmp_path / "cycle.json"
    path.write_text(json.dumps(_tfjs_cycle()))
    t = time.perf_counter()
    with pytest.raises(ModelFormatError, match="graph cycle through node"):
        nca_fast.load(path)
    assert time.perf_counter() - t < 30  # (a guard against a hang, not a speed claim)


def _nested_tuple_key_pickle(depth: int = 40) -> bytes:
    """{t: 1} where t = (t', t'), t' = (t'', t''), ...: a 1.5 KB pickle whose key costs 2**depth to hash."""
    out = [pickle.PROTO + b"\x02", pickle.EMPTY_DICT, pickle.EMPTY_TUPLE, pickle.BINPUT + bytes([0])]
    for i in range(1, depth + 1):
        out += [pickle.BINGET + bytes([i - 1]), pickle.BINGET + bytes([i - 1]), pickle.TUPLE2,
                pickle.BINPUT + bytes([i])]
    out += [pickle.BININT1 + b"\x01", pickle.SETITEM, pickle.STOP]
    return b"".join(out)


def test_pickle_that_hashes_forever_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.pth"
    path.write_bytes(_nested_tuple_key_pickle())
    assert len(path.read_bytes()) < 2000
    code = "import nca_fast, sys\ntry:\n    nca_fast.load(sys.argv[1])\nexcept Exception as e:\n    print(e)"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "bomb.pth: refused" in proc.stdout, proc.stdout + proc.stderr


def test_refusals_say_only_why(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    path = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, path)
    with pytest.raises(ModelFormatError) as e:
        nca_fast.load(path)
    msg = str(e.value)
    assert "refused: the pickle needs code to run" in msg
    assert "weights_only" not in msg and "safe_globals" not in msg and "allowlist" not in msg.lower()
    (tmp_path / "garbage.pth").write_bytes(b"\x80" + os.urandom(300))
    with pytest.raises(ModelFormatError, match="garbage.pth: not a readable PyTorch file"):
        nca_fast.load(tmp_path / "garbage.pth")


@pytest.mark.parametrize("kind", ["dev_zero", "dev_urandom", "fifo", "huge", "loop", "dir"])
def test_only_bounded_regular_files_are_read(tmp_path, kind):
    if kind == "dev_zero":
        path, match = Path("/dev/zero"), "character device"
    elif kind == "dev_urandom":
        path, match = Path("/dev/urandom"), "character device"
    elif kind == "fifo":
        path, match = tmp_path / "f.json", "FIFO"
        os.mkfifo(path)
    elif kind == "huge":
        path, match = tmp_path / "huge.safetensors", "20.0 GiB, more than"
        with open(path, "wb") as f:
            f.truncate(20 << 30)  # sparse: no disk used
    elif kind == "loop":
        path, match = tmp_path / "a.json", "symlink loop"
        os.symlink(tmp_path / "b.json", path)
        os.symlink(path, tmp_path / "b.json")
    else:
        path, match = tmp_path, "is a directory"
    with pytest.raises(ModelFormatError, match=match):
        nca_fast.load(path)
    with pytest.raises(InputFileError, match=match):
        nca_fast.load_decoder(path)


def test_tfjs_const_broadcast_bomb(tmp_path):
    from test_io import _tfjs
    g = np.random.default_rng(2)
    obj = _tfjs(g.normal(size=(1, 1, 12, 8)), g.normal(size=8), g.normal(size=(1, 1, 8, 4)), g.normal(size=4))
    k2 = obj["modelTopology"]["node"][4]["attr"]["value"]["tensor"]
    k2.pop("tensorContent")
    k2.update(floatVal=[0.5], tensorShape={"dim": [{"size": 1}, {"size": 1}, {"size": 100000}, {"size": 10000}]})
    path = tmp_path / "bomb.json"
    path.write_text(json.dumps(obj))
    assert path.stat().st_size < 40_000
    with pytest.raises(ModelFormatError, match="declares 1000000000 values"):
        nca_fast.load(path)


def _zip_declaring(tmp_path, unpacked: int) -> Path:
    """A small torch-like zip whose central directory declares ``unpacked`` bytes for one entry."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({}))
        zf.writestr("archive/data/0", b"\x00" * 1000)
    data = bytearray(buf.getvalue())
    cd = data.rfind(b"PK\x01\x02")  # the last central directory entry: its uncompressed size at +24
    struct.pack_into("<I", data, cd + 24, unpacked)
    path = tmp_path / "bomb.pth"
    path.write_bytes(bytes(data))
    return path


def test_zip_bomb_checkpoint_is_refused(tmp_path):
    path = _zip_declaring(tmp_path, 0xF0000000)  # 3.75 GiB once unpacked
    with pytest.raises(ModelFormatError, match="bomb.pth: refused: the archive declares 3.8 GiB"):
        nca_fast.load(path)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` RGBA pixels (its data is one tiny block)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def test_texture_png_bomb_is_refused_before_decoding(tmp_path):
    import base64
    url = "data:image/png;base64," + base64.b64encode(_png_header(13000, 13000)).decode()
    layer = {"data": url, "shape": [49, 96], "layout": [1, 1], "scale": 1.0}
    obj = {"model_names": ["m"], "layers": [layer, dict(layer, shape=[97, 12])]}
    path = tmp_path / "textures.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ModelFormatError, match="PNG is 13000x13000"):
        nca_fast.load(path, name="m")
    obj["layers"][0].update(shape=[100000, 100000], layout=[100, 100])
    path.write_text(json.dumps(obj))
    with pytest.raises(ModelFormatError, match="more than the 16777216 pixels"):
        nca_fast.load(path, name="m")


def test_image_bomb_is_refused_before_decoding(tmp_path, capsys):
    path = tmp_path / "big.png"
    path.write_bytes(_png_header(9000, 9000))  # below Pillow's own bomb limit, above ours
    with pytest.raises(InputFileError, match="9000x9000 pixels"):
        media.load_image(path)
    assert main(["fit-decoder", "growing", str(path), "--out", str(tmp_path / "d.safetensors")]) == 2
    assert "9000x9000 pixels" in capsys.readouterr().err
    path.write_bytes(_png_header(20000, 20000))  # Pillow refuses this one itself
    with pytest.raises(InputFileError, match="too large"):
        media.load_image(path)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    assert main(["fit-decoder", "growing", str(tmp_path / "junk.png"), "--out", str(tmp_path / "d.safetensors")]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_rollout_counts_the_states_it_keeps(monkeypatch):
    """``every=k`` returns steps // k states: refused before any step when they cannot fit."""
    from nca_fast.utils import checks
    monkeypatch.setattr(checks, "_available_bytes", lambda device: 8 << 20)
    model = nca_fast.NCA(growing_spec(channels=4, hidden=8)).requires_grad_(False)
    x = model.seed(1, 64, 64)  # 64 KiB a state
    assert model.rollout(x, 3, every=1).shape == (3, 1, 4, 64, 64)
    with pytest.raises(MemoryError, match="the 200 states kept by every=1"):
        model.rollout(x, 200, every=1)


def test_seed_refuses_a_dtype_no_method_takes():
    with pytest.raises(ValueError, match="a state's dtype is one of"):
        nca_fast.NCA(growing_spec(channels=4, hidden=8)).seed(1, 4, 4, dtype=torch.int32)


def test_cpu_backend_takes_16_bit_states_to_the_reference():
    model = nca_fast.NCA(growing_spec(channels=4, hidden=8)).requires_grad_(False)
    x = model.seed(1, 8, 8, dtype=torch.float16) + 0.1
    y = model.step(x, seed=1, backend="cpu")
    assert y.dtype == torch.float16 and torch.equal(y, model.step(x, seed=1, backend="reference"))


def test_wide_grey_images_keep_their_range(tmp_path):
    """16-bit and float grey images load scaled to [0, 1], not clipped to 8 bits."""
    Image = pytest.importorskip("PIL.Image")
    ramp = (np.arange(1024, dtype=np.uint32).reshape(4, 256) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    t = media.load_image(tmp_path / "g16.png")
    assert t.shape == (3, 4, 256)
    torch.testing.assert_close(t[1], torch.from_numpy(ramp / 65535.0).float())
    Image.fromarray(ramp).save(tmp_path / "t16.png", transparency=0)  # its one transparent value
    t = media.load_image(tmp_path / "t16.png")
    assert t.shape == (4, 4, 256) and t[3, 0, 0] == 0 and bool((t[3].flatten()[1:] == 1).all())
    Image.fromarray(np.full((3, 5), 0.25, np.float32)).save(tmp_path / "f.tiff")
    assert torch.allclose(media.load_image(tmp_path / "f.tiff"), torch.full((3, 3, 5), 0.25))


def test_decoder_spec_caps_and_short_messages():
    t = time.perf_counter()
    with pytest.raises(ValueError, match="layers must be at most 64, got 10000000"):
        DecoderSpec("lppn", 12, layers=10**7, hidden=32)
    assert time.perf_counter() - t < 5
    with pytest.raises(ValueError, match="hidden must be at most"):
        NCASpec(channels=16, hidden=10**9)
    spec = lppn_spec(12, 8)
    with pytest.raises(ValueError) as e:
        build_decoder(spec, {f"x{i}": torch.zeros(1) for i in range(10000)})
    assert len(str(e.value)) < 600 and "expected 8 tensors" in str(e.value)


def test_sizes_beyond_memory_are_refused_before_allocating(tmp_path, capsys):
    model = nca_fast.NCA(growing_spec(channels=4, hidden=8))
    with pytest.raises(MemoryError, match=r"a 1x4x1000000x1000000 float32 state needs .* at most about"):
        model.seed(1, 10**6, 10**6)
    with pytest.raises(MemoryError, match="a 10x1000000x1000000 update mask needs"):
        nca_fast.update_mask(10, 10**6, 10**6, seed=0, step=0, fire_rate=0.5)
    dec = build_decoder(lppn_spec(4, 8))
    with pytest.raises(MemoryError, match="decoded image"):
        decode(dec, torch.zeros(1, 4, 8, 8), size=(10**6, 10**6))
    assert main(["run", "growing", "--size", "65536x65536", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "needs" in err and "at most about" in err and "Traceback" not in err


def test_run_memory_hint_counts_frames_and_states(tmp_path, capsys, monkeypatch):
    """Refused at two sizes, ``run`` names one largest grid: its check counts the rollout's states
    with the frames (before, the frames alone named a grid that the states' check then refused)."""
    from nca_fast.utils import checks
    monkeypatch.setattr(checks, "_available_bytes", lambda device: 256 << 20)
    hints = set()
    for size in ("3000", "6000"):
        assert main(["run", "growing", "--size", size, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert "and the states" in err
        hints.add(err.split("at most about ")[1].split()[0])
    assert len(hints) == 1 and list(tmp_path.iterdir()) == []


def test_frames_too_large_for_the_format_or_memory(tmp_path, capsys):
    assert main(["run", "growing", "--size", "1000", "--scale-up", "200", "--out", str(tmp_path / "x.gif")]) == 2
    assert "exceeds the 65535 pixels per side a .gif takes (--scale-up 65 or less would fit)" in capsys.readouterr().err
    save_decoder(build_decoder(lppn_spec(16, 8)), tmp_path / "d.safetensors")
    assert main(["run", "growing", "--size", "4096", "--decoder", str(tmp_path / "d.safetensors"), "--scale", "256",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "pixels per side" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


@pytest.mark.parametrize("ext", [".png", ".gif", ".mp4"])
def test_steps_past_the_32_bit_counter_are_refused_at_once(tmp_path, capsys, ext):
    t = time.perf_counter()
    assert main(["run", "growing", "--steps", str(2**32 + 1), "--out", str(tmp_path / f"x{ext}")]) == 2
    assert "--steps must be <= 4294967296" in capsys.readouterr().err
    assert time.perf_counter() - t < 10 and list(tmp_path.iterdir()) == []


# ---- results that are silently wrong ----------------------------------------------------------------
class _OnCuda:
    """A stand-in state on a CUDA device (the rule only looks at the device and dtype)."""
    device = torch.device("cuda")
    dtype = torch.float32


def test_gradients_only_go_through_paths_that_have_a_backward():
    """The fused path has a backward (auto on CUDA keeps it), and so has the CPU fast path (backend='cpu'
    keeps it; auto on a CPU takes the reference's, faster, unless the reference's graph would not fit in
    memory; the decoders, which have no CPU path, take the reference)."""
    for needs_grad in (True, False):
        assert backend.choose("auto", _OnCuda(), fused_problem="", cpu_path=False, cpu_preferred=False,
                              needs_grad=needs_grad) == "triton"
        assert backend.choose("triton", _OnCuda(), fused_problem="", cpu_path=False, cpu_preferred=False,
                              needs_grad=needs_grad) == "triton"
    x = torch.zeros(1, 4, 6, 6)
    on_cpu = dict(fused_problem="", cpu_path=True, cpu_preferred=True)
    for needs_grad in (True, False):
        assert backend.choose("cpu", x, **on_cpu, needs_grad=needs_grad) == "cpu"
        assert backend.choose("auto", x, **on_cpu, needs_grad=needs_grad, graph_fits=False) == "cpu"
        assert backend.choose("auto", x, fused_problem="", cpu_path=False, cpu_preferred=False,
                              needs_grad=needs_grad) == "reference"
    assert backend.choose("auto", x, **on_cpu, needs_grad=True) == "reference"
    assert backend.choose("auto", x, **on_cpu, needs_grad=False) == "cpu"
    model = nca_fast.NCA(growing_spec(channels=4, hidden=8))
    x = model.seed(1, 6, 6) + 0.1
    model.step(x, seed=1).sum().backward()  # auto on a CPU: the reference, and the weights get their gradients
    assert model.w1.grad is not None and model.w1.grad.abs().sum() > 0


BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="needs the interpreter"))]


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("name", BACKENDS)
def test_non_finite_states_spread_alike_on_every_backend(name, padding):
    """NaN spreads to a cell's 3x3 neighbourhood each step, firing or not, on every backend."""
    model = nca_fast.NCA(growing_spec(channels=4, hidden=8, padding=padding), init_seed=3).requires_grad_(False)
    x = torch.rand(1, 4, 7, 9) * 0.5 + 0.2
    x[0, 1, 3, 4] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    got = model.step(x, seed=5, backend=name)
    want = model.step(x, seed=5, backend="reference")
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[0, :, 2:5, 3:6]).all()
    model.check_finite = True
    with pytest.raises(FloatingPointError, match=r"the input state has 2 non-finite values \(the first at batch 0, "
                                                 r"channel 1, row 3, column 4\)"):
        model.step(x, backend=name)
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.rollout(x, 2, backend=name)


# ---- clear errors -----------------------------------------------------------------------------------
def test_deeply_nested_json_is_a_format_error(tmp_path):
    deep = "[" * 100000 + "]" * 100000
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(ModelFormatError, match="deep.json: JSON nested too deeply"):
        nca_fast.load(tmp_path / "deep.json")
    with pytest.raises(ValueError, match="NCASpec JSON is nested too deeply"):
        NCASpec.from_json(deep)
    from safetensors.torch import save
    spec = growing_spec(channels=4, hidden=8)
    tensors = {k: torch.zeros(v) for k, v in spec.parameter_shapes().items()}
    (tmp_path / "m.safetensors").write_bytes(save(tensors, metadata={"format": "nca_fast", "format_version": "1",
                                                                      "spec": deep}))
    with pytest.raises(ModelFormatError, match="invalid spec in the metadata"):
        nca_fast.load(tmp_path / "m.safetensors")
    (tmp_path / "d.safetensors").write_bytes(save({"w0": torch.zeros(1)}, metadata={"format": "nca_fast.decoder/1",
                                                                                   "spec": deep}))
    with pytest.raises(InputFileError, match="corrupt decoder spec"):
        nca_fast.load_decoder(tmp_path / "d.safetensors")


@pytest.mark.parametrize("obj", [
    [{"data_b64": 5, "in_ch": 3, "out_ch": 2, "weight_scale": 1, "bias_scale": 1}] * 2,
    [{"data_b64": "AAAA", "in_ch": [3], "out_ch": 2, "weight_scale": 1, "bias_scale": 1}] * 2,
    {"model_names": ["a"], "layers": [5, 6]},
    {"model_names": ["a"], "layers": [{"data": "x", "shape": "49,96", "layout": [1, 1], "scale": 1}] * 2},
    {"modelTopology": {"node": [{"name": "a", "op": "Conv2D", "input": 7}]}},
    {"modelTopology": {"node": [{"name": 1, "op": "Conv2D", "input": ["b", "c"]}, {"name": "b"}]}},
])
def test_malformed_files_raise_the_format_error(tmp_path, obj):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ModelFormatError, match="bad.json: "):
        nca_fast.load(path, **({"name": "a"} if isinstance(obj, dict) and "model_names" in obj else {}))


def test_cells2pixels_garbage_is_named(tmp_path):
    (tmp_path / "model.pth").write_bytes(b"\x80garbage")
    with pytest.raises(ModelFormatError, match="model.pth: not a readable PyTorch file"):
        nca_fast.load_cells2pixels(tmp_path)
    torch.save({"w1.weight": torch.zeros(3)}, tmp_path / "model.pth")
    with pytest.raises(ModelFormatError, match="model.pth: not a Cells-to-Pixels NCA state dict"):
        nca_fast.load_cells2pixels(tmp_path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["run", "growing", "--out", str(tmp_path / "dir.png")], "is a directory"),
        (["run", "growing", "--fps", "inf", "--out", str(tmp_path / "x.gif")], "--fps must be in"),
        (["run", "growing", "--fps", "1e-300", "--out", str(tmp_path / "x.gif")], "--fps must be in"),
        (["bench", "--out", str(tmp_path / "file.txt"), "--sizes", "8"], "is a file, not a folder"),
        (["info", str(tmp_path / "loop.json")], "symlink loop"),
    ]
    if not torch.cuda.is_available():
        cases.append((["fit-decoder", "growing", str(tmp_path / "none.png"), "--device", "cuda",
                       "--out", str(tmp_path / "d.safetensors")], "CUDA is not available"))
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file.txt").write_text("x")
    os.symlink(tmp_path / "loop.json", tmp_path / "loop.json")
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder: a permission error cannot be provoked")
def test_unwritable_output_folder_is_refused_before_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert main(["run", "growing", "--out", str(ro / "x.png")]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_broken_ffmpeg_is_one_line(tmp_path):
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(ROOT), IMAGEIO_FFMPEG_EXE=str(fake))
    out = tmp_path / "x.mp4"
    proc = subprocess.run([sys.executable, "-m", "nca_fast.cli", "run", "growing", "--size", "8", "--steps", "2",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "ffmpeg" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffmpeg"]
