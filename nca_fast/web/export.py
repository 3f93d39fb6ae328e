"""``nca-fast export MODEL --html out.html``: one self-contained HTML page (weights inlined, no network
request, works from ``file://``) that runs the NCA in the browser with WebGL2 (``nca.js``: the spec's
filters, padding, MLP, clamps, fire rate and alive masks in generated fragment shaders), with a brush
that erases cells (shift: plants a seed, for growing models), pause / step / reset, steps per frame
and live frames/s and cell-updates/s."""
from __future__ import annotations

import base64
import html
import json
from importlib import resources
from typing import Tuple

import torch

from ..model import NCA
from ..utils.files import atomic_write_bytes, check_output

MAX_RENDER_TARGETS = 8  # WebGL2's guaranteed MAX_DRAW_BUFFERS is 4; desktop GPUs and SwiftShader give 8
MAX_CELLS = 4096 * 4096


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode()


def export_problem(model: NCA) -> str:
    """Why ``model`` cannot run in the page ('' when it can)."""
    s = model.spec
    if s.activation != "relu":
        return f"the web page runs ReLU MLPs, this model uses {s.activation!r}"
    if -(-s.channels // 4) > MAX_RENDER_TARGETS:
        return f"the web page takes up to {4 * MAX_RENDER_TARGETS} channels, this model has {s.channels}"
    return ""


def page(model: NCA, size: Tuple[int, int] = (72, 72), *, title: str = "", scale: int = 0) -> str:
    """The HTML of the page for ``model`` on a ``size`` (H, W) grid."""
    problem = export_problem(model)
    if problem:
        raise ValueError(problem)
    H, W = size
    if not (1 <= H and 1 <= W and H * W <= MAX_CELLS):
        raise ValueError(f"grid {H}x{W}: the page takes 1 to {MAX_CELLS} cells")
    scale = scale or max(1, min(8, 640 // max(H, W)))
    weights = {"w1": _b64(model.w1), "w2": _b64(model.w2)}
    for name in ("b1", "b2"):
        if hasattr(model, name):
            weights[name] = _b64(getattr(model, name))
    data = {"spec": json.loads(model.spec.to_json()), "height": H, "width": W, "weights": weights}
    script = resources.files(__package__).joinpath("nca.js").read_text()
    template = resources.files(__package__).joinpath("page.html").read_text()
    model_json = json.dumps(data).replace("</", "<\\/")  # (never closes the script element)
    title = html.escape(title or model.spec.name or "NCA")
    seed_hint = ", shift+click: plant a seed" if model.spec.alive_channel is not None else ""
    out = template.replace("__SCRIPT__", script).replace("__MODEL__", model_json)
    return (out.replace("__TITLE__", title).replace("__CW__", str(W * scale)).replace("__CH__", str(H * scale))
            .replace("__SEEDHINT__", seed_hint))


def export_html(model: NCA, path, size: Tuple[int, int] = (72, 72), *, title: str = "") -> None:
    """Write the page to ``path`` (.html), atomically."""
    out = check_output(path, (".html", ".htm"), "--html")
    if not bool(torch.isfinite(torch.cat([p.detach().flatten() for p in model.parameters()])).all()):
        raise ValueError("the model has non-finite weights: refusing to export it")
    atomic_write_bytes(out, page(model, size, title=title).encode())



