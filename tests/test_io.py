"""Model files: native round trip, every importer on small crafted files, and every error path."""
import base64
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nca_fast
from nca_fast import NCA, Filter, NCASpec, growing_spec, texture_spec
from nca_fast.io import ModelFormatError

pytestmark = pytest.mark.usefixtures("single_thread")

SPECS = {
    "growing": growing_spec(),
    "texture": texture_spec(),
    "odd": NCASpec(channels=5, hidden=7, padding="replicate", hidden_bias=False, update_bias=False,
                   filters=(Filter.preset("identity"), Filter("blur", ((0.1, 0.2, 0.1),) * 3)),
                   alive_channel=4, fire_rate=0.3, step_size=0.5, name="odd"),
}


def _ones_mask(x):
    return torch.ones(x.shape[0], 1, *x.shape[2:], dtype=torch.bool)


# ---- native format ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SPECS)
def test_save_load_round_trip(tmp_path, kind):
    model = NCA(SPECS[kind], init_seed=3)
    path = tmp_path / "m.safetensors"
    nca_fast.save(model, path)
    back = nca_fast.load(path)
    assert back.spec == model.spec
    for k, v in model.params().items():
        assert torch.equal(back.params()[k].view(torch.int32), v.detach().view(torch.int32)), k
    x = model.seed(2, 9, 11)  # odd grid
    x = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    a = model.rollout(x, 5, seed=7, backend="reference")
    b = back.rollout(x, 5, seed=7, backend="reference")
    assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    nca_fast.save(NCA(growing_spec(), init_seed=1), path)
    before = path.read_bytes()

    def crash(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        nca_fast.save(NCA(growing_spec(), init_seed=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def _native_bytes(tensors, meta):
    from safetensors.torch import save
    return save(tensors, metadata=meta)


def _meta(spec):
    return {"format": "nca_fast", "format_version": "1", "spec": spec.to_json()}


@pytest.mark.parametrize("cut", [5, 20, -7])
def test_truncated_safetensors(tmp_path, cut):
    path = tmp_path / "m.safetensors"
    nca_fast.save(NCA(growing_spec()), path)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(ModelFormatError, match=r"m\.safetensors.*(truncated|unknown model format)"):
        nca_fast.load(path)


def test_safetensors_problems(tmp_path):
    spec = growing_spec(channels=4, hidden=8)
    good = {k: torch.zeros(v) for k, v in spec.parameter_shapes().items()}
    cases = {
        "foreign": (good, {"format": "other"}, "without nca_fast model metadata"),
        "decoder": (good, {"format": "nca_fast.decoder/1"}, "an nca_fast decoder .*not a model: give it as --decoder"),
        "trainstate": (good, {"format": "nca_fast.train"}, "training checkpoint .*not a model"),
        "future": (good, {**_meta(spec), "format_version": "99"}, "version '99'"),
        "badspec": (good, {**_meta(spec), "spec": '{"channels": -1, "hidden": 8}'}, "invalid spec"),
        "nospec": (good, {"format": "nca_fast", "format_version": "1"}, "no spec in the metadata"),
        "shape": ({**good, "w1": torch.zeros(8, 13)}, _meta(spec), r"'w1' has shape \(8, 13\)"),
        "nan": ({**good, "b1": torch.full((8,), float("nan"))}, _meta(spec), "'b1' must be finite"),
    }
    for name, (tensors, meta, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(_native_bytes(tensors, meta))
        with pytest.raises(ModelFormatError, match=f"{name}.safetensors: .*{message}"):
            nca_fast.load(path)


# ---- generic errors and detection -------------------------------------------------------------
def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        nca_fast.load(tmp_path / "nope.json")
    with pytest.raises(ModelFormatError, match="directory"):
        nca_fast.load(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"GIF89a\x00\x01", "unknown model format"),
    (b"", "unknown model format"),
    (b'{"layers": [1, 2', "corrupt or truncated JSON"),
    (b'[{"data_b64": "AAAA", "in_ch": 3', "corrupt or truncated JSON"),
    (b'{"weights": [1, 2]}', "unknown JSON model format"),
    (b"\xff\xfe{\x00", "corrupt or truncated JSON|unknown model format"),
])
def test_unknown_or_corrupt(tmp_path, content, message):
    path = tmp_path / "model.json"
    path.write_bytes(content)
    with pytest.raises(ModelFormatError, match=f"model.json: .*({message})"):
        nca_fast.load(path)


def test_format_detected_by_content_not_extension(tmp_path):
    model = NCA(growing_spec(), init_seed=5)
    nca_fast.save(model, tmp_path / "weights.json")  # native, misnamed
    assert nca_fast.load(tmp_path / "weights.json").spec == model.spec
    (tmp_path / "lizard.safetensors").write_text(json.dumps(_webgl_layers(*_webgl_bytes(6, 5))))
    assert nca_fast.load(tmp_path / "lizard.safetensors").spec.channels == 6
    torch.save({"fc0.weight": torch.zeros(5, 12), "fc1.weight": torch.zeros(4, 5)}, tmp_path / "p.json")
    assert nca_fast.load(tmp_path / "p.json").spec.hidden == 5


def test_name_on_single_model_file(tmp_path):
    nca_fast.save(NCA(growing_spec()), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="single model"):
        nca_fast.load(tmp_path / "m.safetensors", name="mondrian")


# ---- Distill WebGL growing JSON ---------------------------------------------------------------
def _webgl_bytes(channels, hidden, seed=0):
    g = np.random.default_rng(seed)
    return (g.integers(0, 256, (3 * channels + 1, hidden), dtype=np.uint8),
            g.integers(0, 256, (hidden + 1, channels), dtype=np.uint8))


def _webgl_layers(q1, q2, scales=((1.3, 0.5), (1.1, 0.2))):
    return [{"data_b64": base64.b64encode(q.tobytes()).decode(), "in_ch": q.shape[0] - 1,
             "out_ch": q.shape[1], "weight_scale": ws, "bias_scale": bs, "type": "uint8"}
            for q, (ws, bs) in zip((q1, q2), scales)]


@pytest.mark.parametrize("channels, hidden", [(16, 128), (6, 5)])
def test_webgl_dequantisation(tmp_path, channels, hidden):
    q1, q2 = _webgl_bytes(channels, hidden)
    path = tmp_path / "ex.json"
    path.write_text(json.dumps(_webgl_layers(q1, q2)))
    m = nca_fast.load(path)
    assert m.spec == growing_spec(channels=channels, hidden=hidden, name="ex")
    deq = lambda q, s: (q.astype(np.float64) / 255 - 0.5) * s
    expect = {"w1": deq(q1[:-1], 1.3).T, "b1": deq(q1[-1], 0.5),
              "w2": deq(q2[:-1], 1.1).T, "b2": deq(q2[-1], 0.2)}
    for k, v in expect.items():
        np.testing.assert_allclose(m.params()[k].detach().numpy(), v, rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("edit, message", [
    (lambda l: l[0].update(data_b64="!!not base64!!"), "not valid base64"),
    (lambda l: l[0].update(data_b64=base64.b64encode(b"\x01" * 10).decode()), "holds 10 bytes"),
    (lambda l: l[0].update(type="float16"), "only type 'uint8'"),
    (lambda l: l[1].pop("bias_scale"), "lacks"),
    (lambda l: l.pop(), "2 layers"),
    (lambda l: l[0].update(weight_scale=None), "finite numbers"),
])
def test_webgl_errors(tmp_path, edit, message):
    layers = _webgl_layers(*_webgl_bytes(4, 8))
    edit(layers)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(layers))
    with pytest.raises(ModelFormatError, match=f"bad.json: .*{message}"):
        nca_fast.load(path)


def test_webgl_channel_errors(tmp_path):
    g = np.random.default_rng(0)
    q1, q2 = g.integers(0, 256, (11, 8), dtype=np.uint8), g.integers(0, 256, (9, 4), dtype=np.uint8)
    (tmp_path / "a.json").write_text(json.dumps(_webgl_layers(q1, q2)))  # 10 inputs: not 3 x C
    with pytest.raises(ModelFormatError, match="not a multiple of the 3 perception filters"):
        nca_fast.load(tmp_path / "a.json")
    q1, q2 = _webgl_bytes(4, 8)
    (tmp_path / "b.json").write_text(json.dumps(_webgl_layers(q1, q2[:, :3])))  # 12 = 3 x 4, 3 out
    with pytest.raises(ModelFormatError, match="expected 8 -> 4"):
        nca_fast.load(tmp_path / "b.json")


# ---- Distill textures models.json -------------------------------------------------------------
def _png_url(img):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img, "RGBA").save(buf, format="PNG")
    return "data:image/PNG;base64," + base64.b64encode(buf.getvalue()).decode()


def _texture_file(names, channels=4, hidden=6, layouts=((2, 2), (3, 1)), seed=0):
    """A small models.json with random bytes; returns (json obj, per-layer images)."""
    g = np.random.default_rng(seed)
    layers, images = [], []
    for (rows, out), layout, scale in zip(((4 * channels + 1, hidden), (hidden + 1, channels)),
                                          layouts, (2.0, 1.2)):
        img = g.integers(0, 256, (rows * layout[1], -(-out // 4) * layout[0], 4), dtype=np.uint8)
        images.append(img)
        layers.append({"scale": scale, "data": _png_url(img), "shape": [rows, out],
                       "quant_scale_zero": [2.0, 0.0], "layout": list(layout)})
    return {"model_names": list(names), "layers": layers}, images


def _tile_weights(img, rows, out, layout, index, scale):
    tw = -(-out // 4)
    r0, c0 = index // layout[0] * rows, index % layout[0] * tw
    vals = [[img[r0 + r, c0 + o // 4, o % 4] for o in range(out)] for r in range(rows)]
    v = (np.array(vals, np.float64) - 127) / 255 * scale
    return v[:-1].T, v[-1]


@pytest.mark.parametrize("index", [0, 2])
def test_texture_tiles(tmp_path, index):
    names = ["a", "b", "c"]
    obj, (img1, img2) = _texture_file(names)
    path = tmp_path / "models.json"
    path.write_text(json.dumps(obj))
    m = nca_fast.load(path, name=names[index])
    assert m.spec == texture_spec(channels=4, hidden=6, name=names[index])
    w1, b1 = _tile_weights(img1, 17, 6, (2, 2), index, 2.0)
    w2, b2 = _tile_weights(img2, 7, 4, (3, 1), index, 1.2)
    for k, v in {"w1": w1, "b1": b1, "w2": w2, "b2": b2}.items():
        np.testing.assert_allclose(m.params()[k].detach().numpy(), v, rtol=1e-6, atol=1e-7, err_msg=k)


def test_texture_names(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps(_texture_file(["bubbly", "mondrian"])[0]))
    with pytest.raises(ModelFormatError, match="no model 'zebra'; available: bubbly, mondrian"):
        nca_fast.load(path, name="zebra")
    with pytest.raises(ModelFormatError, match="holds 2 models.*available: bubbly, mondrian"):
        nca_fast.load(path)


@pytest.mark.parametrize("edit, message", [
    (lambda o: o["layers"][0].update(data="data:image/PNG;base64,iVBORw0KGgoAAAANSUhEUgAA"),
     "cannot decode the PNG"),
    (lambda o: o["layers"][0].update(data="data:image/PNG;base64,@@@"), "not valid base64"),
    (lambda o: o["layers"][1].update(data="data:image/jpeg;base64,AAAA"), "PNG data URL"),
    (lambda o: o["layers"][0].update(shape=[13, 6]), "PNG is"),
    (lambda o: o["layers"][1].update(layout=[1, 1]), "fewer tiles"),
    (lambda o: o["layers"].pop(), "exactly 2 layers"),
    (lambda o: o.update(model_names=[]), "non-empty list"),
])
def test_texture_errors(tmp_path, edit, message):
    obj = _texture_file(["a", "b"])[0]
    edit(obj)
    path = tmp_path / "tex.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ModelFormatError, match=f"tex.json: .*{message}"):
        nca_fast.load(path, name="a")


# ---- TF.js graph model ------------------------------------------------------------------------
def _const(name, arr):
    arr = np.asarray(arr, "<f4")
    return {"name": name, "op": "Const", "attr": {"value": {"tensor": {
        "dtype": "DT_FLOAT", "tensorShape": {"dim": [{"size": str(d)} for d in arr.shape]},
        "tensorContent": base64.b64encode(arr.tobytes()).decode()}}, "dtype": {"type": "DT_FLOAT"}}}


def _tfjs(k1, b1, k2, b2):
    """A graph shaped like the TF export (depthwise -> Conv2D -> BiasAdd -> Relu -> Conv2D -> BiasAdd),
    with node names unlike the original's, listed out of order."""
    nodes = [
        {"name": "x", "op": "Placeholder"},
        {"name": "perceive", "op": "DepthwiseConv2dNative", "input": ["x", "filters"]},
        {"name": "second", "op": "Conv2D", "input": ["act:0", "k2/read"]},
        {"name": "k2/read", "op": "Identity", "input": ["k2"]},
        _const("k2", k2), _const("k1", k1), _const("bb1", b1),
        {"name": "first", "op": "Conv2D", "input": ["perceive", "k1"]},
        {"name": "add1", "op": "BiasAdd", "input": ["first", "bb1"]},
        {"name": "act", "op": "Relu", "input": ["add1"]},
        {"name": "add2", "op": "BiasAdd", "input": ["second", "bb2"]},
    ]
    if b2 is not None:
        nodes.append(_const("bb2", b2))
    else:
        nodes.pop()
    return {"format": "graph-model", "modelTopology": {"node": nodes}, "weightsManifest": []}


@pytest.mark.parametrize("channels, hidden, last_bias", [(16, 128, True), (5, 7, False)])
def test_tfjs_interleaved_to_blocked(tmp_path, channels, hidden, last_bias):
    g = np.random.default_rng(1)
    k1 = g.normal(size=(1, 1, 3 * channels, hidden)).astype(np.float32)
    k2 = g.normal(size=(1, 1, hidden, channels)).astype(np.float32)
    b1, b2 = g.normal(size=hidden), g.normal(size=channels) if last_bias else None
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(_tfjs(k1, b1, k2, b2)))
    m = nca_fast.load(path)
    assert (m.spec.channels, m.spec.hidden, m.spec.update_bias) == (channels, hidden, last_bias)
    w1 = m.params()["w1"].detach().numpy()
    for c in range(channels):
        for f in range(3):  # TF input c*3 + f is canonical column f*C + c
            np.testing.assert_array_equal(w1[:, f * channels + c], k1[0, 0, c * 3 + f])
    np.testing.assert_array_equal(m.params()["w2"].detach().numpy(), k2[0, 0].T)


@pytest.mark.parametrize("edit, message", [
    (lambda n: n[4]["attr"]["value"]["tensor"].update(tensorContent="AAAA"), "3 bytes of data"),
    (lambda n: n[4]["attr"]["value"]["tensor"].update(tensorContent="%%%"), "not valid base64"),
    (lambda n: n[4].update(_const("k2", np.full((1, 1, 8, 4), np.nan))), "must be finite"),
    (lambda n: n[4].update(_const("k2", np.zeros((3, 3, 8, 4)))), r"must be \[1, 1, in, out\]"),
    (lambda n: n.pop(7), "missing node 'first'|found 1 Conv2D"),
    (lambda n: n[2].update(input=["x", "k2/read"]), "chained"),
])
def test_tfjs_errors(tmp_path, edit, message):
    g = np.random.default_rng(2)
    obj = _tfjs(g.normal(size=(1, 1, 12, 8)), g.normal(size=8), g.normal(size=(1, 1, 8, 4)),
                g.normal(size=4))
    edit(obj["modelTopology"]["node"])
    path = tmp_path / "g.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ModelFormatError, match=f"g.json: .*({message})"):
        nca_fast.load(path)


# ---- PyTorch port state dicts -----------------------------------------------------------------
_SOBEL = torch.tensor(np.outer([1, 2, 1], [-1, 0, 1]) / 8.0, dtype=torch.float32)
_IDENT = torch.zeros(3, 3).index_put_((torch.tensor(1), torch.tensor(1)), torch.tensor(1.0))


def _alive(x):  # [B, C, H, W]
    return F.max_pool2d(x[:, 3:4], 3, stride=1, padding=1) > 0.1


def _chenmingxiang110_update(x, sd):
    """chenmingxiang110's CAModel.update, every cell firing; ``x [B, H, W, C]``."""
    C = x.shape[-1]
    x = x.transpose(1, 3)  # [B, C, W, H]: the port's own layout
    pre = _alive(x)
    conv = lambda k: F.conv2d(x, k.view(1, 1, 3, 3).repeat(C, 1, 1, 1), padding=1, groups=C)
    p = torch.cat((x, conv(_SOBEL), conv(_SOBEL.T)), 1).transpose(1, 3)
    dx = F.linear(torch.relu(F.linear(p, sd["fc0.weight"], sd["fc0.bias"])), sd["fc1.weight"])
    x = x + dx.transpose(1, 3)
    return (x * (pre & _alive(x))).transpose(1, 3)


def _sequential_port_update(x, sd, prefix):
    """A Distill-notebook PyTorch port: [identity, sobel_x, sobel_y] per channel, groups=C."""
    C = x.shape[1]
    kernel = torch.stack([_IDENT, _SOBEL, _SOBEL.T]).repeat(C, 1, 1)[:, None]
    h = F.conv2d(F.conv2d(x, kernel, padding=1, groups=C), sd[f"{prefix}.0.weight"], sd[f"{prefix}.0.bias"])
    y = x + F.conv2d(torch.relu(h), sd[f"{prefix}.2.weight"], sd.get(f"{prefix}.2.bias"))
    return y * (_alive(x) & _alive(y))


def _state(C, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, C, H, W, generator=g)
    x[:, 3] = (torch.rand(1, H, W, generator=g) > 0.4).float()  # some dead cells
    return x


def test_chenmingxiang110_port_matches_its_code(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"fc0.weight": torch.randn(32, 48, generator=g) * 0.3, "fc0.bias": torch.randn(32, generator=g) * 0.1,
          "fc1.weight": torch.randn(16, 32, generator=g) * 0.1}
    torch.save(sd, tmp_path / "port.pth")
    m = nca_fast.load(tmp_path / "port.pth")
    assert not m.spec.update_bias
    x = _state(16, 9, 13, 1)  # not square: a transposition cannot hide
    ours = m.step(x, update_mask=_ones_mask(x), backend="reference")
    theirs = _chenmingxiang110_update(x.permute(0, 2, 3, 1), sd).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix, wrap, last_bias", [("dmodel", None, True),
                                                     ("update_module", "state_dict", False)])
def test_sequential_port_matches_its_code(tmp_path, prefix, wrap, last_bias):
    g = torch.Generator().manual_seed(0)
    sd = {f"{prefix}.0.weight": torch.randn(24, 15, 1, 1, generator=g) * 0.3,
          f"{prefix}.0.bias": torch.randn(24, generator=g) * 0.1,
          f"{prefix}.2.weight": torch.randn(5, 24, 1, 1, generator=g) * 0.1}
    if last_bias:
        sd[f"{prefix}.2.bias"] = torch.randn(5, generator=g) * 0.1
    saved = {wrap: {"module." + k: v for k, v in sd.items()}, "epoch": 3} if wrap else sd
    torch.save(saved, tmp_path / "port.pt")
    m = nca_fast.load(tmp_path / "port.pt")
    assert (m.spec.channels, m.spec.hidden, m.spec.update_bias) == (5, 24, last_bias)
    x = _state(5, 10, 7, 2)
    ours = m.step(x, update_mask=_ones_mask(x), backend="reference")
    torch.testing.assert_close(ours, _sequential_port_update(x, sd, prefix), rtol=1e-5, atol=1e-5)


class _Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_with_code_is_refused(tmp_path, writer):
    marker, path = tmp_path / "pwned", tmp_path / "model.pth"
    obj = {"fc0.weight": torch.zeros(4, 12), "evil": _Evil(str(marker))}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(ModelFormatError, match="model.pth: refused: the pickle needs code to run"):
        nca_fast.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("sd, message", [
    ({"fc0.weight": torch.full((8, 12), float("nan")), "fc1.weight": torch.zeros(4, 8)}, "must be finite"),
    ({"fc0.weight": torch.zeros(8, 12), "fc1.weight": torch.zeros(5, 8)}, "expected 3 x 5"),
    ({"fc0.weight": torch.zeros(8, 13), "fc1.weight": torch.zeros(4, 8)}, "not a multiple of the 3"),
    ({"fc0.weight": torch.zeros(8, 12), "fc1.weight": torch.zeros(4, 9)}, r"'w2' has shape \(4, 9\)"),
    ({"fc0.weight": torch.zeros(8, 12), "fc1.weight": torch.zeros(4, 8), "extra": torch.zeros(3)}, "unexpected"),
    ({"a.weight": torch.zeros(8, 12), "b.weight": torch.zeros(4, 8)}, "unknown PyTorch state dict layout"),
    ({"p.weight": torch.zeros(12, 1, 3, 3), "m.0.weight": torch.zeros(8, 12, 1, 1)}, "two 1x1 convolutions"),
    ([torch.zeros(3)], "expected a state dict"),
])
def test_port_errors(tmp_path, sd, message):
    path = tmp_path / "port.pt"
    torch.save(sd, path)
    with pytest.raises(ModelFormatError, match=f"port.pt: .*{message}"):
        nca_fast.load(path)


def test_truncated_torch_file(tmp_path):
    path = tmp_path / "port.pt"
    torch.save({"fc0.weight": torch.zeros(8, 12), "fc1.weight": torch.zeros(4, 8)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelFormatError, match="port.pt: not a readable PyTorch file"):
        nca_fast.load(path)
