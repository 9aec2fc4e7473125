"""Shrinkage: L1 SAEs under-reconstruct (γ < 1, worse as λ grows); TopK and Gated do not."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.saes import GatedSAE, ReLUSAE, TopKSAE
from saelab.saes.metrics import ReconstructionStats
from saelab.training.trainer import Trainer

D_IN, BATCH, STEPS = 32, 256, 300


def sparse_batches(seed: int, n: int):
    directions = torch.randn(96, D_IN, generator=torch.Generator().manual_seed(1234))
    directions /= directions.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.randint(0, 96, (BATCH, 3), generator=g)
        coef = torch.rand(BATCH, 3, generator=g) * 4
        yield {"h": (coef[..., None] * directions[idx]).sum(1)}


def gamma_of(sae) -> float:
    stats = ReconstructionStats(sae.d_in, sae.d_sae)
    with torch.no_grad():
        for batch in sparse_batches(seed=0, n=4):  # same directions, fresh draws after training
            x = batch["h"]
            feats = sae.encode_normalised(x)
            stats.update(x, sae.decode_feats(feats), feats.l0_per_token(), feats.fired_counts())
    return stats.compute()["gamma"]


@pytest.fixture(scope="module")
def trained(one_thread):
    saes = {
        "relu_small": ReLUSAE(
            SAEConfig(hook="h", architecture="relu", expansion=4, l1_coefficient=0.3, name="a"),
            D_IN,
            seed=0,
        ),
        "relu_large": ReLUSAE(
            SAEConfig(hook="h", architecture="relu", expansion=4, l1_coefficient=3.0, name="b"),
            D_IN,
            seed=0,
        ),
        "topk": TopKSAE(SAEConfig(hook="h", k=3, expansion=4, name="c"), D_IN, seed=0),
        "gated": GatedSAE(
            SAEConfig(hook="h", architecture="gated", expansion=4, l1_coefficient=1.0, name="d"),
            D_IN,
            seed=0,
        ),
    }
    cfg = TrainConfig(tokens=BATCH * STEPS, batch_size=BATCH, lr=3e-3)
    Trainer(list(saes.values()), cfg, None, progress=False).fit(sparse_batches(1, STEPS))
    return {name: gamma_of(sae) for name, sae in saes.items()}


def test_l1_shrinks_and_shrinks_more_with_larger_lambda(trained):
    assert trained["relu_large"] < trained["relu_small"] < 1.0
    assert trained["relu_large"] < 0.95


def test_topk_and_gated_are_nearly_unbiased(trained):
    assert abs(trained["topk"] - 1) < 0.03
    assert abs(trained["gated"] - 1) < abs(trained["relu_large"] - 1)
