"""Argument checks shared by the NCA, the decoders and the kernels: states, weights, counts, memory.

Each raises before any work starts, with a message that names the problem.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

import torch
from torch import nn

STATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_int(name: str, value, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (bools are not ints here)."""
    if hi is not None:
        want = f"an int in [{lo}, {hi}]"
    else:
        want = {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(lo, f"an int >= {lo}")
    if (isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo)
            or (hi is not None and value > hi)):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return value


def device_arg(text: str, flag: str = "--device") -> torch.device:
    """A command line's device: ``"auto"`` (CUDA when available, else the CPU) or a torch device that
    exists here."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"{flag} {text[:40]!r} is not a torch device (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {text}: CUDA is not available here")
    return device


def check_state(x, channels: int, device: torch.device, what: str = "model") -> None:
    """``x`` is a ``[B, C, H, W]`` floating state with ``channels`` channels on ``device``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"state must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"state must be [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"state has {x.shape[1]} channels, the {what} has {channels}")
    if x.dtype not in STATE_DTYPES:
        raise ValueError(f"state dtype {x.dtype} not supported; use one of {STATE_DTYPES}")
    if min(x.shape) < 1:
        raise ValueError(f"state has an empty dimension: {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"state is on {x.device} but the {what} is on {device}")


def check_weights(shapes: Mapping[str, tuple], weights, what: str) -> Dict[str, torch.Tensor]:
    """``weights`` checked against ``shapes`` (names, shapes, floating point, finite once cast to
    float32) and returned as detached float32 copies; errors name the ``what``."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"{what}s must be a mapping of names to tensors, got {type(weights).__name__}")
    missing, extra = set(shapes) - set(weights), set(weights) - set(shapes)
    if missing or extra:
        raise ValueError(f"{what}s: missing {sorted(missing)[:8]}, unexpected {sorted(map(str, extra))[:8]}; "
                         f"expected {len(shapes)} tensors: {', '.join(list(shapes)[:8])}")
    out = {}
    for name, shape in shapes.items():
        w = torch.as_tensor(weights[name])
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"{what} {name!r} has shape {tuple(w.shape)}, spec needs {tuple(shape)}")
        w32 = w.detach().to(torch.float32) if w.is_floating_point() else None
        if w32 is None or not torch.isfinite(w32).all():
            raise ValueError(f"{what} {name!r} must be finite floating point (got {w.dtype}"
                             f"{'' if w32 is None else ' with NaN, inf or values beyond float32'})")
        out[name] = w32.clone()
    return out


def register_weights(module: nn.Module, shapes: Mapping[str, tuple], weights, what: str) -> None:
    """Check every weight (:func:`check_weights`) before registering any as a float32 parameter."""
    for name, w in check_weights(shapes, weights, what).items():
        module.register_parameter(name, nn.Parameter(w))


def _available_bytes(device: torch.device) -> Optional[int]:
    """Memory a new allocation can take on ``device`` (None when unknown)."""
    if device.type == "cuda":  # the driver's free memory and the blocks PyTorch's allocator holds unused
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def available_bytes(device) -> Optional[int]:
    """Memory a new allocation can take on ``device`` (None when unknown)."""
    return _available_bytes(torch.device(device))


def check_memory(nbytes: int, device, what: str, per_cell: Optional[int] = None) -> None:
    """Refuse an allocation of ``nbytes`` that cannot fit in the memory ``device`` has available;
    with ``per_cell`` (bytes per grid cell) the message names the largest square grid that fits."""
    device = torch.device(device)
    avail = _available_bytes(device)
    if avail is not None and nbytes > avail:
        hint = ""
        if per_cell:
            side = int((avail // per_cell) ** 0.5)
            hint = f"; at most about {side}x{side} cells fit"
        raise MemoryError(f"{what} needs {_gib(nbytes)}, more than the {_gib(avail)} available on {device}{hint}")


def once_differentiable(what: str) -> None:
    """Call first in a backward that has no backward of its own: raises when the backward records a
    graph (``create_graph=True``, as ``autograd.grad`` for a gradient penalty asks), whose gradients
    would otherwise come back unconnected (None with ``allow_unused``) rather than fail."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what}'s backward is once-differentiable: a backward with create_graph=True "
                           "(a gradient of a gradient) needs backend='reference'")
