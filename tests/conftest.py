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
