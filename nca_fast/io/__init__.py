"""Model files: :func:`load` any supported format (detected from the content, never the extension)
and :func:`save` the native one.

Formats: the native safetensors file; Distill Growing-NCA WebGL JSON; Distill Self-Organising
Textures ``models.json`` (``name=`` picks a model); TF.js graph-model JSON; PyTorch port state
dicts (``torch.load(weights_only=True)``: nothing in a file is ever executed).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ..model import NCA
from . import native, textures, tfjs, torch_port, webgl
from .errors import ModelFormatError

__all__ = ["load", "save", "ModelFormatError"]

save = native.save


def load(path, name: Optional[str] = None) -> NCA:
    """Read the model in ``path``; ``name`` selects one model of a multi-model (texture) file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFormatError(path, "is a directory, not a model file")
    data = path.read_bytes()
    if native.matches(data[:9]):
        return native.load(_single(path, name), data)
    if data[:2] == b"PK" or data[:1] == b"\x80":  # torch zip archive / legacy pickle
        return torch_port.load(_single(path, name))
    text = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] not in (b"{", b"["):
        raise ModelFormatError(path, "unknown model format (not safetensors, a PyTorch file or JSON); "
                                     f"starts with {data[:16]!r}")
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFormatError(path, f"corrupt or truncated JSON ({e})") from None
    if textures.matches(obj):
        return textures.load(path, obj, name)
    for fmt in (webgl, tfjs):
        if fmt.matches(obj):
            return fmt.load(_single(path, name), obj)
    keys = list(obj)[:8] if isinstance(obj, dict) else f"a list of {len(obj)}"
    raise ModelFormatError(path, f"unknown JSON model format (top level: {keys}); expected Distill WebGL "
                                 "layers, a Distill textures models.json or a TF.js graph model")


def _single(path: Path, name: Optional[str]) -> Path:
    """``path``, after checking that no model ``name`` was asked of a single-model file."""
    if name is not None:
        raise ValueError(f"{os.fspath(path)} holds a single model; name={name!r} only applies to "
                         "multi-model (texture) files")
    return path
