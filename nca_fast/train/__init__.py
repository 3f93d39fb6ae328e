"""Training: Distill's growing recipe (:func:`train_growing`, ``nca-fast train``) and texture
training with a feature network you supply (:func:`train_texture`). Rollouts run on the model's
differentiable backends (the fused step and its backward on CUDA; on a CPU the reference, or the CPU
fast path and its backward where the reference's graph would not fit in memory)."""
from .growing import (
    GrowingConfig,
    TrainResult,
    distill_weights,
    load_target,
    normalise_gradients,
    rgba_loss,
    train_growing,
)
from .texture import TextureConfig, gram, style_loss, train_texture

__all__ = ["GrowingConfig", "TrainResult", "distill_weights", "load_target", "normalise_gradients", "rgba_loss",
           "train_growing",
           "TextureConfig", "gram", "style_loss", "train_texture"]
