"""The CPU fast path's backward: :func:`nca_fast.cpu.step` as one autograd node.

The forward is the banded CPU step (no graph recorded); autograd saves only the step's input state,
its update mask, the alive mask the forward applied and the weights. The backward recomputes one
image at a time (perception and hidden; the update only where its clamps need it), in the forward's
channels-first layout (perception ``[F*C, n]`` over the padded width, ``n = H * (W+2)``, the
filter scales folded into ``w1``'s columns), and runs the vector-Jacobian product as GEMMs on it:

    g1 = gy * keep                       keep = alive(x) & alive(y1): piecewise constant, kept
    g0 = g1 * [lo <= y0 <= hi]           (state clamp; torch's clamp passes its bounds)
    gu = g0 * step_size * fire * [update clamp]      gw2 += gu h^T,  gb2 += sum gu
    ga = (w2^T gu) * [a > 0, hidden clamp]           gw1 += ga p^T,  gb1 += sum ga
    gx = g0 + perceive_vjp((w1^T ga) * [perception clamp])

exactly the derivatives the reference's autograd defines (tested against it). Nothing of size
``[B, hidden, H, W]`` is saved: a differentiable rollout keeps one state per step, where the
reference keeps its perception, hidden and update. Gradients of the weights are summed image by
image in a fixed order, so they are reproducible run to run.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from . import cpu, reference
from .spec import NCASpec
from .utils.checks import once_differentiable

# Columns (cells) per chunk of the MLP's backward: its [hidden, chunk] intermediates (~5 of them)
# stay in a core's L2 (hidden 128: 512 KiB each).
MLP_CHUNK_CELLS = 1024


def _inside(t: torch.Tensor, r) -> Optional[torch.Tensor]:
    """Where clamp(t, r) passes its gradient (``lo <= t <= hi``, as torch's clamp); None: everywhere."""
    return None if r is None else (t >= r[0]) & (t <= r[1])


def _hidden_pass(a: torch.Tensor, hc) -> torch.Tensor:
    """Where ``clamp(relu(a), hc)`` passes its gradient: relu's ``a > 0``, then the clamp's bounds on
    ``relu(a)`` (a lower bound <= 0 always holds there)."""
    if hc is None:
        return a > 0
    lo, hi = hc
    return ((a > 0) if lo <= 0 else (a >= lo)) & (a <= hi)


class _Image:
    """The forward recomputed for one image and the VJP through it (see the module docstring)."""

    def __init__(self, spec: NCASpec, params: Mapping[str, torch.Tensor], x: torch.Tensor):
        self.spec = spec
        B, C, H, W = x.shape
        free_scale = spec.perception_clamp is None
        _, plans = cpu._compile_filters(spec.filters, free_scale)
        self.scales = torch.tensor([p.scale for p in plans], dtype=x.dtype, device=x.device)
        F = len(plans)
        self.w1 = params["w1"].detach()
        self.w1s = (self.w1.view(-1, F, C) * self.scales[:, None]).view(-1, F * C)
        self.w2 = params["w2"].detach()
        b1, b2 = params.get("b1"), params.get("b2")
        self.b1 = None if b1 is None else b1.detach()[:, None]
        self.b2 = None if b2 is None else b2.detach()[:, None]
        apad = {"ignore": "zeros"}.get(spec.alive_pool_padding, spec.alive_pool_padding)
        self.key = (spec.filters, free_scale, (spec.padding, apad), C, spec.hidden, W, x.dtype, x.device)
        self.shape = (C, H, W)

    def vjp(self, x: torch.Tensor, fire: Optional[torch.Tensor], keep: Optional[torch.Tensor], gy: torch.Tensor,
            grads: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``x, gy [C, H, W]``, ``fire [H, W]`` (bool or None), ``keep [H, W]``: the forward's alive mask
        (None: recomputed): adds the weights' gradients of this image into ``grads`` and returns the
        state's ``[C, H, W]``."""
        spec = self.spec
        C, H, W = self.shape
        s = cpu._scratch(self.key, H)  # this thread's, the whole image as one band
        # ---- the forward again, keeping what the derivatives need
        cpu._pad_band(x, 0, H, spec.padding, 0.0, s.padded)
        s.perceive()
        p_pass = _inside(s.p_inner, spec.perception_clamp)
        if spec.perception_clamp is not None:
            s.p_inner.clamp_(*spec.perception_clamp)
        gain = spec.step_size if fire is None else fire.to(x.dtype) * spec.step_size  # [H, W]
        g0, u_pass, h, h_pass = gy, None, None, None
        # the update itself is needed only for its clamps' masks, or for an alive mask not kept
        if (spec.update_clamp is not None or spec.state_clamp is not None
                or (spec.alive_channel is not None and keep is None)):
            h, h_pass = self._hidden(s.p)
            u = torch.mm(self.w2, h) if self.b2 is None else torch.addmm(self.b2, self.w2, h)
            u3 = u.view(C, H, W + 2)[:, :, 1:W + 1]
            u_pass = _inside(u3, spec.update_clamp)
            y0 = x + (reference._clamp(u3, spec.update_clamp) * gain)
            if spec.alive_channel is not None and keep is None:
                y1 = reference._clamp(y0, spec.state_clamp)
                keep = (reference.alive_mask(x[None], spec) & reference.alive_mask(y1[None], spec))[0]
            if spec.state_clamp is not None:
                g0 = g0 * _inside(y0, spec.state_clamp)
        if keep is not None:
            g0 = g0 * keep
        # ---- the VJP, in the forward's layout (pad columns: zero gradient)
        n = H * (W + 2)
        gu = g0.new_zeros(C, n)
        gu3 = gu.view(C, H, W + 2)[:, :, 1:W + 1]
        torch.mul(g0, gain, out=gu3)
        if u_pass is not None:
            gu3.mul_(u_pass)
        if "b2" in grads:
            grads["b2"].add_(gu.sum(1))
        gp = g0.new_empty(self.w1.shape[1], n)
        # Column chunks, so that the [hidden, chunk] intermediates stay in the core's cache (the
        # whole image's [hidden, n] would not); the hidden layer recomputed per chunk unless the
        # clamps needed it whole above.
        chunk = n if h is not None else max(1, MLP_CHUNK_CELLS)
        for c0 in range(0, n, chunk):
            cols = slice(c0, min(n, c0 + chunk))
            p, g = s.p[:, cols], gu[:, cols]
            if h is None:
                hc, hp = self._hidden(p)
            else:
                hc, hp = h[:, cols], None if h_pass is None else h_pass[:, cols]
            grads["w2"].addmm_(g, hc.t())
            gh = torch.mm(self.w2.t(), g)
            # (relu alone: one op, no mask tensor)
            ga = torch.ops.aten.threshold_backward(gh, hc, 0.0) if hp is None else gh.mul_(hp)
            grads["w1"].addmm_(ga, p.t())  # (scaled perception: unscaled once all images are in)
            if "b1" in grads:
                grads["b1"].add_(ga.sum(1))
            torch.mm(self.w1.t(), ga, out=gp[:, cols])  # the true perception's gradient: w1s^T ga / scale
        gp_inner = gp.view(-1, H, W + 2)[:, :, 1:W + 1]
        if p_pass is not None:
            gp_inner = gp_inner * p_pass
        return self._perceive_vjp(gp_inner.view(-1, C, H, W), g0)

    def _hidden(self, p: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``h = clamp(relu(w1s p + b1), hidden clamp)`` of perception columns ``p``, and where it
        passes its gradient when there is a hidden clamp (None: where ``h > 0``)."""
        a = torch.mm(self.w1s, p) if self.b1 is None else torch.addmm(self.b1, self.w1s, p)
        hc = self.spec.hidden_clamp
        passes = None if hc is None else _hidden_pass(a, hc)
        return a.clamp_(*cpu.hidden_range(self.spec)), passes

    def _perceive_vjp(self, gp: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
        """``g0 + perceive^T(gp)`` for perception gradients ``gp [F, C, H, W]``: each tap adds its
        shifted, weighted gradient onto the padded grid (the transposed correlation), then the
        padding ring folds back onto the cells it read (as :func:`reference.perceive_vjp`)."""
        C, H, W = self.shape
        t = g0.new_zeros(C, H + 2, W + 2)
        t[:, 1:H + 1, 1:W + 1].copy_(g0)
        for f, filt in enumerate(self.spec.filters):
            for r, row in enumerate(filt.taps):
                for c, v in enumerate(row):
                    if v != 0.0:
                        t[:, r:r + H, c:c + W].add_(gp[f], alpha=v)
        if self.spec.padding != "zeros":  # (zeros: the ring read nothing; dropped)
            circular = self.spec.padding == "circular"
            for dim, n in ((1, H), (2, W)):  # rows over the whole padded width, then columns
                first, last = t.narrow(dim, 0, 1), t.narrow(dim, n + 1, 1)
                # circular: padded index 0 read cell n-1, index n+1 cell 0; replicate: the edge cells
                t.narrow(dim, n if circular else 1, 1).add_(first)
                t.narrow(dim, 1 if circular else n, 1).add_(last)
        return t[:, 1:H + 1, 1:W + 1]

    def unscale(self, gw1: torch.Tensor) -> torch.Tensor:
        C = self.shape[0]
        return (gw1.view(gw1.shape[0], -1, C) * self.scales[:, None]).view_as(gw1)


def step_vjp(x: torch.Tensor, params: Mapping[str, torch.Tensor], spec: NCASpec,
             fire_mask: Optional[torch.Tensor], gy: torch.Tensor,
             keep: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Gradients of one step ``y = step(x, params, spec, fire_mask)`` for output gradient ``gy``:
    ``(gx [B, C, H, W], {name: gradient})`` for every weight in ``params``. ``keep`` (bool
    ``[B, H, W]``): the step's alive mask, from ``cpu.step(..., keep=)`` (None: recomputed)."""
    with torch.no_grad():
        x, gy = x.contiguous(), gy.contiguous()
        B, C, H, W = x.shape
        img = _Image(spec, params, x)
        # per image partial sums, added in image order: the same gradients however threads run
        partial = [{n: torch.zeros_like(t) for n, t in params.items()} for _ in range(B)]
        gx = torch.empty_like(x)
        fire = None if fire_mask is None else fire_mask.reshape(B, H, W)

        @torch.no_grad()  # (a worker does not inherit the caller's no_grad)
        def one(b: int) -> None:
            gx[b] = img.vjp(x[b], None if fire is None else fire[b], None if keep is None else keep[b], gy[b],
                            partial[b])

        threads = cpu.THREADS or torch.get_num_threads()
        # images on the single-threaded workers when each has one (else the GEMMs' own threads)
        if threads > 1 and B >= threads and x.device.type == "cpu":
            list(cpu._workers(threads).map(one, range(B)))
        else:
            for b in range(B):
                one(b)
        grads = {n: torch.stack([p[n] for p in partial]).sum(0) for n in params}
        grads["w1"] = img.unscale(grads["w1"])
    return gx, grads


def step(x: torch.Tensor, params: Mapping[str, torch.Tensor], spec: NCASpec, fire_mask: Optional[torch.Tensor],
         *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`nca_fast.cpu.step`, as one autograd node (:class:`CpuStep`) when autograd records it
    (grad enabled and ``x`` or a weight requires grad)."""
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params.values())):
        names = tuple(params)
        y = CpuStep.apply(x, fire_mask, spec, names, *(params[n] for n in names))
        return y if out is None else out.copy_(y)
    return cpu.step(x, params, spec, fire_mask, out=out)


class CpuStep(torch.autograd.Function):
    """``CpuStep.apply(x, fire_mask, spec, names, *weights)``: :func:`nca_fast.cpu.step` with a
    backward (:func:`step_vjp`); saves the input state, the mask and the weights."""

    @staticmethod
    def forward(ctx, x, fire_mask, spec, names: Sequence[str], *weights):
        params = dict(zip(names, weights))
        B, _, H, W = x.shape
        keep = None if spec.alive_channel is None else torch.empty(B, H, W, dtype=torch.bool, device=x.device)
        with torch.no_grad():
            y = cpu.step(x, params, spec, fire_mask, keep=keep)
        ctx.spec, ctx.names = spec, tuple(names)
        ctx.save_for_backward(x, fire_mask, keep, *weights)
        return y

    @staticmethod
    def backward(ctx, gy):
        once_differentiable("the CPU path")
        x, fire_mask, keep, *weights = ctx.saved_tensors
        gx, grads = step_vjp(x, dict(zip(ctx.names, weights)), ctx.spec, fire_mask, gy, keep)
        return (gx if ctx.needs_input_grad[0] else None, None, None, None,
                *(grads[n] if need else None for n, need in zip(ctx.names, ctx.needs_input_grad[4:])))
