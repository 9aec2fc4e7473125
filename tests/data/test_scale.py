"""The activation-scale rule: √d_in over the mean norm, the same summed whole or in parts."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.data.scale import activation_scale, norm_sum
from saelab.errors import SaelabError


def test_rows_of_norm_two_in_sixteen_dims_get_scale_two():
    rows = torch.zeros(10, 16)
    rows[:, 3] = 2.0
    assert activation_scale(norm_sum(rows), 10, 16, "h") == pytest.approx(math.sqrt(16) / 2)


def test_norm_sums_of_parts_add_up_to_the_whole():
    rows = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0)) * 30
    parts = sum(norm_sum(rows[i : i + 137]) for i in range(0, 1000, 137))
    whole = float(rows.double().norm(dim=-1).sum())
    assert parts == pytest.approx(whole, rel=1e-12) and norm_sum(rows) == pytest.approx(whole)


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf")])
def test_zero_or_non_finite_activations_are_a_one_line_error(value):
    rows = torch.full((4, 8), value)
    with pytest.raises(SaelabError, match="blocks.3.hook_mlp_out") as err:
        activation_scale(norm_sum(rows), 4, 8, "blocks.3.hook_mlp_out")
    assert "\n" not in str(err.value)
