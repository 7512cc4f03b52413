"""The actor's inf/NaN check (`all_finite`: one sum per tensor, the element check only after an overflow)."""

from __future__ import annotations

import pytest
import torch

from upgrpo_megatron.megatron.actor import all_finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_element_anywhere_is_found(bad):
    ts = [torch.randn(1000), torch.randn(7, 9), torch.randn(3)]
    assert all_finite(ts)
    for i in range(len(ts)):
        broken = [x.clone() for x in ts]
        broken[i].view(-1)[-1] = bad
        assert not all_finite(broken)


def test_finite_values_whose_sum_overflows_are_finite():
    assert all_finite([torch.full((10,), 3e38)])  # the sum is inf: each element is checked instead
    assert not all_finite([torch.tensor([3e38, 3e38, float("-inf")])])
    assert all_finite(torch.ones(4, dtype=torch.bfloat16) for _ in range(2)) and all_finite([])
