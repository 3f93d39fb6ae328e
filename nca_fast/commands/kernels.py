"""`nca-fast kernels --target sm_90a`: compile every kernel configuration the dispatchers can pick, on a
machine without a GPU, and report what the SASS of each one's persistent loop costs: registers, spills
(bytes; "lmem": local-memory loads and stores inside the loop, what a spill costs per tile), shared
memory, resident CTAs, warp-instructions per cell, barriers and shuffles per tile, global load / store
widths, tensor-core instructions. Fails on a compile error, on shared memory beyond a block's limit, and
(sm_90a, triton 3.9) on a step that spills beyond its limit (none but the "ieee" precision and the
largest shape class may spill: ``catalogue.SPILL_LIMITS``), on spill traffic in any kernel's loop (but
those two: ``catalogue.LOOP_SPILLS_ALLOWED``) or on a step beyond its budget (``catalogue.BUDGETS``).
``--dump DIR`` writes each configuration's cubin and DIR/configs.json to disassemble them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton

from ..kernels import catalogue
from ..kernels.compile import SHARED_LIMIT, TARGETS, compile_config
from ..kernels.config import interpreting
from ..utils.files import atomic_write_bytes, check_output
from . import described

BUDGET_TRITON = "3.9"  # the release the budgets were set on; other releases are reported, not gated


def add_parser(sub):
    p = sub.add_parser("kernels", help="compile every kernel configuration for a GPU target (no GPU needed)",
                       description=described(__doc__))
    p.add_argument("--target", action="append", choices=sorted(TARGETS),
                   help="GPU target; repeat for several (default: sm_80 and sm_90a)")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1, help="parallel compiles (default: usable CPUs)")
    p.add_argument("--filter", default="", help="only configurations whose name contains this")
    p.add_argument("--json", help="also write the table as JSON to this file")
    p.add_argument("--dump", metavar="DIR", help="write every configuration's cubin into DIR, and DIR/configs.json")
    p.set_defaults(func=run)


def _compile(job):
    index, target = job
    cfg = catalogue.compile_configs()[index]
    try:
        res = compile_config(cfg, target)
    except Exception as e:  # noqa: BLE001  reported in the table; the command fails at the end
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}
    res.pop("sass")
    problems = []
    if res["shared_bytes"] > SHARED_LIMIT[target]:
        problems.append(f"{res['shared_bytes']} B of shared memory exceed {target}'s {SHARED_LIMIT[target]} B "
                        "per block")
    gated = target == "sm_90a" and triton.__version__.startswith(BUDGET_TRITON)
    if gated:
        problems += catalogue.budget_problems(cfg.meta, res)
    return {"ok": not problems, **res, "error": "; ".join(problems)}


def _loads(widths: dict) -> str:
    return " ".join(f"{n}x{w}" for w, n in widths.items()) or "-"


def run(args) -> int:
    if interpreting():
        # Under the interpreter @triton.jit gives uncompilable functions: run in a clean process.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "nca_fast.cli", *args.argv], env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.json:  # (before compiling anything)
        check_output(args.json, (".json",), "--json")
    if args.dump and Path(args.dump).exists() and not Path(args.dump).is_dir():
        raise NotADirectoryError(f"--dump {args.dump} is a file, not a folder")
    targets = args.target or list(TARGETS)
    all_cfgs = catalogue.compile_configs()
    configs = [(i, c) for i, c in enumerate(all_cfgs) if args.filter in c.name]
    if not configs:
        raise ValueError(f"--filter {args.filter!r} matches no configuration (names are like "
                         f"{all_cfgs[0].name!r}, {all_cfgs[-1].name!r})")
    jobs = [(i, t) for t in targets for i, c in configs if t in c.targets]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(_compile, jobs))
    head = (f"{'target':7} {'configuration':44} {'regs':>4} {'spill':>5} {'lmem':>4} {'smem':>6} {'CTAs':>4} "
            f"{'wi/cell':>7} {'bars':>4} {'shfl':>4}  loads (n x bits) / stores  tensor cores")
    print(head + "\n" + "-" * len(head))
    rows, failed, dumped = [], 0, []
    dump = Path(args.dump) if args.dump else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
    for (index, target), res in zip(jobs, results):
        cfg = all_cfgs[index]
        cubin = res.pop("cubin", None)
        row = {"target": target, "config": cfg.name, "note": cfg.note, "num_warps": cfg.num_warps, **cfg.meta,
               **res}
        rows.append(row)
        if "registers" in res:
            wi = res["warp_instructions_per_cell"]
            print(f"{target:7} {cfg.name:44} {res['registers']:>4} {res['spill_bytes']:>5} {res['loop_spills']:>4} "
                  f"{res['shared_bytes']:>6} "
                  f"{res['resident_ctas']:>4} {'-' if wi is None else f'{wi:.1f}':>7} {res['barriers']:>4} "
                  f"{res['shuffles']:>4}  {_loads(res['global_loads'])} / {_loads(res['global_stores'])}  "
                  f"{res['tensor_core']}")
        if not res["ok"]:
            failed += 1
            print(f"{'':7} {cfg.name:44} FAILED: {res['error']}")
        if dump and cubin is not None:
            name = cfg.name.replace("/", "_").replace("+", "_") + f".{target}.cubin"
            atomic_write_bytes(dump / name, cubin)
            dumped.append({"name": cfg.name, "target": target, "kernel": cfg.meta.get("kernel"),
                           "model": cfg.meta.get("model"), "dtype": cfg.meta.get("dtype"),
                           "phase": cfg.meta.get("phase"), "interior": cfg.meta.get("interior"),
                           "loads": cfg.meta.get("loads", "plain"),
                           "num_warps": cfg.num_warps, "cells_per_tile": cfg.meta.get("cells_per_tile"),
                           "programs_per_tile": cfg.meta.get("programs_per_tile", 1),
                           "shared_bytes": res["shared_bytes"], "cubin": name})
    if dump:
        atomic_write_bytes(dump / "configs.json", json.dumps(dumped, indent=1).encode())
    if args.json:
        atomic_write_bytes(args.json, json.dumps(rows, indent=1).encode())
    if "sm_90a" in targets and not triton.__version__.startswith(BUDGET_TRITON):
        print(f"note: the instruction budgets are set for triton {BUDGET_TRITON}; this is triton "
              f"{triton.__version__}: reported, not enforced")
    print(f"{len(rows) - failed} configurations passed, {failed} failed")
    return 1 if failed else 0
