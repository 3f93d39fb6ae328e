"""nca_fast: Neural Cellular Automata at the speed limit of the GPU.

    import nca_fast
    model = nca_fast.load("ex1_lizard.json")        # or nca_fast.NCA(nca_fast.growing_spec())
    model.requires_grad_(False)                      # inference (rollouts are differentiable otherwise)
    x = model.seed(height=72, width=72)
    x = model.rollout(x, 200, seed=0)
    rgb = model.to_rgb(x)                            # [B, 3, H, W] in [0, 1]

Set ``TRITON_INTERPRET=1`` before importing nca_fast to run the fused kernels on CPU tensors.
"""
from ._version import __version__
from .decoders import DecoderSpec, build_decoder, decode, fit_decoder, load_decoder, save_decoder
from .io import load, load_cells2pixels, save
from .model import NCA, random_weights
from .rng import update_mask
from .spec import Filter, NCASpec, growing_spec, texture_spec

__all__ = ["NCA", "NCASpec", "Filter", "growing_spec", "texture_spec", "random_weights",
           "update_mask", "load", "save", "load_cells2pixels", "DecoderSpec", "build_decoder", "decode",
           "fit_decoder", "load_decoder", "save_decoder", "__version__"]
