"""Which path runs a step or a decode: one rule for both, logged once per choice.

``"reference"``: the plain-PyTorch specification (any device, differentiable).
``"cpu"``: the CPU fast path (a state on the CPU; for decoders the reference, their only CPU path).
``"triton"``: the fused kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), forward and
backward (the step's fused backward kernel; the decoders' backward is the reference's VJP).
``"auto"``: the fused kernels on CUDA, with or without gradients (the reference, with a warning,
where they cannot run); on a CPU the CPU fast path where it is faster (float32 steps), else the
reference. When autograd records the call on a CPU, the reference while its graph fits in memory (its
backward is the faster one: it keeps perception and hidden where the CPU path's recomputes them), the
CPU path when it would not (it keeps one state a step, ``cpu_backward.py``, and beats the reference's
checkpointed segments).
"""
from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger("nca_fast")

BACKENDS = ("auto", "reference", "cpu", "triton")
_logged: set = set()


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def choose(backend: str, x: torch.Tensor, *, fused_problem: str, cpu_path: bool, cpu_preferred: bool,
           needs_grad: bool, graph_fits: bool = True, what: str = "step") -> str:
    """The path for ``backend`` on state ``x``: ``"reference"``, ``"cpu"`` or ``"triton"``.

    ``fused_problem``: why the fused kernels cannot run here ('' when they can); ``cpu_path``: a CPU
    fast path exists for this call; ``cpu_preferred``: ``"auto"`` should take it (it beats the
    reference here); ``needs_grad``: autograd records the call; ``graph_fits``: the reference's
    autograd graph of the call fits in memory.
    """
    check_backend(backend)
    if backend == "reference":
        return backend
    if backend == "cpu":
        if x.device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on a CPU; the state is on {x.device}")
        if not cpu_path:
            return _logged_choice(backend, "reference", "the reference is the CPU path here", what)
        return "cpu"
    if backend == "triton":
        if fused_problem:
            raise RuntimeError(f"backend='triton' cannot run here: {fused_problem}")
        return "triton"
    if x.device.type == "cuda":
        if fused_problem:
            if not torch.compiler.is_compiling():
                warnings.warn(f"nca_fast: {what} falls back to the reference path: {fused_problem}",
                              RuntimeWarning, stacklevel=3)
            return _logged_choice(backend, "reference", fused_problem, what)
        return _logged_choice(backend, "triton", "state on cuda", what)
    on_cpu_path = x.device.type == "cpu" and cpu_path and cpu_preferred
    if needs_grad and on_cpu_path and not graph_fits:
        return _logged_choice(backend, "cpu", "autograd records it and the reference's graph would not fit in "
                                              "memory: the CPU path keeps one state a step", what)
    if needs_grad:
        return _logged_choice(backend, "reference", f"autograd records it on {x.device.type}: the reference's "
                                                    "backward, while its graph fits in memory", what)
    if on_cpu_path:
        return _logged_choice(backend, "cpu", f"state on cpu, {x.dtype}", what)
    return _logged_choice(backend, "reference", f"state on {x.device.type}, {x.dtype}", what)


def _logged_choice(backend: str, choice: str, why: str, what: str) -> str:
    key = (what, backend, choice, why)
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        log.info("nca_fast %s backend=%r chose %s (%s)", what, backend, choice, why)
    return choice
