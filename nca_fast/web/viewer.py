"""``nca-fast view``: a live viewer. A local ASGI server (Starlette + uvicorn, the ``view`` extra) runs
one simulation per open page on nca_fast's engine (the fused kernels on a GPU, the CPU path
otherwise) and streams its frames over a WebSocket; the page sends brush strokes (erase; shift: plant
a seed), pause / step / reset, steps per frame, the model (of a multi-model file) and the decoder's
scale.

Bounded: at most ``max_clients`` pages, grids up to ``MAX_VIEW_CELLS``, decoded frames up to
``MAX_FRAME_PIXELS``, and one frame in flight per page — a slow page gets fewer frames, the server
does not queue them. Nothing a page sends names a file: it picks among the models loaded at start.
"""
from __future__ import annotations

import asyncio
import json
import time
from importlib import resources
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..decoders import decode
from ..model import NCA
from ..utils.optional import optional_import

MAX_VIEW_CELLS = 1024 * 1024
MAX_FRAME_PIXELS = 2048 * 2048
MAX_STEPS_PER_FRAME = 64
FRAME_INTERVAL_S = 1 / 60


class Simulation:
    """One page's NCA: the state, its step counter and the page's settings."""

    def __init__(self, models: Dict[str, NCA], name: str, size: Tuple[int, int], decoder=None, seed: int = 0):
        self.models, self.size, self.decoder, self.seed = models, size, decoder, seed
        self.scale = 1
        self.paused, self.pending_steps, self.steps_per_frame = False, 0, 1
        self.select(name)

    def select(self, name: str) -> None:
        if name not in self.models:
            raise ValueError(f"unknown model {name[:80]!r}")
        self.name, self.model = name, self.models[name]
        self.reset()

    def reset(self) -> None:
        self.x = self.model.seed(1, *self.size)
        self.step_count = 0

    @torch.no_grad()
    def advance(self) -> int:
        """The steps this frame runs (paused: only those asked for with 'step')."""
        n = self.pending_steps if self.paused else self.steps_per_frame
        self.pending_steps = 0
        for _ in range(n):
            self.x = self.model.step(self.x, seed=self.seed, step=self.step_count % 2**32)
            self.step_count += 1
        return n

    @torch.no_grad()
    def brush(self, col: float, row: float, radius: float, plant: bool) -> None:
        H, W = self.size
        if plant:
            if self.model.spec.alive_channel is None:
                return
            i, j = int(row), int(col)
            if 0 <= i < H and 0 <= j < W:
                self.x[:, self.model.spec.alive_channel:, i, j] = 1.0
            return
        rows = torch.arange(H, device=self.x.device)[:, None] + 0.5
        cols = torch.arange(W, device=self.x.device)[None, :] + 0.5
        hit = (rows - row) ** 2 + (cols - col) ** 2 <= radius * radius
        self.x[:, :, hit] = 0.0

    @torch.no_grad()
    def frame(self) -> bytes:
        """An RGBA frame: ``uint32 width, uint32 height`` (little-endian), then the pixels."""
        if self.decoder is not None and self.scale > 1:
            H, W = self.size
            img = decode(self.decoder, self.x, size=(H * self.scale, W * self.scale))[:, :3].clamp(0, 1)
        else:
            img = self.model.to_rgb(self.x)
        rgb = (img[0].permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
        rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
        h, w = rgba.shape[:2]
        return np.array([w, h], "<u4").tobytes() + rgba.tobytes()

    def handle(self, msg: dict) -> None:
        """A message from the page, ``{"type": ..., ...}``; an unknown type or a missing or malformed
        field raises ValueError, KeyError or TypeError (the page gets it as an error message)."""
        kind = msg.get("type")
        if kind == "brush":
            self.brush(float(msg["col"]), float(msg["row"]), min(64.0, max(0.5, float(msg.get("radius", 4)))),
                       bool(msg.get("plant")))
        elif kind == "pause":
            self.paused = bool(msg.get("paused", not self.paused))
        elif kind == "step":
            self.pending_steps = min(MAX_STEPS_PER_FRAME, self.pending_steps + 1)
        elif kind == "reset":
            self.reset()
        elif kind == "steps_per_frame":
            self.steps_per_frame = max(1, min(MAX_STEPS_PER_FRAME, int(msg["n"])))
        elif kind == "model":
            self.select(str(msg["name"]))
        elif kind == "scale":
            if self.decoder is not None:  # (no decoder: the frame is the grid itself)
                H, W = self.size
                s = max(1, min(self.decoder.spec.scale * 4, int(msg["scale"])))
                if H * W * s * s <= MAX_FRAME_PIXELS:
                    self.scale = s
        else:
            raise ValueError(f"unknown message type {kind!r} (brush, pause, step, reset, steps_per_frame, "
                             "model, scale)")


def make_app(models: Dict[str, NCA], first: str, size: Tuple[int, int], *, decoder=None, max_clients: int = 4,
             sessions: Optional[list] = None):
    """The Starlette app; ``sessions`` (a list) receives each open page's Simulation (tests read it)."""
    starlette_apps = optional_import("starlette.applications", "view")
    routing = optional_import("starlette.routing", "view")
    responses = optional_import("starlette.responses", "view")
    ws_mod = optional_import("starlette.websockets", "view")
    page = resources.files(__package__).joinpath("viewer.html").read_text()
    live = [] if sessions is None else sessions

    async def index(request):
        return responses.HTMLResponse(page)

    async def stream(websocket):
        await websocket.accept()
        if len(live) >= max_clients:  # (accepted first, so that the page sees the reason)
            await websocket.close(code=1013, reason=f"at most {max_clients} pages at a time")
            return
        sim = Simulation(models, first, size, decoder)
        live.append(sim)
        await websocket.send_text(json.dumps({"type": "info", "models": list(models), "model": first,
                                              "size": list(size), "decoder": decoder is not None}))
        stop = asyncio.Event()

        async def _error(message: str) -> None:
            await websocket.send_text(json.dumps({"type": "error", "message": message[:200]}))

        async def receive():
            try:
                while True:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        raise ws_mod.WebSocketDisconnect(message.get("code", 1000))
                    try:
                        if message.get("text") is None:
                            raise ValueError("messages are JSON text, got a binary frame")
                        msg = json.loads(message["text"])
                        if not isinstance(msg, dict):
                            raise ValueError(f"a message is a JSON object with a \"type\", got {type(msg).__name__}")
                        sim.handle(msg)
                    except KeyError as e:
                        await _error(f"a {msg.get('type')!r} message needs the field {e}")
                    except (ValueError, TypeError) as e:
                        await _error(str(e))
            except ws_mod.WebSocketDisconnect:
                stop.set()

        receiver = asyncio.create_task(receive())
        frames, updates, t0 = 0, 0, time.perf_counter()
        try:
            while not stop.is_set():
                start = time.perf_counter()
                n, data = await asyncio.to_thread(lambda: (sim.advance(), sim.frame()))
                await websocket.send_bytes(data)  # one frame in flight: a slow page slows this loop down
                frames, updates = frames + 1, updates + n * size[0] * size[1]
                now = time.perf_counter()
                if now - t0 >= 0.5:
                    await websocket.send_text(json.dumps({"type": "stats", "fps": frames / (now - t0),
                                                          "cell_updates_per_s": updates / (now - t0),
                                                          "step": sim.step_count}))
                    frames, updates, t0 = 0, 0, now
                await asyncio.sleep(max(0.0, FRAME_INTERVAL_S - (time.perf_counter() - start)))
        except (ws_mod.WebSocketDisconnect, RuntimeError):
            pass
        finally:
            receiver.cancel()
            live.remove(sim)

    return starlette_apps.Starlette(routes=[routing.Route("/", index), routing.WebSocketRoute("/ws", stream)])


def check_view_size(size: Tuple[int, int]) -> None:
    H, W = size
    if H * W > MAX_VIEW_CELLS:
        raise ValueError(f"--size {H}x{W}: the viewer runs grids of up to {MAX_VIEW_CELLS} cells (e.g. 1024x1024)")
