"""Ahead-of-time compilation of kernel configurations for a GPU target, without a GPU.

``catalogue.py`` lists the configurations the dispatchers can pick as :class:`KernelConfig`s;
:func:`compile_config` builds one for ``sm_80`` or ``sm_90a`` through
``triton.compile`` and reads registers, spills and shared memory off the cubin, and which
tensor-core instructions (HGMMA on Hopper, HMMA on Ampere) the SASS uses.

Must run in a process where ``TRITON_INTERPRET`` is unset: under the interpreter ``@triton.jit``
yields interpreted functions that cannot be compiled.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .config import interpreting

TARGETS = {"sm_80": 80, "sm_90a": 90}
# The most shared memory one block may use (opt-in maximum): A100 163 KB, H100/H200 227 KB. A kernel
# that compiles above it fails at launch ("out of resource: shared memory").
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}


@dataclass(frozen=True)
class KernelConfig:
    """One compilable configuration: ``signature`` maps every argument to a Triton type string
    (``"*fp32"``, ``"i32"``, ``"fp32"``, ``"constexpr"``), ``constexprs`` gives the constexpr values."""

    name: str
    fn: Callable
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    note: str = ""
    targets: tuple = tuple(TARGETS)
    extra: Dict[str, Any] = field(default_factory=dict)


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} not found next to triton ({path}); is this triton built for CUDA?")
    return path


def compile_config(cfg: KernelConfig, target: str) -> Dict[str, Any]:
    """Compile ``cfg`` for ``target`` and return its resource usage.

    Keys: ``registers``, ``spill_bytes`` (local memory + stack), ``shared_bytes``,
    ``tensor_core`` (e.g. ``"HGMMA.64x64x16.F32 x4"`` or ``"none"``), ``sass_ldl_stl``.
    """
    if interpreting():
        raise RuntimeError("compile_config needs TRITON_INTERPRET unset (run in a separate process)")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {sorted(TARGETS)}")

    # Arguments left out take their defaults (as at a launch); ASTSource needs every one spelt out.
    signature, constexprs = dict(cfg.signature), dict(cfg.constexprs)
    for name, param in inspect.signature(cfg.fn.fn).parameters.items():
        if name not in signature and param.default is not inspect.Parameter.empty:
            signature[name], constexprs[name] = "constexpr", param.default
    # Pointers are 16-byte aligned at run time (torch allocations; the launcher's specialisation
    # sees that): say so, or the compiler assumes unaligned accesses and reports phantom spills.
    names = list(inspect.signature(cfg.fn.fn).parameters)
    signature = {n: signature[n] for n in names}
    ptrs = [i for i, t in enumerate(signature.values()) if t.startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in ptrs}
    src = ASTSource(fn=cfg.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[target], 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    field_ = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))
    mma = re.findall(r"\b(HGMMA\.\S+|HMMA\.\S+)", sass)
    kinds = sorted(set(m.rstrip(";").split(" ")[0] for m in mma))
    tensor_core = ", ".join(f"{k} x{sum(1 for m in mma if m.startswith(k))}" for k in kinds) or "none"
    return {
        "registers": field_("REG"),
        "spill_bytes": field_("LOCAL") + field_("STACK"),
        "shared_bytes": max(field_("SHARED"), int(compiled.metadata.shared)),
        "tensor_core": tensor_core,
        "sass_ldl_stl": len(re.findall(r"\b(LDL|STL)\b", sass)),
    }
