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
from typing import List, Optional

from ..model import NCA
from ..utils.files import MAX_MODEL_BYTES, read_input
from . import native, textures, tfjs, torch_port, webgl
from .cells2pixels import cells2pixels_decoder, cells2pixels_nca, load_cells2pixels
from .errors import ModelFormatError

__all__ = ["load", "save", "model_names", "ModelFormatError", "load_cells2pixels", "cells2pixels_nca",
           "cells2pixels_decoder"]

save = native.save
# What a malformed file makes an importer's structural checks trip over, beyond its own errors.
_MALFORMED = (AttributeError, TypeError, KeyError, IndexError, NotImplementedError, OverflowError,
              MemoryError, RecursionError, ValueError)


def load(path, name: Optional[str] = None) -> NCA:
    """Read the model in ``path``; ``name`` selects one model of a multi-model (texture) file."""
    data = read_input(path, limit=MAX_MODEL_BYTES, what="model file", error=ModelFormatError)
    path = Path(path)
    if native.matches(data[:9]):
        return _guarded(native.load, _single(path, name), data)
    if data[:2] == b"PK" or data[:1] == b"\x80":  # torch zip archive / legacy pickle
        return _guarded(torch_port.load, _single(path, name), data)
    text = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] not in (b"{", b"["):
        raise ModelFormatError(path, "unknown model format (not safetensors, a PyTorch file or JSON); "
                                     f"starts with {data[:16]!r}")
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except RecursionError:
        raise ModelFormatError(path, "JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFormatError(path, f"corrupt or truncated JSON ({str(e)[:200]})") from None
    if textures.matches(obj):
        return _guarded(textures.load, path, obj, name)
    for fmt in (webgl, tfjs):
        if fmt.matches(obj):
            return _guarded(fmt.load, _single(path, name), obj)
    keys = ([str(k)[:40] for k in list(obj)[:8]] or "an empty object") if isinstance(obj, dict) else \
        f"a list of {len(obj)}"
    raise ModelFormatError(path, f"unknown JSON model format (top level: {keys}); expected Distill WebGL "
                                 "layers, a Distill textures models.json or a TF.js graph model")


def model_names(path) -> Optional[List[str]]:
    """The model names of a multi-model (Distill textures) file; None for a single-model file."""
    data = read_input(path, limit=MAX_MODEL_BYTES, what="model file", error=ModelFormatError)
    if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] != b"{":
        return None
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except (RecursionError, UnicodeDecodeError, ValueError):
        return None  # (load reports it)
    return textures.names(Path(path), obj) if textures.matches(obj) else None


def _guarded(importer, path: Path, *args) -> NCA:
    """``importer(path, *args)``, with whatever a malformed file makes it trip over reported as the
    file's format error."""
    try:
        return importer(path, *args)
    except ModelFormatError:
        raise
    except _MALFORMED as e:
        raise ModelFormatError(path, f"malformed model file ({type(e).__name__}: {str(e)[:300]})") from None


def _single(path: Path, name: Optional[str]) -> Path:
    """``path``, after checking that no model ``name`` was asked of a single-model file."""
    if name is not None:
        raise ValueError(f"{os.fspath(path)} holds a single model; name={name!r} only applies to "
                         "multi-model (texture) files")
    return path
