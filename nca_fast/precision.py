"""MLP precision: one vocabulary for the step, the decoders and the benchmark, and one tolerance table.

``"ieee"``: fp32-accurate (fp32 operands; on tensor cores as three TF32 passes); ``"tf32"``: fp32
operands rounded to TF32 (10 mantissa bits); ``"fp16"`` / ``"bf16"``: 16-bit operands. Every
precision accumulates in fp32. A float32 state runs its MLP in ``"tf32"`` (the default of
``NCA.fp32_matmul``) or ``"ieee"``; a 16-bit state in its own precision.
"""
from __future__ import annotations

import torch

PRECISIONS = ("ieee", "tf32", "fp16", "bf16")
FP32_PRECISIONS = ("tf32", "ieee")

# Largest error of one step against a float64 reference, as max|got - want| / max(1, max|want|):
# the rounding of the operands (TF32 and fp16 keep 11 significant bits, bf16 8) over sums of up to a
# few hundred O(1) terms, with a margin; a wrong tap, weight or mask shows as >= 1e-2.
TOLERANCE = {"ieee": 1e-4, "tf32": 3e-3, "fp16": 2e-2, "bf16": 5e-2}


def check_fp32_precision(precision: str) -> str:
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"the MLP precision of a float32 state must be one of {FP32_PRECISIONS}, "
                         f"got {precision!r}")
    return precision


def state_precision(dtype: torch.dtype, fp32_matmul: str = "tf32") -> str:
    """The MLP precision a state of ``dtype`` runs in."""
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float64:
        return "ieee"
    return check_fp32_precision(fp32_matmul)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max|got - want| / max(1, max|want|)`` in float64 (NaN when ``got`` has a NaN)."""
    got, want = got.to(torch.float64), want.to(torch.float64)
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    return float("nan") if torch.isnan(got).any() else err
