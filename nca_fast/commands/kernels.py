"""`nca-fast kernels --target sm_90a`: compile every kernel configuration the dispatcher can pick, on a
machine without a GPU, and print registers, spills, shared memory and tensor-core instructions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

from ..kernels import catalogue
from ..kernels.compile import SHARED_LIMIT, TARGETS, compile_config
from ..kernels.config import interpreting
from ..utils.files import atomic_write_bytes


def add_parser(sub):
    p = sub.add_parser("kernels", help="compile every kernel configuration for a GPU target (no GPU needed)")
    p.add_argument("--target", action="append", choices=sorted(TARGETS),
                   help="GPU target; repeat for several (default: sm_80 and sm_90a)")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1, help="parallel compiles (default: usable CPUs)")
    p.add_argument("--filter", default="", help="only configurations whose name contains this")
    p.add_argument("--json", help="also write the table as JSON to this file")
    p.set_defaults(func=run)


def _compile(job):
    index, target = job
    cfg = catalogue.compile_configs()[index]
    try:
        res = compile_config(cfg, target)
        if res["shared_bytes"] > SHARED_LIMIT[target]:
            return {"ok": False, **res, "error": f"{res['shared_bytes']} B of shared memory exceed "
                                                 f"{target}'s {SHARED_LIMIT[target]} B per block"}
        return {"ok": True, **res}
    except Exception as e:  # noqa: BLE001  reported in the table; the command fails at the end
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}


def run(args) -> int:
    if interpreting():
        # Under the interpreter @triton.jit gives uncompilable functions: run in a clean process.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "nca_fast.cli", *sys.argv[1:]], env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    targets = args.target or list(TARGETS)
    configs = [(i, c.name, c.note) for i, c in enumerate(catalogue.compile_configs()) if args.filter in c.name]
    jobs = [(i, t) for t in targets for (i, _, _) in configs]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(_compile, jobs))
    rows, failed = [], 0
    head = f"{'target':7} {'configuration':34} {'tile':10} {'regs':>4} {'spill B':>7} {'smem B':>7}  tensor cores"
    print(head + "\n" + "-" * len(head))
    for (index, target), res in zip(jobs, results):
        name, note = next((n, note) for (i, n, note) in configs if i == index)
        rows.append({"target": target, "config": name, "note": note, **res})
        if res["ok"]:
            print(f"{target:7} {name:34} {note[5:]:10} {res['registers']:>4} {res['spill_bytes']:>7} "
                  f"{res['shared_bytes']:>7}  {res['tensor_core']}")
        else:
            failed += 1
            print(f"{target:7} {name:34} ERROR: {res['error']}")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(rows, indent=1).encode())
    print(f"{len(rows) - failed} configurations compiled, {failed} failed")
    return 1 if failed else 0
