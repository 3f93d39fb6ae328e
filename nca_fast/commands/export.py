"""``nca-fast export MODEL [--name N] --html out.html [--size HxW]``: a self-contained HTML page that runs
the model in the browser (WebGL2; weights inlined, no network requests, opens from file://)."""
from __future__ import annotations

from ..utils.files import check_output
from ..web import export_html, export_problem
from .info import BUILTINS, load_model
from .run import parse_size


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a self-contained HTML page that runs the model (WebGL2)",
                       description=__doc__)
    p.add_argument("model", help="model file, or a built-in: " + ", ".join(BUILTINS))
    p.add_argument("--name", help="model name inside a multi-model file (Distill textures)")
    p.add_argument("--html", required=True, help="output page (.html)")
    p.add_argument("--size", default="72x72", help="grid HxW (default 72x72)")
    p.set_defaults(func=run)


def run(args) -> int:
    check_output(args.html, (".html", ".htm"), "--html")
    size = parse_size(args.size)
    model = load_model(args.model, args.name)
    problem = export_problem(model)
    if problem:
        raise ValueError(problem)
    export_html(model, args.html, size, title=args.name or model.spec.name)
    print(f"wrote {args.html} ({model.spec.channels} channels, {size[0]}x{size[1]} grid)")
    return 0
