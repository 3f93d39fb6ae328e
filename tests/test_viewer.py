"""``nca-fast view`` in a real browser: the page loads, frames arrive and change, a brush stroke erases
cells in the server's state, the model picker switches models, a page beyond --max-clients is refused;
bad files and oversized grids fail on the command line before any server starts."""
import json
import os
import shutil
import socket
import threading
import time

import pytest

import nca_fast as nf
from nca_fast.cli import main

uvicorn = pytest.importorskip("uvicorn", reason="the viewer needs the view extra (starlette, uvicorn)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright (the test extra)")
from nca_fast.web.viewer import Simulation, make_app  # noqa: E402

CHROMIUM = os.environ.get("NCA_FAST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    """A viewer of two texture models on a 24x32 grid, served from a thread; yields (url, sessions)."""
    models = {n: nf.NCA(nf.texture_spec(name=n), init_seed=i).requires_grad_(False) for i, n in enumerate("ab")}
    sessions = []
    port = _free_port()
    config = uvicorn.Config(make_app(models, "a", (24, 32), max_clients=1, sessions=sessions), host="127.0.0.1",
                            port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", sessions
    srv.should_exit = True
    thread.join(10)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (apt-get install chromium)")
def test_viewer_streams_frames_and_the_brush_erases_server_state(server):
    url, sessions = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("window.viewerStats.frames > 3", timeout=30000)
        first = page.evaluate("() => document.getElementById('view').toDataURL()")
        page.wait_for_function("window.viewerStats.frames > 20", timeout=30000)
        assert page.evaluate("() => document.getElementById('view').toDataURL()") != first  # frames change
        page.wait_for_function("window.viewerStats.lastStep > 0", timeout=30000)  # live stats
        assert "cell-updates/s" in page.inner_text("#status")
        assert len(sessions) == 1
        sim = sessions[0]
        page.click("#pause")
        page.wait_for_timeout(300)
        box = page.locator("#view").bounding_box()  # a stroke across the middle row, left to right
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + 2, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] - 2, y, steps=12)
        page.mouse.up()
        page.wait_for_timeout(500)
        assert float(sim.x[0, :, 11:13].abs().max()) == 0.0  # the server's state, erased along the stroke
        assert float(sim.x.abs().max()) > 0  # the rest is not
        page.select_option("#model", "b")
        page.wait_for_timeout(500)
        assert sim.name == "b"
        second = browser.new_page()  # beyond --max-clients: refused, the first page keeps running
        second.goto(url)
        second.wait_for_function("document.getElementById('status').textContent.startsWith('disconnected')",
                                 timeout=30000)
        assert "at most 1 pages" in second.inner_text("#status")
        browser.close()


def test_bad_page_messages_get_errors_that_name_the_problem(server):
    """A binary frame, JSON that is not an object, an unknown type or a missing field: the page gets
    an error message saying which (the stream goes on)."""
    connect = pytest.importorskip("websockets.sync.client", reason="needs the websockets client").connect
    url, _ = server
    with connect(url.replace("http://", "ws://") + "ws") as ws:
        def error_after(payload) -> str:
            ws.send(payload)
            while True:  # (past the binary frames and the info message)
                m = ws.recv(timeout=30)
                if isinstance(m, str) and json.loads(m)["type"] == "error":
                    return json.loads(m)["message"]

        assert error_after(b"\x00\x01") == "messages are JSON text, got a binary frame"
        assert "a message is a JSON object" in error_after("[1, 2, 3]")
        assert "unknown message type 'nope'" in error_after('{"type": "nope"}')
        assert error_after('{"type": "brush"}') == "a 'brush' message needs the field 'col'"
        ws.send('{"type": "pause", "paused": true}')  # (still served)


def test_simulation_handles_page_messages_and_ignores_bad_ones():
    sim = Simulation({"g": nf.NCA(nf.growing_spec(channels=8, hidden=16))}, "g", (10, 12))
    sim.handle({"type": "steps_per_frame", "n": 10**9})
    assert sim.steps_per_frame == 64
    sim.handle({"type": "brush", "col": 6, "row": 2, "radius": 1, "plant": True})
    assert float(sim.x[0, 3:, 2, 6].min()) == 1.0
    sim.handle({"type": "pause", "paused": True})
    assert sim.advance() == 0
    sim.handle({"type": "step"})
    assert sim.advance() == 1 and sim.step_count == 1
    with pytest.raises(ValueError, match="unknown model"):
        sim.handle({"type": "model", "name": "../../etc/passwd"})
    frame = sim.frame()
    assert int.from_bytes(frame[:4], "little") == 12 and len(frame) == 8 + 10 * 12 * 4


def test_view_errors_come_from_the_command_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nothing": 1}))
    assert main(["view", str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert main(["view", "growing", "--size", "4096x4096"]) == 2
    assert "4096x4096" in capsys.readouterr().err
    assert main(["view", "growing", "--max-clients", "0"]) == 2
    from nca_fast.decoders import build_decoder, pixel_shuffle_spec, save_decoder
    save_decoder(build_decoder(pixel_shuffle_spec(12, scale=2)), tmp_path / "tex.safetensors")
    assert main(["view", "growing", "--decoder", str(tmp_path / "tex.safetensors")]) == 2
    assert "takes 12 channels, model 'growing' has 16" in capsys.readouterr().err
    import socket
    with socket.socket() as busy:  # a port in use: the command's error, before any address is shown
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["view", "growing", "--size", "8x8", "--port", str(port), "--device", "cpu"]) == 2
    out = capsys.readouterr()
    assert f"nca-fast view: error: cannot serve on 127.0.0.1:{port}" in out.err and "http://" not in out.out


def test_simulation_renders_through_a_decoder_at_the_pages_scale():
    from nca_fast.decoders import build_decoder, pixel_shuffle_spec

    spec = nf.texture_spec()
    dec = build_decoder(pixel_shuffle_spec(spec.channels, scale=4, out_channels=3))
    sim = Simulation({"t": nf.NCA(spec).requires_grad_(False)}, "t", (6, 8), decoder=dec)
    assert int.from_bytes(sim.frame()[:4], "little") == 8
    sim.handle({"type": "scale", "scale": 4})
    frame = sim.frame()
    assert int.from_bytes(frame[:4], "little") == 32 and int.from_bytes(frame[4:8], "little") == 24
    sim.handle({"type": "scale", "scale": 10**6})  # beyond what the decoder and the frame cap allow: kept
    assert sim.scale <= 16


def test_view_command_serves_the_page_and_stops_cleanly_on_ctrl_c():
    import signal
    import subprocess
    import sys
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nca_fast.cli", "view", "growing", "--size", "16x16", "--port",
                             str(port), "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        for _ in range(100):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.1)
        assert "nca_fast viewer" in body
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
