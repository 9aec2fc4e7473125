"""Synthetic SAE training data with a known sparse dictionary (shared by the test modules)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def sparse_stream(
    d_in: int, seed: int = 0, batch: int = 64, n_directions: int = 64, active: int = 3
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``{"h": [batch, d_in]}``: sums of ``active`` of ``n_directions`` fixed unit
    directions with random positive weights. The directions depend only on ``d_in``, so streams
    with different seeds (training and held-out) come from the same dictionary."""
    directions = torch.randn(n_directions, d_in, generator=torch.Generator().manual_seed(1234))
    directions = torch.nn.functional.normalize(directions, dim=-1)
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, n_directions, (batch, active), generator=g)
        coef = 3 * torch.rand(batch, active, generator=g)
        yield {"h": (coef[..., None] * directions[idx]).sum(1)}
