"""Training checkpoints: everything a run needs to continue bit for bit (model, Adam's moments, the
sample pool, the random generator, the loss history, the iteration) in one safetensors file with the
configuration as JSON metadata. No pickle: nothing in a checkpoint can run code. Written atomically,
so an interrupted run leaves the previous checkpoint intact."""
from __future__ import annotations

import json
from typing import Dict, Tuple

import torch

from ..utils import weights_file
from ..utils.files import InputFileError, atomic_write_bytes, open_input
from ..utils.optional import optional_import

FORMAT_TAG = "nca_fast.train"
MAX_CHECKPOINT_BYTES = 16 << 30  # a pool of 1024 growing states at 72x72 is 340 MB


def save(path, tensors: Dict[str, torch.Tensor], meta: Dict[str, object]) -> None:
    st = optional_import("safetensors.torch", "formats")
    out = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    for k, v in out.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise FloatingPointError(f"training state {k!r} is not finite: refusing to write the checkpoint {path}")
    atomic_write_bytes(path, st.save(out, metadata={"format": FORMAT_TAG, "meta": json.dumps(meta)}))


def load(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    with open_input(path, limit=MAX_CHECKPOINT_BYTES, what="training checkpoint") as f:
        data = f.read()
    try:
        tensors, meta = weights_file.parse(path, data)
    except InputFileError as e:
        raise InputFileError(path, f"corrupt training checkpoint ({e.problem})") from None
    if meta.get("format") != FORMAT_TAG:
        raise InputFileError(path, "not an nca_fast training checkpoint (format tag "
                                   f"{str(meta.get('format'))[:40]!r}, expected {FORMAT_TAG!r})")
    try:
        return tensors, json.loads(meta["meta"])
    except (KeyError, ValueError) as e:
        raise InputFileError(path, f"corrupt training checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def optimizer_tensors(opt: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], list]:
    """An optimizer's state as named tensors plus its param groups (plain JSON)."""
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": torch.as_tensor(v) for i, st in sd["state"].items() for k, v in st.items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor], groups: list) -> None:
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, i, k = name.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
