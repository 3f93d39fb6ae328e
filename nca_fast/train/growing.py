"""Train a growing NCA the way Distill's *Growing Neural Cellular Automata* does.

Per iteration: draw a batch of 8 from a pool of 1024 states, sort it by loss, put the seed in place
of the worst sample and damage the 3 best (a random disc erased), roll it out for 64-95 steps,
take the mean squared error of the RGBA channels against the premultiplied target, normalise each
parameter's gradient to unit norm, take an Adam step (learning rate 2e-3, x0.1 after 2000
iterations) and write the batch back to the pool. The rollout runs on the model's differentiable
backends: the fused step and its backward on CUDA; on a CPU the reference, or the CPU fast path and
its backward where the reference's graph would not fit in memory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from ..media import load_image
from ..model import NCA
from ..spec import NCASpec, growing_spec
from ..utils.checks import check_int
from . import checkpoint as ckpt
from .pool import SamplePool, circle_masks
from .progress import Progress


@dataclass(frozen=True)
class GrowingConfig:
    """The recipe's numbers (Distill's defaults; ``pool=0`` trains from the seed every time)."""
    target_size: int = 40  # the target's longer side, in cells (load_target's; nca-fast train loads with it)
    padding: int = 16  # empty cells around the target (likewise)
    batch: int = 8
    pool: int = 1024
    damage: int = 3  # damaged samples per batch
    min_steps: int = 64  # rollout lengths: min_steps .. max_steps, both included (Distill: 64-95)
    max_steps: int = 95
    lr: float = 2e-3
    lr_decay_at: int = 2000  # the learning rate drops 10x after this iteration
    iterations: int = 8000
    seed: int = 0  # pool sampling, damage, rollout lengths and update masks
    checkpoint_every: Optional[int] = None  # rollout checkpoint segments (see NCA.rollout)

    def __post_init__(self):
        for name in ("target_size", "batch", "min_steps", "iterations"):
            check_int(name, getattr(self, name), 1)
        for name in ("padding", "pool", "damage", "lr_decay_at", "seed"):
            check_int(name, getattr(self, name), 0)
        check_int("max_steps", self.max_steps, self.min_steps, 10**6)
        if self.pool and self.pool < self.batch:
            raise ValueError(f"pool ({self.pool}) must hold at least one batch ({self.batch}), or be 0")
        if self.damage >= self.batch:
            raise ValueError(f"damage ({self.damage}) must leave the seeded sample undamaged: < batch ({self.batch})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite positive number, got {self.lr}")

    def lr_at(self, iteration: int) -> float:
        return step_schedule(self.lr, self.lr_decay_at, iteration)


def step_schedule(lr: float, decay_at: int, iteration: int) -> float:
    """Distill's piecewise-constant schedule (Keras' ``PiecewiseConstantDecay([decay_at], [lr, lr/10])``
    on the optimizer's 0-based step): ``lr`` up to iteration ``decay_at`` included, then ``lr / 10``."""
    return lr * (0.1 if iteration > decay_at else 1.0)


@dataclass
class TrainResult:
    model: NCA
    losses: List[float]  # one per iteration, from the first (a resumed run's included)


def load_target(path, size: int = 40, padding: int = 16) -> torch.Tensor:
    """An image file -> the premultiplied RGBA target ``[4, h + 2*padding, w + 2*padding]``, its
    longer side shrunk to ``size`` (antialiased, premultiplied, as Pillow resizes RGBA for Distill: no
    colour of transparent pixels bleeds into the edges; never enlarged). Without alpha, every pixel is
    opaque."""
    img = load_image(path)
    if img.shape[0] == 3:
        img = torch.cat([img, torch.ones_like(img[:1])])
    img = torch.cat([img[:3] * img[3:], img[3:]])
    h, w = img.shape[1:]
    s = min(1.0, size / max(h, w))
    if s < 1.0:
        hw = (max(1, round(h * s)), max(1, round(w * s)))
        img = F.interpolate(img[None], size=hw, mode="bilinear", antialias=True, align_corners=False)[0]
    if not bool((img[3] > 0).any()):
        raise ValueError(f"{path}: the target image is fully transparent: there is nothing to grow")
    return F.pad(img.clamp(0, 1), (padding,) * 4)


def distill_weights(spec: NCASpec, generator: torch.Generator):
    """Distill's initialisation: layer 1 Glorot-uniform, biases and layer 2 zero (do nothing at first)."""
    fan_in, fan_out = spec.perception_size, spec.hidden
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    w = {"w1": (torch.rand(spec.hidden, spec.perception_size, generator=generator) * 2 - 1) * bound,
         "w2": torch.zeros(spec.channels, spec.hidden)}
    if spec.hidden_bias:
        w["b1"] = torch.zeros(spec.hidden)
    if spec.update_bias:
        w["b2"] = torch.zeros(spec.channels)
    return w


def rgba_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE of the RGBA channels ``x[:, :4]`` against the premultiplied target: ``[B]``."""
    return (x[:, :4] - target).square().mean(dim=(1, 2, 3))


def normalise_gradients(params) -> None:
    """Each parameter's gradient divided by its norm (Distill: ``g / (|g| + 1e-8)``)."""
    for p in params:
        if p.grad is not None:
            p.grad.div_(p.grad.norm() + 1e-8)


def train_growing(target: torch.Tensor, config: GrowingConfig = GrowingConfig(), *, spec: Optional[NCASpec] = None,
                  model: Optional[NCA] = None, device="cpu", backend: str = "auto", checkpoint=None,
                  checkpoint_interval: int = 100, resume: bool = False, progress: bool = True,
                  callback: Optional[Callable[[int, float], None]] = None) -> TrainResult:
    """Train on ``target`` (``[4, H, W]`` premultiplied RGBA, see :func:`load_target`).

    ``model``: the NCA to train (default: ``spec``, or ``growing_spec()``, with Distill's init).
    ``checkpoint``: a path written every ``checkpoint_interval`` iterations and at the end (atomically);
    with ``resume`` an existing one is continued from where it stopped, bit for bit (same config,
    target and backend required; ``iterations`` may grow).
    """
    if target.dim() != 3 or target.shape[0] != 4:
        raise ValueError(f"target must be [4, H, W] premultiplied RGBA, got {tuple(target.shape)}")
    check_int("checkpoint_interval", checkpoint_interval, 1)
    device = torch.device(device)
    target = target.to(device, torch.float32)
    if model is None:
        spec = spec or growing_spec()
        model = NCA(spec, distill_weights(spec, torch.Generator().manual_seed(config.seed)))
    if model.spec.alive_channel != 3 or model.spec.channels < 4:
        raise ValueError("growing training needs a model with RGBA in channels 0-3 and alpha as its alive channel")
    model = model.to(device).requires_grad_(True)
    H, W = target.shape[1:]
    seed_state = model.seed(1, H, W)
    pool = SamplePool(seed_state, config.pool or config.batch)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    losses: List[float] = []
    meta = {"config": {k: v for k, v in dataclasses.asdict(config).items() if k != "iterations"},
            "spec": model.spec.to_json(), "backend": backend}
    if resume and checkpoint is not None and Path(checkpoint).exists():
        tensors, saved = ckpt.load(checkpoint)
        for key in ("config", "spec", "backend"):
            if _comparable(key, saved.get(key)) != _comparable(key, meta[key]):
                what = "model spec" if key == "spec" else f"{key} ({json.dumps(saved.get(key))[:300]})"
                raise ValueError(f"{checkpoint}: saved with another {what}; resume it with the same settings, "
                                 "or start afresh without --resume")
        if not torch.equal(tensors["target"], target.cpu()):
            raise ValueError(f"{checkpoint}: saved for another target image")
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(tensors[f"model.{n}"])
        ckpt.load_optimizer(opt, tensors, saved["optimizer"])
        pool.states.copy_(tensors["pool"])
        g.set_state(tensors["generator"])
        losses = tensors["losses"].tolist()

    def save_checkpoint():
        opt_tensors, groups = ckpt.optimizer_tensors(opt)
        tensors = {**{f"model.{n}": p for n, p in model.named_parameters()}, **opt_tensors, "pool": pool.states,
                   "generator": g.get_state(), "losses": torch.tensor(losses, dtype=torch.float64),
                   "target": target}
        ckpt.save(checkpoint, tensors, {**meta, "optimizer": groups, "iteration": len(losses)})

    if len(losses) >= config.iterations:
        warnings.warn(f"{checkpoint} holds {len(losses)} iterations, as many as the {config.iterations} asked for: "
                      "nothing more to train (raise the iterations to continue)", stacklevel=2)
    bar = Progress(config.iterations, initial=len(losses), enabled=progress)
    for it in range(len(losses), config.iterations):
        loss = _iteration(model, opt, pool, seed_state, target, config, it, g, backend)
        losses.append(loss)
        bar.update(loss)
        if callback is not None:
            callback(it, loss)
        if checkpoint is not None and ((it + 1) % checkpoint_interval == 0 or it + 1 == config.iterations):
            save_checkpoint()
    bar.close()
    return TrainResult(model.requires_grad_(False), losses)


def _comparable(key: str, value):
    """A checkpoint's metadata entry as resuming compares it: the spec without its ``name`` (the
    output file's, which a resumed run may change)."""
    if key != "spec" or not isinstance(value, str):
        return value
    try:
        return {k: v for k, v in json.loads(value).items() if k != "name"}
    except (ValueError, AttributeError):
        return value


def _iteration(model: NCA, opt, pool: SamplePool, seed_state, target, cfg: GrowingConfig, it: int,
               g: torch.Generator, backend: str) -> float:
    idx = pool.sample(cfg.batch, g)
    x0 = pool.states[idx].clone() if cfg.pool else seed_state.expand(cfg.batch, -1, -1, -1).clone()
    if cfg.pool:
        with torch.no_grad():
            order = rgba_loss(x0, target).argsort(descending=True)  # the worst first
        idx, x0 = idx[order], x0[order]
        x0[:1] = seed_state
        if cfg.damage:
            keep = ~circle_masks(cfg.damage, x0.shape[2], x0.shape[3], g).to(x0.device)
            x0[-cfg.damage:] *= keep
    steps = int(torch.randint(cfg.min_steps, cfg.max_steps + 1, (1,), generator=g))
    mask_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    for group in opt.param_groups:
        group["lr"] = cfg.lr_at(it)
    opt.zero_grad(set_to_none=True)
    x = model.rollout(x0, steps, seed=mask_seed, backend=backend, checkpoint_every=cfg.checkpoint_every)
    loss = rgba_loss(x, target).mean()
    loss.backward()
    normalise_gradients(model.parameters())
    opt.step()
    if cfg.pool:
        pool.commit(idx, x)
    return float(loss.detach())
