"""SplicedModel and top-k keeping on tiny random models: invariants and naive references."""

from __future__ import annotations

import pytest
import torch
from circuit_fixtures import HOOKS, setup

from saelab.analysis.circuits.attribution import attribution_patching
from saelab.analysis.circuits.keep import keep_topk_edit, topk_keep_mask
from saelab.analysis.circuits.spliced import SiteEdit, SplicedModel
from saelab.analysis.circuits.tasks import TaskBatch, clean_metric
from saelab.errors import SaelabError
from saelab.evaluation.splice import replaced_logits
from tiny_models import build_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


def clean_logits(spliced: SplicedModel, batch: TaskBatch) -> torch.Tensor:
    mask = batch.mask_NP.long()
    return spliced.model(batch.tokens_NP, attention_mask=mask, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_error_term_splice_reproduces_the_clean_logits(family):
    spliced, batch = setup(family)
    clean = clean_logits(spliced, batch)
    with torch.no_grad():
        with_error = spliced.logits(batch.tokens_NP, batch.mask_NP)
        without = spliced.logits(batch.tokens_NP, batch.mask_NP, add_error=False)
    real = batch.mask_NP
    assert (with_error - clean)[real].abs().max() < 1e-5
    assert (without - clean)[real].abs().max() > 1e-2  # the random SAEs do reconstruct badly


def test_without_error_equals_replacing_the_activation_by_the_reconstruction():
    spliced, batch = setup(hooks=HOOKS[:1])
    sae = spliced.saes[HOOKS[0]]
    with torch.no_grad():
        acts = spliced.site_values(batch.tokens_NP, batch.mask_NP)  # only to get x: f, ε → x
        x_NPD = sae.decode(acts[HOOKS[0]].feats_NPF) + acts[HOOKS[0]].error_NPD
        reference = replaced_logits(
            spliced.model, batch.tokens_NP, HOOKS[0], spliced.splice_mask(batch.mask_NP), sae(x_NPD)
        )
        ours = spliced.logits(batch.tokens_NP, batch.mask_NP, add_error=False)
    # replaced_logits runs without an attention mask: right padding only changes pad positions.
    assert (ours - reference)[batch.mask_NP].abs().max() < 1e-5


def test_bos_position_is_never_spliced():
    spliced, batch = setup()
    with torch.no_grad():
        zeroed = spliced.logits(
            batch.tokens_NP,
            batch.mask_NP,
            {h: SiteEdit(features=torch.zeros_like, add_error=False) for h in HOOKS},
        )
    # Causal attention: position 0's logits depend on position 0's activations only.
    assert torch.allclose(zeroed[:, 0], clean_logits(spliced, batch)[:, 0], atol=1e-6)


@pytest.mark.parametrize("per", ["position", "prompt"])
@pytest.mark.parametrize("add_error", [False, True])
def test_topk_with_k_equal_to_d_sae_is_exactly_the_full_sae(per, add_error):
    spliced, batch = setup()
    splice_NP = spliced.splice_mask(batch.mask_NP)
    d_sae = spliced.saes[HOOKS[0]].d_sae
    edits = {h: keep_topk_edit(d_sae, splice_NP, per=per, add_error=add_error) for h in HOOKS}
    with torch.no_grad():
        full = spliced.logits(batch.tokens_NP, batch.mask_NP, add_error=add_error)
        topk = spliced.logits(batch.tokens_NP, batch.mask_NP, edits)
    assert torch.equal(full, topk)


def test_topk_mask_per_position_matches_sorting():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 5, 11, generator=g)
    splice = torch.ones(3, 5, dtype=torch.bool)
    mask = topk_keep_mask(scores, 4, splice, "position")
    for n in range(3):
        for p in range(5):
            expected = set(scores[n, p].argsort(descending=True)[:4].tolist())
            assert set(mask[n, p].nonzero().squeeze(-1).tolist()) == expected


def test_topk_mask_per_prompt_sums_only_spliced_positions():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 4, 9, generator=g)
    scores[:, 0] = 100.0  # BOS: huge, but not spliced, so it must not decide the ranking
    splice = torch.tensor([[False, True, True, True], [False, True, True, False]])
    mask = topk_keep_mask(scores, 3, splice, "prompt")
    for n in range(2):
        totals = sum(scores[n, p] for p in range(4) if splice[n, p])
        expected = set(totals.argsort(descending=True)[:3].tolist())
        for p in range(4):  # the same features at every position of a prompt
            assert set(mask[n, p].nonzero().squeeze(-1).tolist()) == expected


def test_topk_keeps_k_features_per_position_and_zeroes_the_rest():
    spliced, batch = setup(hooks=HOOKS[:1])
    splice_NP = spliced.splice_mask(batch.mask_NP)
    edit = keep_topk_edit(2, splice_NP, per="position")
    f_NPF = spliced.site_values(batch.tokens_NP, batch.mask_NP)[HOOKS[0]].feats_NPF
    kept = edit.features(f_NPF)
    assert ((kept > 0).sum(-1) <= 2).all()
    top2 = f_NPF.topk(2, dim=-1).values
    assert torch.allclose(kept.topk(2, dim=-1).values, top2)
    assert edit.add_error is False


def test_batched_metric_and_attributions_equal_one_prompt_at_a_time():
    spliced, batch = setup(n=4)
    assert len(set(batch.last_N.tolist())) > 1  # unequal lengths, so there is padding
    with torch.no_grad():
        clean = clean_metric(spliced.model, batch)
        spliced_m = spliced.metric(batch, add_error=False)
    effects = attribution_patching(spliced, batch)
    for i in range(len(batch)):
        one = single(batch, i)
        assert clean_metric(spliced.model, one).item() == pytest.approx(clean[i].item(), abs=1e-5)
        assert spliced.metric(one, add_error=False).item() == pytest.approx(
            spliced_m[i].item(), abs=1e-5
        )
        alone = attribution_patching(spliced, one)
        width = one.tokens_NP.shape[1]
        for hook in HOOKS:
            assert torch.allclose(
                alone.features[hook][0], effects.features[hook][i, :width], atol=1e-5
            )
            assert torch.allclose(alone.errors[hook][0], effects.errors[hook][i, :width], atol=1e-5)
            assert not effects.features[hook][i, width:].any()  # padding is no node


def single(batch: TaskBatch, i: int) -> TaskBatch:
    width = int(batch.last_N[i]) + 1
    return TaskBatch(
        tokens_NP=batch.tokens_NP[i : i + 1, :width],
        mask_NP=batch.mask_NP[i : i + 1, :width],
        last_N=batch.last_N[i : i + 1],
        correct_N=batch.correct_N[i : i + 1],
        incorrect_N=batch.incorrect_N[i : i + 1],
        corrupted_NP=batch.corrupted_NP[i : i + 1, :width],
    )


def test_spliced_model_refuses_mismatched_or_duplicate_saes():
    spliced, _ = setup()
    model = spliced.model
    sae = spliced.saes[HOOKS[0]]
    with pytest.raises(SaelabError, match="at most one SAE per hook"):
        SplicedModel(model, [sae, sae])
    with pytest.raises(SaelabError, match="width"):
        SplicedModel(build_tiny_model("llama"), {"blocks.0.mlp.hook_post": sae})
