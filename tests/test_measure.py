"""The percentile of `xllm benchmark` agrees with numpy's default (linear) method."""

from __future__ import annotations

import random

import numpy as np
import pytest

from xllm.measure.stream import percentile


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy(n: int, q: float) -> None:
    values = [random.Random(f"{n}-{i}").uniform(0, 5) for i in range(n)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_zero() -> None:
    assert percentile([], 50) == 0.0
