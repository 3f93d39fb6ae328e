"""``build_decoder(spec)``: the decoder module of a spec's kind."""
from __future__ import annotations

from .base import Decoder
from .lppn import LPPNDecoder
from .pixel_shuffle import PixelShuffleDecoder
from .spec import DecoderSpec

DECODERS = {"pixel_shuffle": PixelShuffleDecoder, "lppn": LPPNDecoder}


def build_decoder(spec: DecoderSpec, weights=None, *, init_seed: int = 0) -> Decoder:
    """The decoder module for ``spec`` (weights drawn from ``init_seed`` when not given)."""
    if not isinstance(spec, DecoderSpec):
        raise TypeError(f"spec must be a DecoderSpec, got {type(spec).__name__}")
    return DECODERS[spec.kind](spec, weights, init_seed=init_seed)
