"""``nca-fast info MODEL [--name N]``: print a model's spec and parameter count."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ..io import load
from ..model import NCA
from ..spec import growing_spec, texture_spec
from . import described

# Random-weight default NCAs, so that examples run without model files.
BUILTINS = {"growing": growing_spec, "texture": texture_spec}


def load_model(model: str, name: Optional[str] = None) -> NCA:
    """A model file (any format :func:`nca_fast.load` reads) or a built-in name (``growing``,
    ``texture``: random weights) when no such file exists."""
    if model in BUILTINS and not Path(model).exists():
        if name is not None:
            raise ValueError(f"built-in model {model!r} takes no --name")
        return NCA(BUILTINS[model](name=model))
    return load(model, name=name)


def describe(model: NCA) -> str:
    """A readable multi-line summary of ``model``'s spec and parameters."""
    s = model.spec
    row = lambda k, v: f"{k + ':':<18} {v}"
    lines = [row("model", s.name or "(unnamed)")]
    lines += [row(f.name, getattr(s, f.name)) for f in dataclasses.fields(s)
              if f.name not in ("name", "filters")]
    lines.append(row("filters", f"{s.n_filters} (perception size {s.perception_size}, blocked order)"))
    for flt in s.filters:
        taps = "  ".join("[" + ", ".join(f"{v:g}" for v in row) + "]" for row in flt.taps)
        lines.append(f"  {flt.name:<16} {taps}")
    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in s.parameter_shapes().items())
    n = sum(p.numel() for p in model.parameters())
    lines.append(row("parameters", f"{n:,} ({shapes})"))
    lines.append(row("flops/cell/step", f"{s.flops_per_cell():,}"))
    return "\n".join(lines)


def run(args) -> int:
    print(describe(load_model(args.model, args.name)))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="print a model's spec and parameter count",
                       description=described(__doc__))
    p.add_argument("model", help="model file, or a built-in: " + ", ".join(BUILTINS))
    p.add_argument("--name", help="model name inside a multi-model file (Distill textures)")
    p.set_defaults(func=run)
