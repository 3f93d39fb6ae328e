"""High-resolution decoders: render a coarse NCA state as a large image (issue 5, Cells-to-Pixels).

    dec = nca_fast.decoders.build_decoder(lppn_spec(channels=12, scale=8))
    img = nca_fast.ops_decode.decode(dec, x)        # [B, 3, 8H, 8W]
"""
from .base import Decoder
from .spec import DecoderSpec, lppn_spec, pixel_shuffle_spec
from .pixel_shuffle import PixelShuffleDecoder, pixel_shuffle_decode
from .lppn import LPPNDecoder, lppn_decode
from .io import load_cells2pixels, load_decoder, save_decoder
from .fit import FitResult, fit_decoder
from .render import render_frames, to_uint8

DECODERS = {"pixel_shuffle": PixelShuffleDecoder, "lppn": LPPNDecoder}


def build_decoder(spec: DecoderSpec, weights=None, *, init_seed: int = 0) -> Decoder:
    """The decoder module for ``spec`` (weights drawn from ``init_seed`` when not given)."""
    if not isinstance(spec, DecoderSpec):
        raise TypeError(f"spec must be a DecoderSpec, got {type(spec).__name__}")
    return DECODERS[spec.kind](spec, weights, init_seed=init_seed)


__all__ = ["Decoder", "DecoderSpec", "lppn_spec", "pixel_shuffle_spec", "PixelShuffleDecoder",
           "LPPNDecoder", "pixel_shuffle_decode", "lppn_decode", "build_decoder", "save_decoder",
           "load_decoder", "load_cells2pixels", "fit_decoder", "FitResult", "render_frames",
           "to_uint8"]
