import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from cases import dense_hessian, make_case

torch.set_num_threads(min(2, torch.get_num_threads()))


@functools.cache
def _reference(name: str) -> torch.Tensor:
    return dense_hessian(make_case(name, torch.float64))


@pytest.fixture
def reference():
    """``reference(name)``: the dense float64 Hessian of case ``name`` (cached for the session)."""
    return _reference


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a busy 2-core machine two OpenMP threads spin-wait on each other and run small
    models 10-100x slower (OMP_WAIT_POLICY=PASSIVE, set before torch starts, also avoids it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
