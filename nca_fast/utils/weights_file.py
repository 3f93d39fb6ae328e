"""The native weights format of NCAs and decoders: safetensors (float32 tensors) with a format tag
and a spec as JSON in the metadata, read from a bounded regular file and written atomically."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Tuple, Type

import torch

from .files import MAX_MODEL_BYTES, InputFileError, atomic_write_bytes, read_input
from .optional import optional_import


def write(path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], what: str) -> Path:
    """Write float32 copies of ``tensors`` with ``meta`` to ``path``; refuses non-finite weights
    (they could not be read back) before anything is written."""
    st = optional_import("safetensors.torch", "formats")
    out = {}
    for name, t in tensors.items():
        t32 = t.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(t32).all():
            raise ValueError(f"{what} {name!r} has NaN, inf or values beyond float32: refusing to write {path}")
        out[name] = t32
    return atomic_write_bytes(path, st.save(out, metadata=dict(meta)))


def read(path, what: str, error: Type[InputFileError] = InputFileError) -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a safetensors file (bounded: ``files.MAX_MODEL_BYTES``)."""
    return parse(path, read_input(path, limit=MAX_MODEL_BYTES, what=what, error=error), error)


def parse(path, data: bytes, error: Type[InputFileError] = InputFileError) -> Tuple[Dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of safetensors bytes; corrupt input raises ``error`` naming ``path``."""
    st = optional_import("safetensors.torch", "formats")
    n = int.from_bytes(data[:8], "little")
    if n >= 2**40 and data[:64].lstrip()[:1] in (b"{", b"["):  # (a safetensors header is not 1 TB long)
        raise error(path, "not a safetensors file but JSON text (a model's JSON? this needs safetensors)")
    try:
        if not 0 < n <= len(data) - 8:
            raise ValueError(f"header length {n} does not fit in {len(data)} bytes")
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("__metadata__ is not an object")
        tensors = st.load(data)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise error(path, f"corrupt or truncated safetensors file ({str(e)[:200]})") from None
    except Exception as e:  # noqa: BLE001  safetensors raises its own error type for corrupt input
        raise error(path, f"corrupt or truncated safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
    return tensors, meta
