"""Scoring: completion log-probabilities and the neutral-text cost against references computed one
unpadded sequence at a time; coefficient 0 scores exactly 0."""

from __future__ import annotations

import pytest
import torch
from steering_fixtures import HOOK, PAIRS, TEXTS

from saelab.analysis.steering.apply import Steering
from saelab.analysis.steering.data import encode, read_text_rows
from saelab.analysis.steering.plot import COST_LINES, EFFECT_LINES
from saelab.analysis.steering.score import (
    SWEEP_KEYS,
    completion_logprobs,
    cost_sweep,
    sweep,
)
from saelab.analysis.steering.vectors import SteeringVector
from tiny_models import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("gpt_neox")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def vector():
    g = torch.Generator().manual_seed(0)
    return SteeringVector(torch.randn(64, generator=g), HOOK, "mean", "tiny")


def full_logprobs(
    model, ids: list[int], steering: Steering | None, prompt_len: int
) -> torch.Tensor:
    """log p(token t | tokens < t) for t ≥ 1 of one unpadded sequence."""
    with torch.no_grad():
        if steering is None:
            logits = model(torch.tensor([ids])).logits[0]
        else:
            with steering.applied(model, prompt_len):
                logits = model(torch.tensor([ids])).logits[0]
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("positions", [None, "all", "after_prompt"])
def test_completion_logprobs_equal_a_one_sequence_reference(
    model, tokenizer, vector, positions
) -> None:
    steering = None if positions is None else Steering(vector, 2.0, positions)
    prompts = [p.prompt for p in PAIRS]
    completions = [p.positive for p in PAIRS]
    expected = []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = [1, *encode(tokenizer, prompt)]
        ids = prompt_ids + encode(tokenizer, completion)
        # Token t is predicted at position t - 1; the completion's tokens are t ≥ len(prompt).
        expected.append(
            full_logprobs(model, ids, steering, len(prompt_ids))[len(prompt_ids) - 1 :].sum()
        )
    got = completion_logprobs(model, tokenizer, prompts, completions, steering)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-4, rtol=1e-5)


def test_neutral_cost_equals_a_one_row_reference(model, tokenizer, vector) -> None:
    rows = read_text_rows(TEXTS, tokenizer, tokens=40, context=6)
    steering = Steering(vector, 3.0)
    (cost,) = cost_sweep(model, rows, [steering])
    ce_clean, ce_steered, kl, n = 0.0, 0.0, 0.0, 0
    for ids, length in zip(rows.ids_NP, rows.lengths_N, strict=True):
        ids = ids[: int(length)][None]
        with torch.no_grad():
            clean = model(ids).logits[0, :-1].log_softmax(-1)
            with steering.applied(model, 1):
                steered = model(ids).logits[0, :-1].log_softmax(-1)
        # Positions 1 .. len-2 are kept (not BOS) and have a next token.
        targets = ids[0, 2:, None]
        ce_clean -= float(clean[1:].gather(-1, targets).sum())
        ce_steered -= float(steered[1:].gather(-1, targets).sum())
        kl += float((clean[1:].exp() * (clean[1:] - steered[1:])).sum())
        n += int(length) - 2
    assert cost["ce_clean"] == pytest.approx(ce_clean / n, rel=1e-4)
    assert cost["delta_ce"] == pytest.approx((ce_steered - ce_clean) / n, rel=1e-4)
    assert cost["kl"] == pytest.approx(kl / n, rel=1e-4)


def test_sweep_rows_hold_every_key_and_coefficient_zero_scores_zero(
    model, tokenizer, vector
) -> None:
    rows = read_text_rows(TEXTS, tokenizer, tokens=30)
    swept = sweep(model, tokenizer, vector, [-2, 0, 2], pairs=PAIRS, neutral=rows)
    assert [row["coef"] for row in swept] == [-2.0, 0.0, 2.0]
    assert all(set(SWEEP_KEYS) <= set(row) for row in swept)
    assert all(swept[1][key] == 0.0 for key in SWEEP_KEYS)
    assert swept[0]["kl"] > 0 and swept[2]["kl"] > 0
    for row in swept:  # the log-odds change is the difference of the two log-prob changes
        difference = row["delta_logprob_target"] - row["delta_logprob_contrast"]
        assert row["delta_logit_diff"] == pytest.approx(difference, abs=1e-5)
    effect_only = sweep(model, tokenizer, vector, [1.0], pairs=PAIRS)
    assert effect_only[0]["kl"] is None and effect_only[0]["delta_logit_diff"] is not None


def test_the_plot_draws_every_sweep_key_once() -> None:
    assert sorted(EFFECT_LINES + COST_LINES) == sorted(SWEEP_KEYS)
