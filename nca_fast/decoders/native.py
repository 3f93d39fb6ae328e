"""Save and load decoders: the native weights format (:mod:`nca_fast.weights_file`) with metadata
``{"format": "nca_fast.decoder/1", "spec": DecoderSpec JSON}``."""
from __future__ import annotations

from pathlib import Path

from ..utils import weights_file
from ..utils.files import InputFileError
from .build import build_decoder
from .spec import DecoderSpec

FORMAT = "nca_fast.decoder/1"


def save_decoder(decoder, path) -> Path:
    """Write ``decoder`` to ``path`` (safetensors); atomic, and refused for non-finite weights."""
    meta = {"format": FORMAT, "spec": decoder.spec.to_json()}
    return weights_file.write(path, decoder.params(), meta, "decoder weight")


def load_decoder(path, device=None):
    """Read a decoder written by :func:`save_decoder`."""
    tensors, meta = weights_file.read(path, "decoder file")
    if meta.get("format") != FORMAT:
        raise InputFileError(path, f"not an nca_fast decoder (format tag {str(meta.get('format'))[:40]!r}, "
                                   f"expected {FORMAT!r})")
    try:
        spec = DecoderSpec.from_json(meta["spec"])
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise InputFileError(path, f"corrupt decoder spec metadata ({str(e)[:300]})") from None
    try:
        dec = build_decoder(spec, tensors)
    except (TypeError, ValueError) as e:
        raise InputFileError(path, str(e)) from None
    return dec if device is None else dec.to(device)
