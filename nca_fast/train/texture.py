"""Train a texture NCA the way Distill's *Self-Organising Textures* does, with your feature network.

The published recipe matches Gram matrices of VGG-16 activations of the rendered state to those of
the target image. nca_fast downloads nothing, so the feature network is yours: any callable from
RGB images ``[B, 3, H, W]`` in [0, 1] to a list of feature maps ``[B, K_i, H_i, W_i]`` (e.g. the
first conv blocks of ``torchvision.models.vgg16(weights="IMAGENET1K_V1").features``, with its
ImageNet normalisation). Per iteration, as Distill's PyTorch texture notebook: a batch of 4 from a
pool of 1024 states (the first replaced by the seed every 8 iterations), 32-95 steps, the style loss of
the unclipped image plus an overflow loss that keeps the state in [-1, 1] (``|x - clamp(x, -1, 1)|``
summed), per-parameter gradient normalisation, Adam 1e-3 (x0.3 from iterations 1000 and 2000).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..model import NCA
from ..spec import NCASpec, texture_spec
from ..utils.checks import check_int
from .growing import TrainResult, distill_weights, normalise_gradients
from .pool import SamplePool
from .progress import Progress

Features = Callable[[torch.Tensor], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class TextureConfig:
    size: int = 128  # the grid's side during training
    batch: int = 4
    pool: int = 1024
    min_steps: int = 32  # rollout lengths: min_steps .. max_steps, both included
    max_steps: int = 95
    lr: float = 1e-3
    lr_decay_at: Tuple[int, ...] = (1000, 2000)  # iterations from which the rate is lr_decay times smaller
    lr_decay: float = 0.3
    iterations: int = 8000
    reseed_every: int = 8  # the batch's first sample becomes the seed every this many iterations
    overflow_weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("size", "batch", "min_steps", "iterations", "reseed_every"):
            check_int(name, getattr(self, name), 1)
        check_int("max_steps", self.max_steps, self.min_steps, 10**6)
        check_int("pool", self.pool, self.batch)
        for at in self.lr_decay_at:
            check_int("lr_decay_at", at, 0)
        if not (math.isfinite(self.lr) and self.lr > 0 and 0 < self.lr_decay <= 1):
            raise ValueError(f"lr must be a finite positive number and lr_decay in (0, 1], got {self.lr}, "
                             f"{self.lr_decay}")

    def lr_at(self, iteration: int) -> float:
        """torch's ``MultiStepLR(milestones=lr_decay_at, gamma=lr_decay)``, stepped once an iteration."""
        return self.lr * self.lr_decay ** sum(iteration >= at for at in self.lr_decay_at)


def gram(f: torch.Tensor) -> torch.Tensor:
    """``[B, K, H, W] -> [B, K, K]``, normalised by the number of positions."""
    f = f.flatten(2)
    return f @ f.transpose(1, 2) / f.shape[-1]


def style_loss(features: Features, images: torch.Tensor, target_grams: List[torch.Tensor]) -> torch.Tensor:
    """Sum over layers of the mean squared difference of Gram matrices: ``[B]``."""
    feats = features(images)
    if len(feats) != len(target_grams):
        raise ValueError(f"the feature network returned {len(feats)} maps for the images, {len(target_grams)} "
                         "for the target")
    return sum((gram(f) - t).square().mean(dim=(1, 2)) for f, t in zip(feats, target_grams))


def train_texture(target_rgb: torch.Tensor, features: Features, config: TextureConfig = TextureConfig(), *,
                  spec: Optional[NCASpec] = None, model: Optional[NCA] = None, device="cpu",
                  backend: str = "auto", progress: bool = True,
                  callback: Optional[Callable[[int, float], None]] = None) -> TrainResult:
    """Train ``model`` (default: ``texture_spec()`` with Distill's init) so that its rendered state has
    the feature statistics of ``target_rgb`` (``[3, h, w]`` in [0, 1])."""
    if target_rgb.dim() != 3 or target_rgb.shape[0] != 3:
        raise ValueError(f"target_rgb must be [3, H, W] in [0, 1], got {tuple(target_rgb.shape)}")
    device = torch.device(device)
    if model is None:
        spec = spec or texture_spec()
        model = NCA(spec, distill_weights(spec, torch.Generator().manual_seed(config.seed)))
    model = model.to(device).requires_grad_(True)
    with torch.no_grad():
        target_grams = [gram(f).detach() for f in features(target_rgb.to(device, torch.float32)[None])]
    seed_state = model.seed(1, config.size, config.size)
    pool = SamplePool(seed_state, config.pool)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    losses: List[float] = []
    bar = Progress(config.iterations, enabled=progress)
    for it in range(config.iterations):
        idx = pool.sample(config.batch, g)
        x0 = pool.states[idx].clone()
        if it % config.reseed_every == 0:
            x0[:1] = seed_state
        steps = int(torch.randint(config.min_steps, config.max_steps + 1, (1,), generator=g))
        mask_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        for group in opt.param_groups:
            group["lr"] = config.lr_at(it)
        opt.zero_grad(set_to_none=True)
        x = model.rollout(x0, steps, seed=mask_seed, backend=backend)
        overflow = (x - x.clamp(-1.0, 1.0)).abs().sum()
        loss = (style_loss(features, model.to_rgb(x, clamp=False), target_grams).mean()
                + config.overflow_weight * overflow)
        loss.backward()
        normalise_gradients(model.parameters())
        opt.step()
        pool.commit(idx, x)
        losses.append(float(loss.detach()))
        bar.update(losses[-1])
        if callback is not None:
            callback(it, losses[-1])
    bar.close()
    return TrainResult(model.requires_grad_(False), losses)
