"""core.cpus: the single-threaded block restores the caller's thread settings, and small models
only get it."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_info

from moe_utils.core.cpus import SMALL_MODEL_WIDTH, single_threaded_math, small_model_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_single_threaded_math_limits_torch_and_blas_then_restores(two_threads) -> None:
    with single_threaded_math():
        assert torch.get_num_threads() == 1
        assert all(lib["num_threads"] == 1 for lib in threadpool_info())
    assert torch.get_num_threads() == 2


def test_single_threaded_math_restores_after_an_error(two_threads) -> None:
    with pytest.raises(KeyError), single_threaded_math():
        raise KeyError("inside")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(("width", "inside"), [(128, 1), (SMALL_MODEL_WIDTH - 1, 1), (SMALL_MODEL_WIDTH, 2), (4096, 2)])
def test_small_model_threads_only_narrows_small_models(two_threads, width: int, inside: int) -> None:
    with small_model_threads(width):
        assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == 2
