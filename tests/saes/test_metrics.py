"""ReconstructionStats: closed forms on hand-made tensors and invariance to how data is batched."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.saes.metrics import DENSE_THRESHOLD, ReconstructionStats

D, F = 6, 10


def _data(n: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Non-zero mean and unequal scales per dimension, so centring matters.
    return torch.randn(n, D, generator=g, dtype=torch.float64) * torch.arange(1, D + 1) + 3.0


def _stats(x: torch.Tensor, recon: torch.Tensor, *, batch: int | None = None, l0=None, fired=None):
    stats = ReconstructionStats(D, F)
    n = x.shape[0]
    l0 = torch.zeros(n, dtype=torch.int64) if l0 is None else l0
    edges = list(range(0, n, batch or n)) + [n]
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        fired_F = torch.zeros(F, dtype=torch.int64) if fired is None else fired[i]
        stats.update(x[lo:hi], recon[lo:hi], l0[lo:hi], fired_F)
    return stats.compute()


def test_gamma_of_shrunk_reconstruction():
    x = _data()
    m = _stats(x, 0.8 * x)
    assert m["gamma"] == pytest.approx(0.8, abs=1e-9)
    assert m["l2_ratio"] == pytest.approx(0.8, abs=1e-9)
    assert m["cos_sim"] == pytest.approx(1.0, abs=1e-9)


def test_gamma_is_the_optimal_rescaling():
    """γ = argmin_γ' Σ‖x̂/γ' − x‖² (METHODS §2.3): nudging it either way does worse."""
    x = _data()
    recon = 0.7 * x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    gamma = _stats(x, recon)["gamma"]

    def err(g: float) -> float:
        return float((recon / g - x).pow(2).sum())

    assert err(gamma) < err(gamma * 1.01) and err(gamma) < err(gamma * 0.99)


def test_fvu_of_dataset_mean_is_one_and_of_perfect_reconstruction_zero():
    x = _data()
    mean = _stats(x, x.mean(0).expand_as(x).clone())
    assert mean["fvu"] == pytest.approx(1.0, abs=1e-12)
    assert mean["explained_variance"] == pytest.approx(0.0, abs=1e-12)

    perfect = _stats(x, x.clone())
    assert perfect["fvu"] == 0.0 and perfect["mse"] == 0.0
    assert perfect["explained_variance"] == pytest.approx(1.0, abs=1e-12)
    assert perfect["gamma"] == pytest.approx(1.0, abs=1e-12)


def test_constant_offset_is_invisible_to_explained_variance_but_not_to_fvu():
    x = _data()
    offset = torch.linspace(-1, 2, D, dtype=torch.float64)
    m = _stats(x, x + offset)
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-12)
    assert m["fvu"] > 0
    # Closed forms: every token has error ‖offset‖².
    sq = float(offset.pow(2).sum())
    assert m["mse"] == pytest.approx(sq, rel=1e-12)
    assert m["fvu"] == pytest.approx(x.shape[0] * sq / float((x - x.mean(0)).pow(2).sum()))


def test_metrics_match_direct_formulas():
    x = _data()
    recon = 0.9 * x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4)) + 0.2
    m = _stats(x, recon)
    err = x - recon
    assert m["mse"] == pytest.approx(float(err.pow(2).sum(-1).mean()), rel=1e-12)
    assert m["fvu"] == pytest.approx(
        float(err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-12
    )
    ev = 1 - err.var(0, correction=0).sum() / x.var(0, correction=0).sum()
    assert m["explained_variance"] == pytest.approx(float(ev), rel=1e-12)
    assert m["gamma"] == pytest.approx(float(recon.pow(2).sum() / (x * recon).sum()), rel=1e-12)
    cos = torch.nn.functional.cosine_similarity(x, recon, dim=-1).mean()
    assert m["cos_sim"] == pytest.approx(float(cos), rel=1e-12)
    ratio = (recon.norm(dim=-1) / x.norm(dim=-1)).mean()
    assert m["l2_ratio"] == pytest.approx(float(ratio), rel=1e-12)


def test_batching_does_not_change_any_metric():
    """Global sums: one batch of 200 or uneven batches of 7 give the same numbers."""
    x = _data()
    g = torch.Generator().manual_seed(1)
    recon = 0.5 * x + torch.randn(x.shape, generator=g, dtype=torch.float64)
    l0 = torch.randint(0, 20, (x.shape[0],), generator=g)
    n_batches = math.ceil(x.shape[0] / 7)
    fired = torch.randint(0, 3, (n_batches, F), generator=g)

    whole = _stats(x, recon, l0=l0, fired=[fired.sum(0)])
    batched = _stats(x, recon, batch=7, l0=l0, fired=fired)
    assert whole.keys() == batched.keys()
    for key, value in whole.items():
        assert batched[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    # And it is not a mean of per-batch ratios, which would differ.
    per_batch = [_stats(x[i : i + 7], recon[i : i + 7])["fvu"] for i in range(0, 200, 7)]
    assert sum(per_batch) / len(per_batch) != pytest.approx(whole["fvu"], rel=1e-6)


def test_l0_is_mean_active_count():
    x = _data(n=4)
    m = _stats(x, x, l0=torch.tensor([0, 3, 5, 8]))
    assert m["l0"] == pytest.approx(4.0)


def test_frac_dead_and_frac_dense_from_firing_counts():
    n = 100
    x = _data(n=n)
    # Densities 0, 0, 0.05, exactly the threshold (not dense), 0.11, 1.0, 0.5, 0.01, 0.02, 0.03.
    fired = torch.tensor([0, 0, 5, int(DENSE_THRESHOLD * n), 11, 100, 50, 1, 2, 3])
    stats = ReconstructionStats(D, F)
    stats.update(x[:60], x[:60], torch.zeros(60), fired // 2)
    stats.update(x[60:], x[60:], torch.zeros(40), fired - fired // 2)
    m = stats.compute()
    assert m["frac_dead"] == pytest.approx(2 / F)
    assert m["frac_dense"] == pytest.approx(3 / F)
    torch.testing.assert_close(stats.feature_density(), fired.double() / n)
    log = stats.log10_feature_density()
    assert torch.isfinite(log).all()
    assert log[5] == pytest.approx(0.0, abs=1e-9) and log[2] == pytest.approx(math.log10(0.05))
    assert log[0] < -9


def test_reset_forgets_everything():
    x = _data()
    stats = ReconstructionStats(D, F)
    stats.update(x, 0.5 * x, torch.ones(len(x)), torch.ones(F, dtype=torch.int64))
    stats.reset()
    stats.update(x, x, torch.zeros(len(x)), torch.zeros(F, dtype=torch.int64))
    m = stats.compute()
    assert m["fvu"] == 0 and m["l0"] == 0 and m["frac_dead"] == 1 and stats.n_tokens == len(x)


def test_float32_inputs_give_the_same_closed_forms():
    x = _data()
    assert _stats(x.float(), 0.8 * x.float())["gamma"] == pytest.approx(0.8, abs=1e-6)
    stats = ReconstructionStats(D, F)
    assert stats.sum_x_D.dtype == torch.float64
