"""The native format: safetensors holding ``w1, b1, w2, b2`` (float32, nn.Linear layout) with the
NCASpec JSON, a format tag and a version in the metadata (see :mod:`nca_fast.weights_file`)."""
from __future__ import annotations

from ..model import NCA
from ..spec import NCASpec
from ..utils import weights_file
from .common import make_nca
from .errors import ModelFormatError

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
    meta = {"format": FORMAT_TAG, "format_version": str(FORMAT_VERSION), "spec": model.spec.to_json()}
    weights_file.write(path, model.params(), meta, "weight")


def load(path, data: bytes) -> NCA:
    tensors, meta = weights_file.parse(path, data, ModelFormatError)
    tag = str(meta.get("format"))[:40]
    if tag.startswith("nca_fast.decoder"):
        raise ModelFormatError(path, f"an nca_fast decoder (format tag {tag!r}), not a model: give it as "
                                     "--decoder, or load it with nca_fast.load_decoder")
    if tag.startswith("nca_fast.train"):
        raise ModelFormatError(path, f"an nca_fast training checkpoint (format tag {tag!r}), not a model: "
                                     "`nca-fast train --checkpoint FILE --resume` continues it; the model is --out")
    if meta.get("format") != FORMAT_TAG:
        raise ModelFormatError(path, f"safetensors file without nca_fast model metadata (format tag {tag!r}); "
                                     "save models with nca_fast.save")
    version = meta.get("format_version", "")
    if not isinstance(version, str) or not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ModelFormatError(path, f"format version {str(version)[:20]!r} is not supported (this nca_fast "
                                     f"reads up to {FORMAT_VERSION}); upgrade nca_fast")
    if not meta.get("spec"):
        raise ModelFormatError(path, "no spec in the metadata (nca_fast.save writes one): the file lost its "
                                     "architecture")
    try:
        spec = NCASpec.from_json(meta["spec"])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise ModelFormatError(path, f"invalid spec in the metadata ({str(e)[:300]})") from None
    return make_nca(path, spec, tensors)
