"""High-resolution decoders: render a coarse NCA state as a large image (after Pajouheshgar et al.,
*Neural Cellular Automata: From Cells to Pixels*, 2025).

    dec = nca_fast.decoders.build_decoder(lppn_spec(channels=12, scale=8))
    img = nca_fast.decoders.decode(dec, x)        # [B, 3, 8H, 8W]
"""
from .base import Decoder
from .build import DECODERS, build_decoder
from .decode import decode
from .fit import FitResult, fit_decoder
from .lppn import LPPNDecoder, lppn_decode
from .native import load_decoder, save_decoder
from .pixel_shuffle import PixelShuffleDecoder, pixel_shuffle_decode
from .render import render_frames, to_uint8
from .spec import DecoderSpec, lppn_spec, pixel_shuffle_spec

__all__ = ["Decoder", "DecoderSpec", "lppn_spec", "pixel_shuffle_spec", "PixelShuffleDecoder",
           "LPPNDecoder", "pixel_shuffle_decode", "lppn_decode", "build_decoder", "DECODERS", "decode",
           "save_decoder", "load_decoder", "fit_decoder", "FitResult", "render_frames", "to_uint8"]
