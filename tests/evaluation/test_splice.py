"""Spliced-loss metrics on tiny random models: closed forms and invariants."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig
from saelab.data.activations import token_mask
from saelab.errors import SaelabError
from saelab.evaluation.evaluate import METRIC_KEYS, evaluate_sae
from saelab.evaluation.splice import SpliceSums, kl_per_position, next_token_ce, splice_batch
from saelab.saes import TopKSAE
from tiny_models import FAMILIES, VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.integration

HOOK = "blocks.1.hook_resid_post"


def tokens(n=3, p=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = torch.randint(3, VOCAB_SIZE, (n, p), generator=g)
    out[:, 0] = 1  # BOS
    return out


def test_next_token_ce_matches_a_loop():
    logits = torch.randn(2, 5, 7)
    toks = torch.randint(0, 7, (2, 5))
    ce = next_token_ce(logits, toks)
    for n in range(2):
        for t in range(4):
            expected = -logits[n, t].log_softmax(-1)[toks[n, t + 1]]
            assert ce[n, t].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.all(ce[:, -1] == 0)


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(2, 3, 11)
    assert kl_per_position(a, a).abs().max() < 1e-6
    assert (kl_per_position(a, torch.randn(2, 3, 11)) > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_splice_recovers_everything_and_zero_recovers_nothing(family):
    model = build_tiny_model(family)
    toks = tokens()
    keep = token_mask(toks, 1, [1])
    identity, zero = SpliceSums(), SpliceSums()
    splice_batch(model, HOOK, toks, keep, lambda x: x, identity)
    splice_batch(model, HOOK, toks, keep, torch.zeros_like, zero)
    m = identity.compute()
    assert m["ce_loss_spliced"] == pytest.approx(m["ce_loss_clean"], abs=1e-5)
    assert m["kl"] == pytest.approx(0.0, abs=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["delta_ce"] == pytest.approx(0.0, abs=1e-5)
    z = zero.compute()
    assert z["ce_loss_spliced"] == pytest.approx(z["ce_loss_ablated"], abs=1e-5)
    assert z["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert z["kl"] == pytest.approx(z["kl_ablated"], rel=1e-5)
    # Scored positions: kept ones with a next token (BOS column and the last column excluded).
    assert identity.n_positions == 3 * 10


def test_splice_only_touches_kept_positions():
    model = build_tiny_model("llama")
    toks = tokens(n=1)
    keep = torch.zeros_like(toks, dtype=torch.bool)
    sums = SpliceSums()
    splice_batch(model, HOOK, toks, keep, torch.zeros_like, sums)
    assert sums.n_positions == 0  # nothing replaced, nothing scored


def test_evaluate_sae_reports_exactly_the_metric_keys(words_file):
    model = build_tiny_model("llama")
    sae = TopKSAE(SAEConfig(hook=HOOK, k=8, expansion=2), d_in=64, seed=0)
    metrics, info = evaluate_sae(
        sae,
        model,
        build_tiny_tokenizer(),
        dataset=str(words_file),
        tokens=2048,
        context=32,
        batch_size=8,
        progress=False,
    )
    assert tuple(metrics) == METRIC_KEYS
    assert 0 < metrics["l0"] <= 8
    assert metrics["ce_loss_ablated"] != metrics["ce_loss_clean"]
    assert metrics["fvu"] > 0 and metrics["mse"] > 0
    assert 0 <= metrics["frac_dead"] <= 1
    # 8 batches × 8 rows × 31 positions after BOS, less the few EOS between documents.
    assert 8 * 8 * 31 - 20 < info["tokens"] <= 8 * 8 * 31


def test_evaluate_rejects_an_sae_of_the_wrong_width(words_file):
    model = build_tiny_model("llama")
    sae = TopKSAE(SAEConfig(hook=HOOK, k=8), d_in=32)
    with pytest.raises(SaelabError, match="d_in=32"):
        evaluate_sae(sae, model, build_tiny_tokenizer(), dataset=str(words_file), progress=False)
