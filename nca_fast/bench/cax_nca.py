"""The benchmark's NCA built with CAX (JAX), computing the same function as the reference.

CAX conventions and how they are matched:

* state is channels-last ``[B, H, W, C]`` and the alive channel is the *last* one: the state's
  channels are permuted (alive channel moved to the end) and the weights permuted to match;
* ``ConvPerceive`` is a grouped convolution whose outputs are interleaved (channel-major, filter-minor)
  rather than our blocked order, so ``w1``'s columns are permuted; its kernel is set to the spec's own
  filters (CAX's ``grad_kernel`` stacks d/d(row) before d/d(col); using the spec's taps sidesteps that);
* CAX's cell dropout keeps a cell with probability ``1 - rate`` and rescales it by ``1 / (1 - rate)``;
  the reference fires with probability ``fire_rate`` without rescaling, so ``rate = 1 - fire_rate`` and
  ``step_size * fire_rate`` cancel the rescaling (verified with ``fire_rate = 1``, no dropout);
* padding is applied by ``jnp.pad`` before a VALID convolution (CAX's SAME is zero padding only),
  and the alive max-pool pads by the spec's alive padding (-inf for "ignore", as ``padding='SAME'``).

``NCAUpdate``/``ResidualUpdate`` cannot clamp the update or the state (the texture model's clamps),
so the update here subclasses ``ResidualUpdate`` and adds them: still CAX modules and CAX's
``ComplexSystem.__call__`` (a jitted ``nnx.scan``), with those lines in plain JAX.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .runner import Runner

_JNP_PAD = {"zeros": "constant", "circular": "wrap", "replicate": "edge"}


def unsupported_reason(spec, x) -> str:
    if spec.activation != "relu":
        return f"activation {spec.activation!r} not mapped to CAX"
    return ""


def _perm(spec):
    """Our channel index for each CAX channel (alive channel last)."""
    C, a = spec.channels, spec.alive_channel
    return list(range(C)) if a is None else [c for c in range(C) if c != a] + [a]


def build(model, fire_rate=None):
    """A CAX ``ComplexSystem`` computing ``model``'s step on ``[B, H, W, C]`` (CAX channel order),
    with the spec's fire rate or ``fire_rate``."""
    import jax
    import jax.numpy as jnp
    from cax.core import ComplexSystem
    from cax.core.perceive import ConvPerceive
    from cax.core.update import ResidualUpdate
    from flax import nnx

    spec = model.spec
    fire_rate = spec.fire_rate if fire_rate is None else fire_rate
    C, F, hid = spec.channels, spec.n_filters, spec.hidden
    perm = _perm(spec)
    mode = _JNP_PAD[spec.padding]
    clip = lambda t, r: t if r is None else jnp.clip(t, r[0], r[1])

    class Perceive(ConvPerceive):
        def __call__(self, state):
            pad = jnp.pad(state, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=mode)
            return clip(self.conv(pad), spec.perception_clamp)

    class Update(ResidualUpdate):
        def __call__(self, state, perception, input=None):
            alive = self.alive(state)
            h = perception
            for layer in self.layers[:-1]:
                h = self.activation_fn(layer(h))
            update = self.dropout(clip(self.layers[-1](h), spec.update_clamp))
            state = clip(state + self.step_size * update, spec.state_clamp)
            return state if alive is None else state * (alive & self.alive(state))

        def alive(self, state):
            if spec.alive_channel is None:
                return None
            a = state[..., -1:]
            if spec.alive_pool_padding == "ignore":
                a = jnp.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
            else:
                a = jnp.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=_JNP_PAD[spec.alive_pool_padding])
            return nnx.max_pool(a, (3, 3), padding="VALID") > spec.alive_threshold

    class NCA(ComplexSystem):
        def __init__(self, rngs):
            self.perceive = Perceive(C, F * C, padding="VALID", feature_group_count=C, rngs=rngs)
            hidden_clip = spec.hidden_clamp
            self.update = Update(2, C, F * C, (hid,), rngs=rngs, step_size=spec.step_size * fire_rate,
                                 cell_dropout_rate=1.0 - fire_rate,
                                 activation_fn=lambda h: clip(jax.nn.relu(h), hidden_clip))

        def _step(self, state, input=None, *, sow=False):
            return self.update(state, self.perceive(state), input)

    cs = NCA(nnx.Rngs(0))
    # Perception kernel [3, 3, 1, C*F]: output c*F + f is filter f on CAX channel c.
    taps = np.array([f.taps for f in spec.filters], dtype=np.float32)  # [F, 3, 3]
    kernel = np.tile(taps.transpose(1, 2, 0), (1, 1, C))[:, :, None, :]
    cs.perceive.conv.kernel.set_value(jnp.asarray(kernel))
    p = {k: v.detach().cpu().double().numpy() for k, v in model.params().items()}
    # w1 columns: ours are f*C + c (c in our order); CAX's input c'*F + f is our channel perm[c'].
    cols = [f * C + perm[cp] for cp in range(C) for f in range(F)]
    w1 = p["w1"][:, cols]  # [hidden, F*C] in CAX input order
    l1, l2 = cs.update.layers
    l1.kernel.set_value(jnp.asarray(w1.T[None, None].astype(np.float32)))
    l1.bias.set_value(jnp.asarray(p.get("b1", np.zeros(hid)).astype(np.float32)))
    l2.kernel.set_value(jnp.asarray(p["w2"][perm].T[None, None].astype(np.float32)))
    l2.bias.set_value(jnp.asarray(p.get("b2", np.zeros(C))[perm].astype(np.float32)))
    return cs, perm


def cax_runner(model, x):
    """A :class:`~nca_fast.bench.providers.Runner` for ``model`` through CAX on JAX's default device."""
    import jax
    import jax.numpy as jnp

    cs, perm = build(model)
    inv = np.argsort(perm)
    cache = {}

    def to_jax(x):  # converted once per input tensor (inputs are reused round-robin)
        hit = cache.get(id(x))
        if hit is None or hit[0] is not x:
            arr = x.detach().cpu().float().numpy()[:, perm].transpose(0, 2, 3, 1)
            hit = cache[id(x)] = (x, jax.device_put(jnp.asarray(arr)))  # holds x: ids stay unique
        return hit[1]

    def step(x, k):
        y = cs(to_jax(x), num_steps=1)
        y.block_until_ready()
        return y

    full_fire, _ = build(model, fire_rate=1.0)  # dropout rate 0: deterministic

    def check(x, mask):
        if mask is not None:
            raise ValueError("the CAX provider is verified with fire_rate=1 only")
        y = np.asarray(full_fire(to_jax(x), num_steps=1))
        return torch.from_numpy(y.transpose(0, 3, 1, 2)[:, inv].copy()).to(x.device)

    t0 = time.perf_counter()
    step(x, 0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    step(x, 1)
    gpu = jax.devices()[0].platform == "gpu"  # XLA runs float32 convolutions in TF32 there
    runner = Runner(step, check, compile_s=max(0.0, first - (time.perf_counter() - t0)),
                    check_needs_full_fire=True, precision="tf32" if gpu else "ieee")
    runner.notes.append(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    return runner
