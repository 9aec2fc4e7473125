"""Attribution patching, integrated gradients and faithfulness against finite differences,
exact patching and closed forms, on tiny random models in float64."""

from __future__ import annotations

import pytest
import torch
from circuit_fixtures import HOOKS, setup

from saelab.analysis.circuits.attribution import (
    attribution_patching,
    integrated_gradients,
    node_gradients,
    patch_values,
)
from saelab.analysis.circuits.faithfulness import (
    ablation_values,
    default_counts,
    faithfulness_curve,
)
from saelab.analysis.circuits.spliced import SiteEdit, SiteValues, SplicedModel
from saelab.analysis.circuits.tasks import TaskBatch, clean_metric

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

# GPT-2 computes in float64 throughout; Llama's RMSNorm upcasts to float32 and rounds the
# metric to ~1e-7, which finite differences with a small step cannot resolve.
FAMILY = "gpt2"


def metric_with(spliced: SplicedModel, batch: TaskBatch, values: dict[str, SiteValues]):
    """The metric with the sites in `values` set to those features and errors (others run)."""
    edits = {
        h: SiteEdit(features=lambda _, f=v.feats_NPF: f, error=lambda _, e=v.error_NPD: e)
        for h, v in values.items()
    }
    return spliced.metric(batch, edits)


def nudged(values: SiteValues, delta: float, *, feature=None, error=None) -> SiteValues:
    feats, errs = values.feats_NPF.clone(), values.error_NPD.clone()
    if feature is not None:
        feats[feature] += delta
    if error is not None:
        index, direction = error
        errs[index] += delta * direction
    return SiteValues(feats, errs)


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_attribution_patching_matches_finite_differences(architecture):
    spliced, batch = setup(FAMILY, architecture, dtype=torch.float64)
    clean = spliced.site_values(batch.tokens_NP, batch.mask_NP)
    delta = 1e-6
    g = torch.Generator().manual_seed(0)
    # Patch = clean + δ·R: every node's ATP estimate is then δ·∇m·R_node.
    directions = {
        h: SiteValues(
            torch.randn(v.feats_NPF.shape, generator=g, dtype=torch.float64),
            torch.randn(v.error_NPD.shape, generator=g, dtype=torch.float64),
        )
        for h, v in clean.items()
    }
    patched = {
        h: SiteValues(
            v.feats_NPF + delta * directions[h].feats_NPF,
            v.error_NPD + delta * directions[h].error_NPD,
        )
        for h, v in clean.items()
    }
    effects = attribution_patching(spliced, batch, patched=patched)
    base = metric_with(spliced, batch, clean)
    checked = 0
    for hook in HOOKS:
        for n, p in [(0, 1), (1, 2), (3, int(batch.last_N[3]))]:
            f = int(clean[hook].feats_NPF[n, p].argmax())  # an active feature, and feature 0
            for feature in {f, 0}:
                r = float(directions[hook].feats_NPF[n, p, feature])
                moved = metric_with(
                    spliced, batch, {hook: nudged(clean[hook], delta * r, feature=(n, p, feature))}
                )
                fd = float(moved[n] - base[n])
                ie = float(effects.features[hook][n, p, feature])
                assert ie == pytest.approx(fd, rel=1e-4, abs=1e-12)
                checked += abs(fd) > 1e-9
            d = directions[hook].error_NPD[n, p]
            moved = metric_with(
                spliced, batch, {hook: nudged(clean[hook], delta, error=((n, p), d))}
            )
            fd = float(moved[n] - base[n])
            assert float(effects.errors[hook][n, p]) == pytest.approx(fd, rel=1e-4, abs=1e-12)
            checked += abs(fd) > 1e-9
    assert checked >= 12  # the check is not vacuous: most nodes move the metric


def test_an_earlier_sites_gradient_reaches_through_a_later_spliced_site():
    spliced, batch = setup(FAMILY, dtype=torch.float64)
    only_first = SplicedModel(spliced.model, {HOOKS[0]: spliced.saes[HOOKS[0]]})
    both = node_gradients(spliced, batch, spliced.site_values(batch.tokens_NP, batch.mask_NP))
    alone = node_gradients(
        only_first, batch, only_first.site_values(batch.tokens_NP, batch.mask_NP)
    )
    # The later site with its error term is transparent, also for gradients (straight through).
    assert torch.allclose(both[HOOKS[0]].feats_NPF, alone[HOOKS[0]].feats_NPF, atol=1e-10)
    assert torch.allclose(both[HOOKS[0]].error_NPD, alone[HOOKS[0]].error_NPD, atol=1e-10)
    assert both[HOOKS[0]].error_NPD.abs().max() > 0


def test_integrated_gradients_converge_to_the_exact_effect_of_patching_a_site():
    spliced, batch = setup(FAMILY, dtype=torch.float64)
    clean = spliced.site_values(batch.tokens_NP, batch.mask_NP)
    patched = patch_values(spliced, batch, clean)
    gaps = []
    for steps in (2, 32):
        effects = integrated_gradients(spliced, batch, steps)
        for hook in HOOKS:
            exact = metric_with(spliced, batch, {hook: patched[hook]}) - metric_with(
                spliced, batch, clean
            )
            total = effects.features[hook].sum((1, 2)) + effects.errors[hook].sum(1)
            gaps.append(((total - exact).abs().max() / exact.abs().max()).item())
    coarse, fine = gaps[: len(HOOKS)], gaps[len(HOOKS) :]
    assert max(fine) < 0.03
    assert all(f < c / 10 for f, c in zip(fine, coarse, strict=True))  # error shrinks like 1/N


def test_integrated_gradients_with_one_step_is_attribution_patching():
    spliced, batch = setup(FAMILY, dtype=torch.float64)
    ig = integrated_gradients(spliced, batch, steps=1)
    atp = attribution_patching(spliced, batch)
    for hook in HOOKS:
        assert torch.allclose(ig.features[hook], atp.features[hook], atol=1e-10)
        assert torch.allclose(ig.errors[hook], atp.errors[hook], atol=1e-10)


def test_unpaired_tasks_patch_to_zero():
    spliced, batch = setup(FAMILY, dtype=torch.float64, corrupted=False)
    clean = spliced.site_values(batch.tokens_NP, batch.mask_NP)
    effects = attribution_patching(spliced, batch)
    grads = node_gradients(spliced, batch, clean)
    for hook in HOOKS:
        expected = -grads[hook].feats_NPF * clean[hook].feats_NPF
        assert torch.allclose(effects.features[hook], expected)


def test_default_counts_closed_form():
    assert default_counts(7) == [0, 1, 2, 5, 7]
    assert default_counts(20) == [0, 1, 2, 5, 10, 20]
    assert default_counts(1) == [0, 1]


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_faithfulness_curve_runs_from_empty_to_full_model(ablation):
    spliced, batch = setup(FAMILY, dtype=torch.float64)
    effects = attribution_patching(spliced, batch)
    curve = faithfulness_curve(spliced, batch, effects, ablation=ablation)
    n_all = sum(s.d_sae for s in spliced.saes.values())
    assert curve["n_features"][0] == 0 and curve["n_features"][-1] == n_all
    assert curve["faithfulness"][0] == 0
    # Everything kept and the error terms kept: the model itself.
    assert curve["metric"][-1] == pytest.approx(float(clean_metric(spliced.model, batch).mean()))
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-6)
    if ablation == "zero":
        zeroed = {h: SiteEdit(features=torch.zeros_like) for h in HOOKS}
        assert curve["metric"][0] == pytest.approx(float(spliced.metric(batch, zeroed).mean()))


def test_mean_ablation_values_are_the_patch_batch_mean_over_spliced_positions():
    spliced, batch = setup(FAMILY, dtype=torch.float64)
    values = ablation_values(spliced, batch, "mean")
    corrupted = spliced.site_values(batch.corrupted_NP, batch.mask_NP)
    splice = spliced.splice_mask(batch.mask_NP)
    for hook in HOOKS:
        rows = corrupted[hook].feats_NPF[splice]
        assert torch.allclose(values[hook][0], rows.mean(0))
        assert torch.allclose(values[hook][1], corrupted[hook].error_NPD[splice].mean(0))
