"""Grids beyond one device: a rollout split into row blocks across the ranks of a
``torch.distributed`` process group (gloo on CPUs, NCCL on GPUs), equal to the single-device rollout
because every mask is drawn from global coordinates.

    torchrun --nproc-per-node 4 -m nca_fast.distributed growing --size 16384x16384 --steps 1000 --out run/

``rollout.py``: the halo exchange and the k-step schedule; ``blocks.py``: the split and the cost
model for k; ``shards.py``: sharded save and load (a file per rank plus an index).
"""
from .blocks import row_blocks, step_radius, steps_per_exchange
from .rollout import Layout, block_of, seed_block, sharded_rollout
from .shards import load_rows, read_index, save_shards

__all__ = ["row_blocks", "step_radius", "steps_per_exchange", "Layout", "block_of", "seed_block",
           "sharded_rollout", "load_rows", "read_index", "save_shards"]
