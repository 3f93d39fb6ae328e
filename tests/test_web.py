"""The exported page in a real browser (headless Chromium from the Debian package, driven by
Playwright): given all-ones update masks it steps the growing and the texture model as the reference
does, the brush erases cells, it makes no network request from file://; bad input fails on the command
line, not in a broken page."""
import os
import shutil

import pytest
import torch

import nca_fast as nf
from nca_fast.cli import main
from nca_fast.web import export_html

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright (the test extra)")
CHROMIUM = os.environ.get("NCA_FAST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (apt-get install chromium, or set "
                                                         "NCA_FAST_CHROMIUM)")
ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _open(browser, path):
    page = browser.new_page()
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script("window.NCA_TEST_MODE = true")  # no frame loop: the test steps the page itself
    page.goto(path.as_uri())
    page.wait_for_function("window.ncaTest !== undefined || document.getElementById('status').textContent"
                           ".startsWith('error')", timeout=30000)
    assert not errors and page.inner_text("#status") == "ready", (errors, page.inner_text("#status"))
    return page, requests


def _state(spec, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, spec.channels, H, W, generator=g) - 0.4
    if spec.alive_channel is not None:  # live and dead cells, so that both alive masks matter
        x[:, spec.alive_channel] = (torch.rand(1, H, W, generator=g) < 0.5) * torch.rand(1, H, W, generator=g)
    return x


def _set(page, x):
    page.evaluate("s => ncaTest.setState(s)", x[0].permute(1, 2, 0).flatten().tolist())


def _get(page, spec, H, W):
    return torch.tensor(page.evaluate("() => ncaTest.getState()")).view(H, W, spec.channels).permute(2, 0, 1)[None]


@pytest.mark.parametrize("spec", [nf.growing_spec(padding="circular", alive_padding="replicate"), nf.growing_spec(),
                                  nf.texture_spec(), nf.texture_spec(padding="replicate")],
                         ids=["growing-circular", "growing-zeros", "texture-circular", "texture-replicate"])
def test_exported_page_steps_as_the_reference(browser, tmp_path, spec):
    H, W, steps = 11, 14, 4
    model = nf.NCA(spec, init_seed=3).requires_grad_(False)
    path = tmp_path / "page.html"
    export_html(model, path, (H, W))
    page, requests = _open(browser, path)
    x = _state(spec, H, W, 1)
    _set(page, x)
    assert torch.equal(_get(page, spec, H, W), x)  # float32 textures: the state goes in and out exactly
    page.evaluate("() => ncaTest.setFireRate(1.0)")
    page.evaluate(f"() => ncaTest.step({steps})")
    want = x
    for _ in range(steps):
        want = model.step(want, update_mask=torch.ones(1, 1, H, W, dtype=torch.bool), backend="reference")
    got = _get(page, spec, H, W)
    assert float((want - x).abs().max()) > 0.05  # the steps did something
    assert float((got - want).abs().max()) <= 1e-3 * max(1.0, float(want.abs().max()))  # 16-bit tolerance
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    page.close()


def test_brush_erases_cells(browser, tmp_path):
    spec = nf.texture_spec()
    model = nf.NCA(spec, init_seed=4).requires_grad_(False)
    path = tmp_path / "page.html"
    export_html(model, path, (10, 12))
    page, _ = _open(browser, path)
    x = _state(spec, 10, 12, 2) + 1.0  # no cell is zero
    _set(page, x)
    page.evaluate("() => ncaTest.brush(6.0, 5.0, 2.5)")  # texel coordinates: column 6, row 5
    got = _get(page, spec, 10, 12)
    rows, cols = torch.meshgrid(torch.arange(10) + 0.5, torch.arange(12) + 0.5, indexing="ij")
    hit = (cols - 6.0) ** 2 + (rows - 5.0) ** 2 <= 2.5 ** 2
    assert hit.sum() > 10 and bool((got[0][:, hit] == 0).all()) and torch.equal(got[0][:, ~hit], x[0][:, ~hit])
    page.close()


def test_export_errors_come_from_the_command_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not a model")
    out = tmp_path / "page.html"
    assert main(["export", str(bad), "--html", str(out)]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert main(["export", "growing", "--html", str(out), "--size", "5000x5000"]) == 2
    assert "5000x5000" in capsys.readouterr().err
    assert main(["export", "growing", "--html", str(tmp_path / "page.txt")]) == 2
    assert not out.exists() and not (tmp_path / "page.txt").exists()
    assert main(["export", "growing", "--html", str(out), "--size", "8x8"]) == 0 and out.stat().st_size > 10000
