"""``nca-fast view MODEL [--name N] [--size HxW] [--decoder FILE] [--port P]``: a live viewer in the
browser, driven by nca_fast's engine on this machine (needs the ``view`` extra: starlette, uvicorn)."""
from __future__ import annotations

import socket

from ..decoders import load_decoder
from ..io import model_names
from ..utils.checks import device_arg
from ..utils.optional import optional_import
from ..web.viewer import check_view_size, make_app
from .info import BUILTINS, load_model
from .run import parse_size


def add_parser(sub) -> None:
    p = sub.add_parser("view", help="watch a model live in the browser (local server)", description=__doc__)
    p.add_argument("model", help="model file, or a built-in: " + ", ".join(BUILTINS))
    p.add_argument("--name", help="the first model of a multi-model file (the page picks among all)")
    p.add_argument("--size", default="72x72", help="grid HxW (default 72x72)")
    p.add_argument("--decoder", help="a decoder file for high-resolution frames")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--max-clients", type=int, default=4, help="pages served at once (default 4)")
    p.add_argument("--device", default="auto", help="torch device (auto: cuda when available)")
    p.set_defaults(func=run)


def load_models(model: str, name, device):
    """{name: NCA} for every model of the file (one for single-model files and built-ins), and the first."""
    names = None if model in BUILTINS else model_names(model)
    if names is None:
        m = load_model(model, name)
        return {m.spec.name or model: m.to(device).requires_grad_(False)}, m.spec.name or model
    if name is not None and name not in names:
        raise ValueError(f"{model} has no model {name!r}")
    return {n: load_model(model, n).to(device).requires_grad_(False) for n in names}, name or names[0]


def run(args) -> int:
    uvicorn = optional_import("uvicorn", "view")
    size = parse_size(args.size)
    check_view_size(size)
    if not 1 <= args.max_clients <= 64 or not 0 <= args.port <= 65535:
        raise ValueError("--max-clients must be in [1, 64] and --port in [0, 65535]")
    device = device_arg(args.device)
    models, first = load_models(args.model, args.name, device)
    decoder = load_decoder(args.decoder).to(device) if args.decoder else None
    for name, m in models.items() if decoder is not None else ():  # (before serving, as run does)
        if decoder.spec.channels != m.spec.channels:
            raise ValueError(f"decoder {args.decoder} takes {decoder.spec.channels} channels, model {name!r} has "
                             f"{m.spec.channels}")
    app = make_app(models, first, size, decoder=decoder, max_clients=args.max_clients)
    sock = _bind(args.host, args.port)  # (a busy port is an error here, before the address is shown)
    port = sock.getsockname()[1]  # (--port 0: the free port the system picked)
    print(f"nca-fast view: http://{args.host}:{port}/  ({len(models)} model(s), {size[0]}x{size[1]}, "
          f"{device}; Ctrl-C stops)", flush=True)
    with sock:
        try:
            uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
        except KeyboardInterrupt:  # (uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop)
            pass
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; an address in use or not of this machine raises OSError
    naming it."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise OSError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (not SO_REUSEPORT: a busy port fails)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    return sock
