"""Scoring against the synthetic truth: oracles (the true dictionary scores 1, a permuted and
rescaled copy the same, latents that always fire score the closed-form F1), chance for random
decoders, the matchings, and the suite end to end."""

import dataclasses
import itertools
import math

import pytest
import torch

from saelab.config import SAEConfig
from saelab.data import synthetic
from saelab.data.synthetic import SYNTHETIC_HOOK, SyntheticActivations, SyntheticConfig
from saelab.evaluation.bench.intervals import mean_interval
from saelab.evaluation.bench.synth import (
    SYNTH_METRICS,
    SynthBenchConfig,
    _greedy_matching,
    abs_cosines,
    match_one_to_one,
    run_synth_bench,
    score_against_truth,
)
from saelab.saes.jumprelu import JumpReLUSAE
from saelab.saes.relu import ReLUSAE

pytestmark = pytest.mark.usefixtures("one_thread")

ORTHOGONAL = SyntheticConfig(
    d=48,
    n_features=40,
    directions="orthogonal",
    mean_active=5,
    n_parents=4,
    children_per_parent=2,
    n_groups=2,
    group_size=4,
    magnitude="lognormal",
)
"""Exactly recoverable: N <= d orthogonal directions, no noise, magnitudes never near 0."""


def relu_sae(W_dec_FD: torch.Tensor, W_enc_DF: torch.Tensor) -> ReLUSAE:
    """A ReLU SAE with exactly these weights and zero biases (raw units, scale 1)."""
    F, D = W_dec_FD.shape
    sae = ReLUSAE(SAEConfig(hook=SYNTHETIC_HOOK, architecture="relu", width=F), D, seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(W_dec_FD)
        sae.W_enc.copy_(W_enc_DF)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def jumprelu_sae(
    W_dec_FD: torch.Tensor, W_enc_DF: torch.Tensor, threshold_F: torch.Tensor
) -> JumpReLUSAE:
    """A JumpReLU SAE with these weights and thresholds, zero biases: the threshold keeps the
    float rounding of x·d_j (≈ 1e-7 for an inactive j) from firing."""
    F, D = W_dec_FD.shape
    cfg = SAEConfig(hook=SYNTHETIC_HOOK, architecture="jumprelu", width=F, decoder_unit_norm=False)
    sae = JumpReLUSAE(cfg, D, seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(W_dec_FD)
        sae.W_enc.copy_(W_enc_DF)
        sae.threshold.copy_(threshold_F)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_the_true_dictionary_scores_one_and_a_permuted_rescaled_copy_the_same():
    held_out = SyntheticActivations(ORTHOGONAL, batch_size=1024, seed=7)
    truth = held_out.true_directions
    oracle = jumprelu_sae(truth, truth.T, torch.full((ORTHOGONAL.n_features,), 1e-3))
    scores = score_against_truth(oracle, truth, held_out, n_rows=4096)
    for metric in ("mcc", "f1", "precision", "recall", "uniqueness", "matched_once"):
        assert scores[metric] == pytest.approx(1.0, abs=1e-6), metric
    for metric in ("shrinkage", "shrinkage_true_directions", "explained_variance"):
        assert scores[metric] == pytest.approx(1.0, abs=1e-5), metric
    assert scores["l0"] == pytest.approx(scores["true_l0"])
    assert scores["frac_dead"] == 0
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(ORTHOGONAL.n_features, generator=gen)
    c_F = torch.rand(ORTHOGONAL.n_features, generator=gen) * 3 + 0.2
    copy = jumprelu_sae(truth[perm] * c_F[:, None], truth[perm].T / c_F, 1e-3 / c_F)
    copied = score_against_truth(copy, truth, held_out, n_rows=4096)
    for metric in SYNTH_METRICS:
        assert copied[metric] == pytest.approx(scores[metric], abs=1e-5), metric


def test_latents_that_always_fire_score_the_closed_form_f1():
    """A latent on every row has precision p (its feature's frequency) and recall 1:
    F1 = 2p / (1 + p)."""
    held_out = SyntheticActivations(ORTHOGONAL, batch_size=1024, seed=3)
    truth = held_out.true_directions
    sae = relu_sae(truth, torch.zeros_like(truth.T))
    with torch.no_grad():
        sae.b_enc.fill_(1.0)
    freq_N = sum(held_out.batch(i).active_BN().double().sum(0) for i in range(2)) / 2048
    scores = score_against_truth(sae, truth, held_out, n_rows=2048)
    assert scores["recall"] == pytest.approx(float((freq_N > 0).double().mean()))
    assert scores["precision"] == pytest.approx(float(freq_N.mean()))
    assert scores["f1"] == pytest.approx(float((2 * freq_N / (1 + freq_N)).mean()))
    assert scores["l0"] == ORTHOGONAL.n_features


def test_a_random_decoder_scores_near_chance():
    cfg = SyntheticConfig(d=32, n_features=128, mean_active=6, n_parents=4, n_groups=2)
    held_out = SyntheticActivations(cfg, batch_size=1024, seed=1)
    truth = held_out.true_directions
    gen = torch.Generator().manual_seed(5)
    W_dec = torch.randn(128, 32, generator=gen)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    scores = score_against_truth(relu_sae(W_dec, W_dec.T), truth, held_out, n_rows=2048)
    # E|cos| of two random unit vectors in d dims: Γ(d/2) / (√π Γ((d+1)/2)); the best matching
    # is at least the mean of any fixed matching (≈ that) and at most the mean of row maxima.
    d = cfg.d
    chance = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    row_max = float(abs_cosines(W_dec, truth).max(dim=1).values.mean())
    assert 0.9 * chance <= scores["mcc"] <= row_max < 0.6
    # A detector independent of its feature (frequency p) has F1 = 2pr / (p + r) at firing rate
    # r, at most 2p / (1 + p) (always on); random latents stay near that.
    freq_N = sum(held_out.batch(i).active_BN().double().sum(0) for i in range(2)) / 2048
    best_F = abs_cosines(W_dec, truth).argmax(dim=1)
    chance_f1 = float((2 * freq_N[best_F] / (1 + freq_N[best_F])).mean())
    assert scores["f1"] < 1.2 * chance_f1 < 0.15


def test_hungarian_matching_is_the_best_one_to_one_and_greedy_is_one_to_one():
    gen = torch.Generator().manual_seed(0)
    cos = torch.rand(5, 6, generator=gen)
    rows, cols, method = match_one_to_one(cos)
    assert method == "hungarian"
    best = max(
        sum(float(cos[r, c]) for r, c in zip(range(5), perm, strict=True))
        for perm in itertools.permutations(range(6), 5)
    )
    assert float(cos[rows, cols].sum()) == pytest.approx(best)
    g_rows, g_cols = _greedy_matching(cos)
    assert len(set(g_rows.tolist())) == len(g_rows) == 5
    assert len(set(g_cols.tolist())) == len(g_cols)
    assert float(cos[g_rows, g_cols].sum()) <= best + 1e-9
    # A hidden permutation is found by both.
    perm = torch.randperm(6, generator=gen)
    clear = torch.eye(6)[perm] * 0.9 + 0.05 * torch.rand(6, 6, generator=gen)
    g_rows, g_cols = _greedy_matching(clear)
    assert torch.equal(g_cols[torch.argsort(g_rows)], perm)


def test_seed_intervals_shrink_as_seeds_grow():
    """The MCC of random decoders, one per seed: the 95 % half-width falls with the seeds."""
    cfg = SyntheticConfig(d=16, n_features=32, mean_active=3, n_parents=0, n_groups=0)
    truth = cfg.true_directions()
    values = []
    for seed in range(40):
        W = torch.randn(32, 16, generator=torch.Generator().manual_seed(seed))
        rows, cols, _ = match_one_to_one(abs_cosines(W, truth))
        values.append(float(abs_cosines(W, truth)[rows, cols].mean()))
    halves = [mean_interval(values[:n])[1] for n in (3, 10, 40)]
    assert halves[0] > halves[1] > halves[2] > 0


def test_the_suite_trains_every_architecture_and_reports_per_seed(tmp_path):
    from saelab.evaluation.bench.registry import load_suites
    from saelab.evaluation.bench.results import merge_results

    suite = load_suites().lookup("synth")
    assert suite.options is SynthBenchConfig and not suite.needs_sae_dirs
    opts = SynthBenchConfig(
        architectures=("topk", "relu"),
        k=3,
        tokens=2048,
        batch_size=256,
        seeds=2,
        eval_rows=512,
        d=16,
        n_features=32,
        mean_active=3,
        n_parents=2,
        children_per_parent=2,
        n_groups=1,
        group_size=4,
    )
    result = suite.run([], opts, progress=False)
    assert result["suite"] == "synth"
    assert sorted(result["saes"]) == [
        f"synth/{a}/seed{s}" for a in ("relu", "topk") for s in (0, 1)
    ]
    entry = result["saes"]["synth/topk/seed1"]
    assert set(SYNTH_METRICS) <= set(entry["metrics"])
    assert entry["metrics"]["l0"] == pytest.approx(3, abs=0.5)
    assert entry["info"] == {**entry["info"], "architecture": "topk", "seed": 1, "d_sae": 32}
    mean, half = result["intervals"]["topk"]["mcc"]
    values = [result["saes"][f"synth/topk/seed{s}"]["metrics"]["mcc"] for s in (0, 1)]
    assert (mean, half) == pytest.approx(mean_interval(values))
    doc = merge_results(None, result, dataclasses.asdict(opts))
    assert doc["groups"]["synth/topk"]["metrics"]["mcc"]["n"] == 2
    # Deterministic: the same options give the same scores.
    again = run_synth_bench([], dataclasses.replace(opts, architectures=("topk",)), progress=False)
    assert again["saes"]["synth/topk/seed1"]["metrics"] == entry["metrics"]


def test_options_mirror_the_world_and_its_choices():
    world_fields = {f.name for f in dataclasses.fields(SyntheticConfig)} - {"seed"}
    assert world_fields <= {f.name for f in dataclasses.fields(SynthBenchConfig)}
    assert SynthBenchConfig.CHOICES == {
        "magnitude": synthetic.MAGNITUDES,
        "directions": synthetic.DIRECTIONS,
    }
    assert SynthBenchConfig(world_seed=4).world().seed == 4
    assert SynthBenchConfig().sae_config("relu").width == SynthBenchConfig().n_features


def test_without_scipy_the_matching_is_greedy(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import fails
    held_out = SyntheticActivations(ORTHOGONAL, batch_size=512, seed=0)
    truth = held_out.true_directions
    oracle = jumprelu_sae(truth, truth.T, torch.full((ORTHOGONAL.n_features,), 1e-3))
    scores = score_against_truth(oracle, truth, held_out, n_rows=512)
    assert scores["matching"] == 0.0
    assert scores["mcc"] == pytest.approx(1.0)


def test_the_plot_has_one_bar_per_architecture_with_its_interval(tmp_path):
    from saelab.evaluation.bench.synth import synth_bench_figure, write_synth_bench_png

    result = {
        "intervals": {
            "topk": {"f1": [0.5, 0.1], "mcc": [0.8, 0.05]},
            "relu": {"f1": [0.3, None], "mcc": [0.6, 0.0]},
        },
        "saes": {
            "synth/topk/seed0": {
                "info": {"architecture": "topk"},
                "metrics": {"f1": 0.5, "mcc": 0.8},
            },
            "synth/relu/seed0": {
                "info": {"architecture": "relu"},
                "metrics": {"f1": 0.3, "mcc": 0.6},
            },
        },
    }
    fig = synth_bench_figure(result)
    f1_axes = fig.axes[0]
    heights = [bar.get_height() for bar in f1_axes.patches]
    assert heights == pytest.approx([0.5, 0.3])
    assert [t.get_text() for t in f1_axes.get_xticklabels()] == ["topk", "relu"]
    path = write_synth_bench_png(result, tmp_path / "synth.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bench_document_gives_back_the_synth_result_shape():
    from saelab.evaluation.bench.results import merge_results
    from saelab.evaluation.bench.synth import synth_result_from_bench

    saes = {
        f"synth/{arch}/seed{s}": {
            "metrics": {"f1": 0.1 * s + (arch == "topk"), "mcc": 0.5},
            "info": {"architecture": arch, "seed": s, "group": f"synth/{arch}"},
        }
        for arch in ("topk", "relu")
        for s in range(3)
    }
    doc = merge_results(None, {"suite": "synth", "saes": saes})
    back = synth_result_from_bench(doc)
    assert sorted(back["saes"]) == sorted(saes)
    assert back["intervals"]["topk"]["f1"] == pytest.approx(list(mean_interval([1.0, 1.1, 1.2])))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"architectures": ("nope",)}, "unknown SAE architecture"),
        ({"architectures": ("topk_transcoder",)}, "output_hook"),
        ({"directions": "orthogonal"}, "n_features <= d"),
        ({"seeds": 0}, "--seeds"),
    ],
)
def test_bad_options_are_one_line_errors_before_any_training(changes, words):
    from saelab.errors import SaelabError

    with pytest.raises(SaelabError, match=words) as info:
        run_synth_bench([], SynthBenchConfig(**changes), progress=False)
    assert "\n" not in str(info.value)
