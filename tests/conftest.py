"""Shared test setup: the Triton interpreter on machines without a GPU, and tests/ importable (for the
NumPy twin ``numpy_nca``) under any import mode."""
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the fused kernels are tested in Triton's interpreter, which must be chosen before
# anything imports a @triton.jit kernel: once, here, for every test module and in any order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture
def np_rng(request):
    """A NumPy Generator seeded from the test's id, so every test draws its own reproducible data."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def single_thread():
    """One intra-op thread: these tests use tiny tensors, and on a busy 2-core machine OpenMP threads
    contending for the cores made them 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
