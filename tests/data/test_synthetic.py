"""The synthetic activation generator: determinism, the structure it promises (hierarchy, Zipf
marginals, correlated groups), its units and its one-line configuration errors."""

import math

import pytest
import torch

from saelab.data.synthetic import (
    SYNTHETIC_HOOK,
    SyntheticActivations,
    SyntheticConfig,
    _bernoulli_events,
)
from saelab.errors import SaelabError

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = SyntheticConfig(
    d=32, n_features=256, mean_active=6, n_parents=8, children_per_parent=3, n_groups=4
)


def test_batches_are_deterministic_per_seed_and_index():
    a = SyntheticActivations(SMALL, batch_size=256, seed=3)
    b = SyntheticActivations(SMALL, batch_size=256, seed=3)
    other = SyntheticActivations(SMALL, batch_size=256, seed=4)
    assert torch.equal(a.batch(5).x_BD, b.batch(5).x_BD)
    assert torch.equal(a.batch(5).idx_BK, b.batch(5).idx_BK)
    assert not torch.equal(a.batch(5).x_BD, a.batch(6).x_BD)
    assert not torch.equal(a.batch(5).x_BD, other.batch(5).x_BD)
    # The same world whatever the stream seed; another world seed changes the directions.
    assert torch.equal(a.true_directions, other.true_directions)
    other_world = SyntheticActivations(SyntheticConfig(**{**vars(SMALL), "seed": 1}), 256, 3)
    assert not torch.equal(a.true_directions, other_world.true_directions)
    # Iteration yields batch i in training units, and resumes from its position alone.
    it = iter(a)
    first, second = next(it), next(it)
    assert torch.equal(first[SYNTHETIC_HOOK], a.batch(0).x_BD * a.scale)
    assert torch.equal(second[SYNTHETIC_HOOK], a.batch(1).x_BD * a.scale)
    resumed = SyntheticActivations(SMALL, batch_size=256, seed=3)
    resumed.load_state_dict(a.state_dict())
    assert torch.equal(next(iter(resumed))[SYNTHETIC_HOOK], next(it)[SYNTHETIC_HOOK])


def test_rows_are_the_sum_of_active_directions_times_magnitudes():
    stream = SyntheticActivations(SMALL, batch_size=128, seed=0)
    batch = stream.batch(0)
    expected = batch.to_dense() @ stream.true_directions
    torch.testing.assert_close(batch.x_BD, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(stream.true_directions.norm(dim=-1), torch.ones(SMALL.n_features))
    assert (batch.vals_BK >= 0).all()
    # Each row lists a feature at most once.
    dense_count = torch.zeros(128, SMALL.n_features).scatter_add_(
        1, batch.idx_BK, (batch.vals_BK > 0).float()
    )
    assert dense_count.max() <= 1
    constant = SyntheticActivations(
        SyntheticConfig(**{**vars(SMALL), "magnitude": "constant", "magnitude_mean": 2.0}), 64
    ).batch(0)
    assert set(constant.vals_BK[constant.vals_BK > 0].tolist()) == {2.0}


def test_children_fire_only_with_their_parent_and_siblings_exclude_each_other():
    stream = SyntheticActivations(SMALL, batch_size=4096, seed=1)
    active = stream.batch(0).active_BN()
    child_ids = SMALL.child_ids()
    for parent in range(SMALL.n_parents):
        children = active[:, child_ids[parent]]
        assert children.any()  # the test would pass vacuously otherwise
        assert not (children.any(-1) & ~active[:, parent]).any()
        assert children.sum(-1).max() <= 1
    free = SyntheticConfig(**{**vars(SMALL), "independent_children": True})
    active = SyntheticActivations(free, batch_size=4096, seed=1).batch(0).active_BN()
    children = active[:, free.child_ids()]
    assert (children.any(-1) <= active[:, : free.n_parents]).all()
    assert children.sum(-1).max() >= 2  # siblings may now fire together


def test_firing_frequencies_follow_the_configured_zipf_law():
    cfg = SyntheticConfig(
        d=16, n_features=512, zipf_exponent=0.8, mean_active=10, n_parents=8, n_groups=4
    )
    p = cfg.firing_probabilities()
    assert math.isclose(float(p.sum()), 10.0, rel_tol=1e-12)
    ranks = torch.arange(1, 513, dtype=torch.float64)
    torch.testing.assert_close(p / p[0], ranks.pow(-0.8))
    stream = SyntheticActivations(cfg, batch_size=8192, seed=2)
    rows = 0
    fired = torch.zeros(512, dtype=torch.float64)
    for i in range(4):
        fired += stream.batch(i).active_BN().double().sum(0)
        rows += 8192
    freq = fired / rows
    # Every feature's marginal is p_i, roots, children and grouped ones alike (binomial z-scores).
    z = (freq - p) / (p * (1 - p) / rows).sqrt()
    assert z.abs().max() < 5.5
    frequent = freq[:64]
    fit = torch.linalg.lstsq(
        torch.stack([torch.log(ranks[:64]), torch.ones(64, dtype=torch.float64)], 1),
        torch.log(frequent)[:, None],
    ).solution
    assert abs(float(fit[0]) + 0.8) < 0.05
    assert abs(stream.batch(0).l0() - 10) < 0.3


def test_grouped_features_fire_together():
    cfg = SyntheticConfig(
        d=16, n_features=256, mean_active=8, n_parents=0, n_groups=2, group_correlation=0.9
    )
    active = SyntheticActivations(cfg, batch_size=16384, seed=0).batch(0).active_BN().double()
    group = cfg.groups()[0]
    a, b = active[:, group[0]], active[:, group[1]]
    joint, product = float((a * b).mean()), float(a.mean() * b.mean())
    assert joint > 3 * product
    ungrouped = sorted(set(range(256)) - set(cfg.groups().reshape(-1).tolist()))[:2]
    c, e = active[:, ungrouped[0]], active[:, ungrouped[1]]
    assert float((c * e).mean()) < 2 * float(c.mean() * e.mean()) + 1e-3


def test_yielded_rows_are_in_training_units():
    cfg = SyntheticConfig(**{**vars(SMALL), "noise_std": 0.1})
    stream = SyntheticActivations(cfg, batch_size=4096, seed=0)
    x = next(iter(stream))[SYNTHETIC_HOOK]
    assert abs(float(x.norm(dim=-1).mean()) / math.sqrt(cfg.d) - 1) < 0.03
    # The scale belongs to the world: same for another seed and batch size.
    assert SyntheticActivations(cfg, batch_size=64, seed=9).scale == stream.scale
    noiseless = SyntheticActivations(SMALL, batch_size=64, seed=0).batch(0)
    noisy = SyntheticActivations(cfg, batch_size=64, seed=0).batch(0)
    assert torch.equal(noiseless.idx_BK, noisy.idx_BK)
    residual = noisy.x_BD - noiseless.x_BD
    assert abs(float(residual.std()) - 0.1) < 0.01


def test_geometric_gaps_give_bernoulli_trials():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.05, 1e-3, 0.0, 0.9], dtype=torch.float64)
    counts = torch.zeros(5, dtype=torch.float64)
    for _ in range(20):
        rows, feats = _bernoulli_events(p, 1000, gen)
        assert rows.min() >= 0 and rows.max() < 1000
        keys = feats * 1000 + rows
        assert keys.unique().numel() == keys.numel()  # one success per trial at most
        counts += torch.bincount(feats, minlength=5).double()
    n = 20 * 1000
    expected = p * n
    assert counts[3] == 0
    assert ((counts - expected).abs() <= 5 * (n * p * (1 - p)).sqrt() + 1e-9).all()


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"mean_active": 200.0, "n_features": 256}, "exceed 1"),
        ({"directions": "orthogonal"}, "n_features <= d"),
        ({"n_parents": 100, "children_per_parent": 4}, "fewer parents"),
        ({"magnitude": "uniform"}, "folded_normal"),
        ({"n_groups": 300}, "fewer or smaller groups"),
        ({"children_per_parent": 40, "n_parents": 4, "zipf_exponent": 0.0}, "exclusive"),
    ],
)
def test_impossible_worlds_are_one_line_errors(changes, words):
    with pytest.raises(SaelabError, match=words) as info:
        SyntheticConfig(**{**vars(SMALL), **changes})
    assert "\n" not in str(info.value)
