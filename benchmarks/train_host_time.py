"""Host time of a differentiable fused rollout, with the Triton kernels stubbed out (runs on a CPU).

    python benchmarks/train_host_time.py [--steps 64] [--size 16] [--batch 8]

What a training iteration's forward and backward cost the host before any GPU work: the op stepped
``steps`` times (``model.step``: a custom-op dispatch and an autograd node per step and direction),
the rollout as one autograd node launching its kernels (``model.cuda_graphs = False``), and the rollout
node replaying its CUDA graphs (a no-op replay stands in for the graph launch). Every Triton launch is
replaced by a no-op, so Triton's own launcher (per launch, on a GPU) is not counted: the middle row
would pay it ~5 times a step, the last not at all. Prints the best of 5 runs after a warm-up.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # (nothing is compiled; before triton is imported)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nca_fast as nf
from nca_fast.kernels import launch
from nca_fast.kernels import rollout_grad as rg

KERNELS = ("nca_step_kernel", "nca_finalize_kernel", "nca_step_backward_kernel", "perceive_vjp_kernel",
           "reduce_partials_kernel")


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _NoGraph:
    def __init__(self, fn):
        pass

    def replay(self):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    for name in KERNELS:
        setattr(launch, name, _NoLaunch())
    rg.cuda_graph = _NoGraph
    model = nf.NCA(nf.growing_spec(), init_seed=1)
    x = torch.rand(args.batch, model.spec.channels, args.size, args.size)

    def op_steps():
        y = x
        for k in range(args.steps):
            y = model.step(y, seed=1, step=k, backend="triton")
        return y

    def node():
        return model.rollout(x, args.steps, seed=1, backend="triton")

    print(f"growing model, {args.batch}x{args.size}x{args.size}, {args.steps} steps, Triton kernels stubbed out, "
          f"{torch.get_num_threads()} threads")
    for name, fn, graphs in (("op, step by step", op_steps, False), ("rollout node, launches", node, False),
                             ("rollout node, graph replays", node, True)):
        rg.use_graphs = lambda t, g=graphs: g
        times = []
        for _ in range(6):
            model.zero_grad()
            t0 = time.perf_counter()
            fn().sum().backward()
            times.append(time.perf_counter() - t0)
        best = min(times[1:])
        print(f"{name:28s} {best * 1e3:8.2f} ms forward + backward  ({best / args.steps * 1e6:6.1f} us a step)")


if __name__ == "__main__":
    main()
