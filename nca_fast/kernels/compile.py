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
from typing import Any, Callable, Dict, List, Optional, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .config import FP_FUSION, interpreting

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
    maxnreg: Optional[int] = None  # a ptxas register cap (config.register_cap)
    note: str = ""
    targets: tuple = tuple(TARGETS)
    # what it is, for the report and the dump: kernel, model, dtype, phase, interior, cells_per_tile
    meta: Dict[str, Any] = field(default_factory=dict)


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} not found next to triton ({path}); is this triton built for CUDA?")
    return path


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.+?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)")
# Per-SM limits: registers, shared memory (with the 1 KB each block reserves), threads, blocks.
SM_LIMITS = {"sm_80": (65536, 164 * 1024, 2048, 32), "sm_90a": (65536, 228 * 1024, 2048, 32)}


def sass_instructions(sass: str) -> List[Tuple[int, str]]:
    """(address, instruction without its predicate) for every SASS instruction."""
    out = []
    for addr, text in _INSTR.findall(sass):
        text = re.sub(r"^@!?U?P[T0-9]+\s+", "", text.strip())
        out.append((int(addr, 16), text))
    return out


def persistent_loop(sass: str) -> List[str]:
    """The instructions of the outermost loop (the widest backward branch's span), NOPs left out;
    the whole function when there is no loop."""
    instrs = sass_instructions(sass)
    spans = []
    for addr, text in instrs:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr:
            spans.append((int(m.group(1), 16), addr))
    lo, hi = max(spans, key=lambda s: s[1] - s[0]) if spans else (0, 1 << 62)
    return [t for a, t in instrs if lo <= a <= hi and not t.startswith("NOP")]


def loop_counts(loop: List[str]) -> Dict[str, Any]:
    """What a tile of the persistent loop costs: instructions, barriers, shuffles, local-memory
    (spill) loads and stores, and global loads / stores by width (e.g. ``{"128": 4, "32": 8}`` bits)."""
    def widths(op):
        out: Dict[str, int] = {}
        for t in loop:
            head = t.split()[0]
            if head.startswith(op + "."):
                mods = head.split(".")[1:]
                w = next((m for m in mods if m in ("64", "128", "U8", "S8", "U16", "S16")), "32")
                w = {"U8": "8", "S8": "8", "U16": "16", "S16": "16"}.get(w, w)
                out[w] = out.get(w, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))
    return {
        "loop_instructions": len(loop),
        "barriers": sum(1 for t in loop if t.startswith(("BAR.SYNC", "BAR.ARV"))),
        "shuffles": sum(1 for t in loop if t.startswith("SHFL")),
        # a spill's cost is its traffic in the loop: ptxas may also park a few values live across the
        # loop (index masks the epilogue needs) in local memory, once a program
        "loop_spills": sum(1 for t in loop if t.startswith(("LDL", "STL"))),
        "global_loads": widths("LDG"),
        "global_stores": widths("STG"),
    }


def resident_ctas(target: str, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Blocks one SM holds at once: registers (allocated per warp in units of 256), shared memory
    (plus 1 KB per block), threads and the block limit."""
    regs, smem, threads, blocks = SM_LIMITS[target]
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (regs // per_warp) // num_warps
    by_smem = smem // (shared_bytes + 1024)
    return max(0, min(by_regs, by_smem, threads // (32 * num_warps), blocks))


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
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **FP_FUSION,
                                       **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {})})
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
    registers, shared = field_("REG"), max(field_("SHARED"), int(compiled.metadata.shared))
    counts = loop_counts(persistent_loop(sass))
    cells = cfg.meta.get("cells_per_tile")
    return {
        "registers": registers,
        "spill_bytes": field_("LOCAL") + field_("STACK"),
        "shared_bytes": shared,
        "tensor_core": tensor_core,
        "sass_ldl_stl": len(re.findall(r"\b(LDL|STL)\b", sass)),
        "resident_ctas": resident_ctas(target, registers, shared, cfg.num_warps),
        **counts,
        # (per cell-update: a kernel whose tiles are shared by several programs, e.g. the backward's
        # hidden chunks, counts each of them; one whose loop runs several times a tile, each run)
        "warp_instructions_per_cell": (counts["loop_instructions"] * cfg.num_warps
                                       * cfg.meta.get("programs_per_tile", 1) * cfg.meta.get("loop_trips", 1)
                                       / cells if cells else None),
        "cubin": compiled.asm["cubin"],
        "sass": sass,
    }
