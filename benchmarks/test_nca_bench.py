"""The benchmark cases through pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Grouped by case, providers side by side. Each provider is verified against the reference before it
is timed; nothing about speed is asserted. Not part of the CI test command (``testpaths = tests``).
Set ``NCA_BENCH_SIZES`` (e.g. ``"64 256"``) to choose the grid sizes.
"""
import itertools
import os

import pytest
import torch

from nca_fast.bench import PROVIDER_NAMES, all_providers, default_model, make_cases, realistic_state, verify
from nca_fast.bench import cases as C

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_default_sizes = C.GPU_SIZES if DEVICE.type == "cuda" else C.CPU_QUICK_SIZES
SIZES = [int(s) for s in os.environ.get("NCA_BENCH_SIZES", "").split()] or list(_default_sizes)
CASES = make_cases(["growing", "texture"], SIZES)
_models = {}


def _model(name):
    if name not in _models:
        _models[name] = default_model(name).to(DEVICE)
    return _models[name]


@pytest.mark.parametrize("provider", PROVIDER_NAMES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_step(benchmark, case, provider):
    model = _model(case.model)
    prov = all_providers()[provider]
    x = realistic_state(model, case.batch, case.size, device=DEVICE)
    reason = prov.unavailable(model, x)
    if reason:
        pytest.skip(reason)
    runner = prov.prepare(model, x)
    verify(runner, model, x)  # a provider that computes something else is never timed
    inputs = realistic_state(model, case.batch * 4, case.size, seed=1, device=DEVICE,
                             dtype=runner.dtype).split(case.batch)
    counter = itertools.count()

    def one_step():
        k = next(counter)
        runner.step(inputs[k % len(inputs)], k)
        runner.sync()

    benchmark.group = case.label
    benchmark.extra_info.update(provider=provider, cells=case.cells, compile_s=runner.compile_s)
    benchmark.pedantic(one_step, rounds=5 if case.size <= 256 else 3, warmup_rounds=1)
