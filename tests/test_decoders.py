"""Reference decoders against independent formulations written here; spec, save/load, Cells-to-Pixels
import (their key names and forward, re-implemented from their models/siren.py, utils/render.py)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import nca_fast
from nca_fast.decoders import (
    DecoderSpec,
    build_decoder,
    decode,
    load_decoder,
    lppn_spec,
    pixel_shuffle_spec,
    save_decoder,
)
from nca_fast.io import ModelFormatError, cells2pixels_decoder, cells2pixels_nca, load_cells2pixels


# ---- pixel shuffle ------------------------------------------------------------------------------
@pytest.mark.parametrize("C,K,r,hidden", [(5, 3, 3, 0), (16, 4, 1, 0), (12, 3, 8, 16), (4, 9, 2, 7)])
def test_pixel_shuffle_matches_F_pixel_shuffle(C, K, r, hidden):
    dec = build_decoder(pixel_shuffle_spec(C, r, K, hidden), init_seed=1)
    x = torch.randn(2, C, 5, 7)
    h = x
    if hidden:
        h = torch.relu(F.conv2d(h, dec.w0[:, :, None, None], dec.b0))
    last = "w1" if hidden else "w0"
    head = F.conv2d(h, getattr(dec, last)[:, :, None, None], getattr(dec, "b" + last[1:]))
    expected = F.pixel_shuffle(head, r)
    got = dec(x)
    assert got.shape == (2, K, 5 * r, 7 * r)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- LPPN: the Cells-to-Pixels formulation, written out -----------------------------------------
def c2p_render(x, sd, *, scale, padding, n_freq, first_omega, hidden_omega):
    """Their Renderer2D.render + Siren.forward with a state dict in their key names."""
    b, c, h, w = x.shape
    t = (torch.arange(scale) / scale - 0.5 + 0.5 / scale) * 2.0
    mgrid = torch.stack(torch.meshgrid(t, t, indexing="ij"), dim=-1)          # [s, s, 2]
    coords = mgrid[None].expand(b, -1, -1, -1).repeat(1, h, w, 1)           # [b, h*s, w*s, 2]
    xp = F.pad(x, [1, 1, 1, 1], padding)
    up = F.interpolate(xp, scale_factor=scale, mode="bilinear")
    up = up[:, :, scale:-scale, scale:-scale].permute(0, 2, 3, 1)
    if n_freq > 0:
        aug = torch.cat([coords * math.pi * i for i in range(1, n_freq + 1)], dim=-1)
        coords = torch.cat([torch.sin(aug), torch.cos(aug)], dim=-1)
    z = torch.cat([coords, up], dim=-1)
    n = len({k.split(".")[1] for k in sd})
    for i in range(n - 1):
        om = first_omega if i == 0 else hidden_omega
        z = torch.sin(om * (z @ sd[f"net.{i}.linear.weight"].T + sd[f"net.{i}.linear.bias"]))
    out = z @ sd[f"net.{n - 1}.weight"].T + sd[f"net.{n - 1}.bias"]
    return out.permute(0, 3, 1, 2)


def c2p_siren_state_dict(C, n_freq, hidden, hidden_layers, K, seed):
    g = torch.Generator().manual_seed(seed)
    E = 2 * max(1, 2 * n_freq)
    sd, n_in = {}, E + C
    for i in range(hidden_layers + 1):
        sd[f"net.{i}.linear.weight"] = (torch.rand(hidden, n_in, generator=g) * 2 - 1) / math.sqrt(n_in)
        sd[f"net.{i}.linear.bias"] = torch.rand(hidden, generator=g) - 0.5
        n_in = hidden
    sd[f"net.{hidden_layers + 1}.weight"] = torch.randn(K, hidden, generator=g) / math.sqrt(hidden)
    sd[f"net.{hidden_layers + 1}.bias"] = torch.randn(K, generator=g)
    return sd


@pytest.mark.parametrize("scale", [1, 3, 8])
@pytest.mark.parametrize("padding", ["circular", "replicate"])
@pytest.mark.parametrize("n_freq,K,hidden_layers", [(0, 3, 2), (2, 9, 0)])
def test_lppn_matches_cells2pixels_formulas(scale, padding, n_freq, K, hidden_layers):
    C, hidden = 6, 16
    sd = c2p_siren_state_dict(C, n_freq, hidden, hidden_layers, K, seed=scale)
    dec = cells2pixels_decoder(sd, channels=C, scale=scale, padding=padding, first_omega=7.0,
                               hidden_omega=3.0)
    assert dec.spec.frequencies == n_freq and dec.spec.layers == hidden_layers + 1
    x = torch.randn(2, C, 5, 7)
    expected = c2p_render(x, sd, scale=scale, padding=padding, n_freq=n_freq, first_omega=7.0,
                          hidden_omega=3.0)
    torch.testing.assert_close(dec(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(11, 17), (4, 30), (5, 7)])
@pytest.mark.parametrize("padding", ["circular", "replicate"])
def test_lppn_arbitrary_size_matches_grid_sample(size, padding):
    """Arbitrary output sizes: bilinear sampling at (i+0.5)*H/Ho - 0.5 of the padded grid, local
    coordinate 2*frac((i+0.5)*H/Ho) - 1, here via grid_sample and float64 arithmetic."""
    C, H, W = 4, 5, 7
    Ho, Wo = size
    spec = lppn_spec(C, 3, 3, hidden=8, layers=2, padding=padding, frequencies=1)
    dec = build_decoder(spec, init_seed=3).double()
    x = torch.randn(1, C, H, W, dtype=torch.float64)
    src_y = (torch.arange(Ho, dtype=torch.float64) + 0.5) * H / Ho
    src_x = (torch.arange(Wo, dtype=torch.float64) + 0.5) * W / Wo
    gy = (2 * (src_y + 0.5) + 1) / (H + 2) - 1   # padded-grid normalised coordinates (align_corners=False)
    gx = (2 * (src_x + 0.5) + 1) / (W + 2) - 1
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
    z = F.grid_sample(F.pad(x, [1, 1, 1, 1], padding), grid, mode="bilinear", align_corners=False)
    ly, lx = 2 * torch.frac(src_y) - 1, 2 * torch.frac(src_x) - 1
    coords = torch.stack(torch.broadcast_tensors(ly[:, None], lx[None, :]), dim=-1)
    enc = torch.cat([torch.sin(math.pi * coords), torch.cos(math.pi * coords)], dim=-1)
    h = torch.cat([enc[None], z.permute(0, 2, 3, 1)], dim=-1)
    h = torch.sin(spec.first_omega * (h @ dec.w0.T + dec.b0))
    h = torch.sin(spec.hidden_omega * (h @ dec.w1.T + dec.b1))
    expected = (h @ dec.w2.T + dec.b2).permute(0, 3, 1, 2)
    torch.testing.assert_close(dec(x, size), expected, rtol=1e-9, atol=1e-9)


# ---- spec, checks -------------------------------------------------------------------------------
def test_spec_json_roundtrip_and_shapes():
    s = lppn_spec(12, 8, 9, hidden=64, layers=4, padding="replicate", frequencies=2, name="pbr")
    assert DecoderSpec.from_json(s.to_json()) == s
    assert s.parameter_shapes()["w0"] == (64, 8 + 12) and s.parameter_shapes()["w4"] == (9, 64)
    p = pixel_shuffle_spec(16, 4, 3)
    assert p.parameter_shapes() == {"w0": (48, 16), "b0": (48,)}


@pytest.mark.parametrize("kw,match", [
    (dict(kind="lppn", channels=4, hidden=0, layers=1), "layers >= 1 and hidden >= 1"),
    (dict(kind="pixel_shuffle", channels=4, hidden=8, layers=2), "0 or 1 hidden"),
    (dict(kind="blur", channels=4), "kind"),
    (dict(kind="lppn", channels=4, hidden=8, layers=1, padding="zeros"), "padding"),
    (dict(kind="lppn", channels=0, hidden=8, layers=1), "channels"),
    (dict(kind="lppn", channels=4, hidden=8, layers=1, first_omega=-1.0), "first_omega"),
])
def test_spec_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        DecoderSpec(**kw)


def test_decode_rejects_bad_input():
    dec = build_decoder(lppn_spec(6, 2))
    with pytest.raises(ValueError, match="channels"):
        decode(dec, torch.zeros(1, 5, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        decode(dec, torch.zeros(6, 4, 4))
    with pytest.raises(ValueError, match="backend"):
        decode(dec, torch.zeros(1, 6, 4, 4), backend="cuda")
    with pytest.raises(ValueError, match="positive"):
        decode(dec, torch.zeros(1, 6, 4, 4), size=(0, 3))
    ps = build_decoder(pixel_shuffle_spec(6, 2))
    with pytest.raises(ValueError, match="renders exactly"):
        decode(ps, torch.zeros(1, 6, 4, 4), size=(9, 9))
    with pytest.raises(ValueError, match="shape"):
        build_decoder(lppn_spec(6, 2), {k: torch.zeros(1) for k in lppn_spec(6, 2).parameter_shapes()})


def test_decode_auto_on_cpu_is_the_reference():
    dec = build_decoder(lppn_spec(6, 3, hidden=8, layers=1))
    x = torch.randn(1, 6, 3, 5)
    torch.testing.assert_close(decode(dec, x, backend="auto"), dec(x))


# ---- save / load --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [lppn_spec(5, 3, 4, hidden=12, layers=2, frequencies=1),
                                  pixel_shuffle_spec(7, 2, 3, hidden=6)])
def test_save_load_roundtrip(tmp_path, spec):
    dec = build_decoder(spec, init_seed=5)
    path = save_decoder(dec, tmp_path / "d.safetensors")
    assert os.listdir(tmp_path) == ["d.safetensors"]  # the temporary file was renamed
    back = load_decoder(path)
    assert back.spec == spec and type(back) is type(dec)
    for k, v in dec.params().items():
        assert torch.equal(v, back.params()[k])
    x = torch.randn(1, spec.channels, 3, 4)
    assert torch.equal(dec(x), back(x))


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="safetensors"):
        load_decoder(bad)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"w0": torch.zeros(2, 2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not an nca_fast decoder"):
        load_decoder(other)
    with pytest.raises(FileNotFoundError):
        load_decoder(tmp_path / "missing.safetensors")
    model_json = tmp_path / "model.json"  # (its first 8 bytes would read as a header length beyond 2**40)
    model_json.write_text('{"layers": []}')
    with pytest.raises(ValueError, match="model.json: not a safetensors file but JSON text"):
        load_decoder(model_json)


# ---- Cells-to-Pixels import ---------------------------------------------------------------------
def test_cells2pixels_decoder_errors():
    sd = c2p_siren_state_dict(6, 1, 8, 1, 3, seed=0)
    with pytest.raises(ValueError, match="channels= or num_frequencies="):
        cells2pixels_decoder(sd)
    assert cells2pixels_decoder(sd, num_frequencies=1).spec.channels == 6
    with pytest.raises(ValueError, match="coordinate encoding"):
        cells2pixels_decoder(sd, channels=7)
    sine_out = dict(sd)
    sine_out["net.2.linear.weight"] = sine_out.pop("net.2.weight")
    sine_out["net.2.linear.bias"] = sine_out.pop("net.2.bias")
    with pytest.raises(ValueError, match="outermost_linear"):
        cells2pixels_decoder(sine_out, channels=6)


def c2p_nca_step(x, sd, growing):
    """Their NCA.forward (models/nca2d.py) with every cell updating (M = 1)."""
    ident = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    lap_x = torch.tensor([[0.5, 0.0, 0.5], [2.0, -6.0, 2.0], [0.5, 0.0, 0.5]])
    filters = torch.stack([ident, sobel_x, sobel_x.T, lap_x + lap_x.T])
    b, ch, h, w = x.shape
    y = F.pad(x.reshape(b * ch, 1, h, w), [1, 1, 1, 1], "circular")
    z = F.conv2d(y, filters[:, None]).reshape(b, -1, h, w)
    ds = F.conv2d(torch.relu(F.conv2d(z, sd["w1.weight"], sd["w1.bias"])), sd["w2.weight"])
    new = x + ds
    if growing:
        alive = lambda s: F.max_pool2d(s[:, 3:4], 3, stride=1, padding=1) > 0.1
        new = new * (alive(x) & alive(new)).float()
    return new


@pytest.mark.parametrize("nca_type", ["NCA", "GrowingNCA"])
def test_cells2pixels_nca_matches_their_step(tmp_path, nca_type):
    C, fc = 8, 16
    g = torch.Generator().manual_seed(2)
    sd = {"w1.weight": torch.randn(fc, 4 * C, 1, 1, generator=g) * 0.1,
          "w1.bias": torch.randn(fc, generator=g) * 0.1,
          "w2.weight": torch.randn(C, fc, 1, 1, generator=g) * 0.1}
    nca = cells2pixels_nca(sd, nca_type=nca_type)
    x = torch.rand(1, C, 9, 11)
    ones = torch.ones(1, 1, 9, 11, dtype=torch.bool)
    got = nca.step(x, update_mask=ones, backend="reference")
    torch.testing.assert_close(got, c2p_nca_step(x, sd, nca_type == "GrowingNCA"), rtol=1e-5, atol=1e-5)
    # the folder loader: model.pth + siren.pth, read with weights_only=True
    torch.save(sd, tmp_path / "model.pth")
    torch.save(c2p_siren_state_dict(C, 0, 8, 2, 3, seed=1), tmp_path / "siren.pth")
    nca2, dec = load_cells2pixels(tmp_path, nca_type=nca_type, scale=4)
    assert dec.spec.channels == C and dec.spec.layers == 3 and dec.spec.scale == 4
    torch.testing.assert_close(nca2.step(x, update_mask=ones, backend="reference"), got)


BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="needs the interpreter"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cells2pixels_growing_border(tmp_path, backend):
    """Their GrowingNCA pools the alive mask with -inf outside the grid while its perception wraps:
    live cells on the border of a 12x18 grid step as their code steps them, on every backend, from an
    experiment folder imported with one call (config.yaml: NCA circular, renderer replicate)."""
    C, fc = 8, 16
    g = torch.Generator().manual_seed(5)
    sd = {"w1.weight": torch.randn(fc, 4 * C, 1, 1, generator=g) * 0.3,
          "w1.bias": torch.randn(fc, generator=g) * 0.1,
          "w2.weight": torch.randn(C, fc, 1, 1, generator=g) * 0.3}
    torch.save(sd, tmp_path / "model.pth")
    torch.save(c2p_siren_state_dict(C, 1, 8, 2, 4, seed=1), tmp_path / "siren.pth")
    (tmp_path / "config.yaml").write_text(
        "nca:\n  type: GrowingNCA\n  output_type: s\n  nca_kwargs: {channels: 8, fc_dim: 16, padding: circular}\n"
        "siren: {hidden_features: 8, hidden_layers: 2, num_frequencies: 1, first_omega_0: 10.0, "
        "hidden_omega_0: 10.0, outermost_linear: true, fx: linear, activation: sin}\n"
        "renderer: {scale_factor: 4, padding: replicate}\n")
    nca, dec = nca_fast.load_cells2pixels(tmp_path)
    assert (nca.spec.padding, nca.spec.alive_pool_padding, nca.spec.alive_channel) == ("circular", "ignore", 3)
    assert (dec.spec.padding, dec.spec.scale, dec.spec.frequencies, dec.spec.out_channels) == ("replicate", 4, 1, 4)
    x = torch.rand(2, C, 12, 18, generator=g) * 0.4
    x[:, 3] = (torch.rand(2, 12, 18, generator=g) < 0.25) * 0.3  # live and dead cells, on the border too
    want = c2p_nca_step(x, sd, growing=True)
    nca.requires_grad_(False)
    ones = torch.ones(2, 1, 12, 18, dtype=torch.bool)
    got = nca.step(x, update_mask=ones, backend=backend)
    border = torch.ones(12, 18, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert (want[:, :, border] == 0).any() and (want[:, :, border] != 0).any()  # the pool decided there
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rolled = nca.rollout(x, 3, seed=1, backend=backend)  # the pending alive form of the fused path
    torch.testing.assert_close(rolled, nca.rollout(x, 3, seed=1, backend="reference"), rtol=1e-4, atol=1e-4)


def test_cells2pixels_config_errors(tmp_path):
    sd = {"w1.weight": torch.zeros(16, 32, 1, 1), "w1.bias": torch.zeros(16), "w2.weight": torch.zeros(8, 16, 1, 1)}
    torch.save(sd, tmp_path / "model.pth")
    torch.save(c2p_siren_state_dict(8, 0, 8, 2, 3, seed=1), tmp_path / "siren.pth")
    for text, match in [("nca: {type: PENCA}\n", "unsupported NCA type 'PENCA'"),
                        ("siren: {fx: finer}\n", "fx='finer'"), ("nca: [1, 2\n", "not a readable YAML"),
                        ("- 1\n", "mapping at the top level"), ("nca: {output_type: z}\n", "output_type 'z'"),
                        ("nca: {nca_kwargs: {padding: bogus}}\n", "nca_kwargs.padding must be one of"),
                        ("nca: {nca_kwargs: {update_prob: 7}}\n", r"update_prob must be a number in \[0, 1\]"),
                        ("renderer: {scale_factor: 0}\n", "scale_factor must be a positive int")]:
        (tmp_path / "config.yaml").write_text(text)
        with pytest.raises(ModelFormatError, match=f"config.yaml: .*{match}"):
            nca_fast.load_cells2pixels(tmp_path)


def test_cells2pixels_nca_rejects_penca():
    sd = {"w1.weight": torch.zeros(16, 4 * 8 + 2, 1, 1), "w1.bias": torch.zeros(16),
          "w2.weight": torch.zeros(8, 16, 1, 1)}
    with pytest.raises(ValueError, match="PENCA"):
        cells2pixels_nca(sd)


def test_render_frames_yields_decoded_steps():
    from nca_fast.decoders import render_frames, to_uint8
    model = nca_fast.NCA(nca_fast.texture_spec(channels=6, hidden=16))
    dec = build_decoder(pixel_shuffle_spec(6, 2))
    x = model.seed(1, 5, 7)
    frames = list(render_frames(model, dec, x, 4, every=2, backend="reference"))
    assert [k for k, _ in frames] == [2, 4]
    state = model.rollout(x, 4, backend="reference")
    torch.testing.assert_close(frames[-1][1], dec(state))
    img = to_uint8(frames[-1][1])
    assert img.shape == (1, 10, 14, 3) and img.dtype == torch.uint8
