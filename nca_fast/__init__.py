"""nca_fast: Neural Cellular Automata at the speed limit of the GPU.

    import nca_fast
    model = nca_fast.load("ex1_lizard.json")        # or nca_fast.NCA(nca_fast.growing_spec())
    x = model.seed(height=72, width=72)
    x = model.rollout(x, 200, seed=0)
    rgb = model.to_rgb(x)                            # [B, 3, H, W] in [0, 1]
"""
from .model import NCA, random_weights
from .spec import Filter, NCASpec, growing_spec, texture_spec
from .rng import update_mask
from .io import load, save
from .decoders import DecoderSpec, build_decoder, fit_decoder, load_decoder, save_decoder

__version__ = "0.1.0"
__all__ = ["NCA", "NCASpec", "Filter", "growing_spec", "texture_spec", "random_weights",
           "update_mask", "load", "save", "DecoderSpec", "build_decoder", "fit_decoder", "load_decoder",
           "save_decoder", "__version__"]
