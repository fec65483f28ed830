"""pytest-benchmark microbenchmarks: ``pytest benchmarks`` times them, ``pytest benchmarks
--benchmark-disable`` runs each once (the smoke test that CI runs)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def one_thread():
    """The paper's CPU protocol: one thread (restored afterwards)."""
    before = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
