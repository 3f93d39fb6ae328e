"""The native format: safetensors holding ``w1, b1, w2, b2`` (float32, nn.Linear layout) with the
NCASpec JSON, a format tag and a version in the metadata. Written atomically."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..model import NCA
from ..spec import NCASpec
from .common import make_nca
from .errors import ModelFormatError, optional_import

FORMAT_TAG = "nca_fast"
FORMAT_VERSION = 1


def matches(head: bytes) -> bool:
    """Whether a file starts like safetensors: a little-endian u64 header length, then ``{``.
    Text files never match (their first 8 bytes read as a length above 2**56); a truncated
    safetensors file does, to be reported as truncated."""
    return len(head) >= 9 and 0 < int.from_bytes(head[:8], "little") < 2**40 and head[8:9] == b"{"


def save(model: NCA, path) -> None:
    """Write ``model`` to ``path`` (safetensors). A crash leaves either the old file or the new one."""
    if not isinstance(model, NCA):
        raise TypeError(f"save expects an nca_fast.NCA, got {type(model).__name__}")
    st = optional_import("safetensors.torch", "formats")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.params().items()}
    meta = {"format": FORMAT_TAG, "format_version": str(FORMAT_VERSION), "spec": model.spec.to_json()}
    data = st.save(tensors, metadata=meta)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600 files
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path, data: bytes) -> NCA:
    st = optional_import("safetensors.torch", "formats")
    try:
        tensors = st.load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except Exception as e:  # noqa: BLE001  safetensors raises its own error type for corrupt input
        raise ModelFormatError(path, f"corrupt or truncated safetensors file ({e})") from None
    if meta.get("format") != FORMAT_TAG:
        raise ModelFormatError(path, "safetensors file without nca_fast metadata (format tag "
                                     f"{meta.get('format')!r}); save models with nca_fast.save")
    version = meta.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ModelFormatError(path, f"format version {version!r} is not supported (this nca_fast "
                                     f"reads up to {FORMAT_VERSION}); upgrade nca_fast")
    try:
        spec = NCASpec.from_json(meta.get("spec", ""))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ModelFormatError(path, f"invalid spec in the metadata ({e})") from None
    return make_nca(path, spec, tensors)
