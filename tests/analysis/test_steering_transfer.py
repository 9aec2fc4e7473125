"""Transfer: a vector retains all of its effect where it was built (exactly 1), moves to other
layers and to another model of the same width, and refuses a model of another width."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from steering_fixtures import HOOK, PAIRS
from transformers import AutoModelForCausalLM, LlamaConfig

from saelab.analysis.steering.apply import steer
from saelab.analysis.steering.data import encode
from saelab.analysis.steering.transfer import effects, layer_transfer, model_transfer, retained
from saelab.analysis.steering.vectors import SteeringVector
from saelab.errors import SaelabError
from tiny_models import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

COEFS = [-4.0, 0.0, 4.0]


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    g = torch.Generator().manual_seed(1)
    vector = SteeringVector(2 * torch.randn(64, generator=g), HOOK, "caa", "tiny-llama")
    return model, tokenizer, vector


def log_odds_by_hand(model, tokenizer, vector, coef: float | None) -> float:
    """Mean over PAIRS of log p(target) − log p(contrast), one unpadded sequence at a time,
    with ``coef · vector`` added at every position but BOS (None: the clean model)."""
    diffs = []
    for pair in PAIRS:
        prompt = [tokenizer.bos_token_id, *encode(tokenizer, pair.prompt)]
        logps = []
        for completion in (pair.positive, pair.negative):
            ids = prompt + encode(tokenizer, completion)
            steering = nullcontext() if coef is None else steer(model, vector, coef)
            with torch.no_grad(), steering:
                logits_PV = model(torch.tensor([ids])).logits[0].float()
            # Token t is predicted at position t - 1; the completion's tokens are t ≥ len(prompt).
            logp_P = logits_PV[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])
            logps.append(float(logp_P[len(prompt) - 1 :].sum()))
        diffs.append(logps[0] - logps[1])
    return sum(diffs) / len(diffs)


def effect_by_hand(model, tokenizer, vector, coef: float) -> float:
    """The change of the mean log-odds that ``coef · vector`` makes (the transfer effect)."""
    clean = log_odds_by_hand(model, tokenizer, vector, None)
    return log_odds_by_hand(model, tokenizer, vector, coef) - clean


def test_retained_is_a_ratio_and_none_where_the_reference_is_zero() -> None:
    assert retained([1.0, 0.0, -3.0], [2.0, 0.0, -1.5]) == [0.5, None, 2.0]


def test_layer_transfer_retains_exactly_one_at_the_own_layer(setup) -> None:
    model, tokenizer, vector = setup
    result = layer_transfer(model, tokenizer, vector, [0, 1, 2], COEFS, PAIRS)
    assert result["own_layer"] == 1 and [c["layer"] for c in result["cells"]] == [0, 1, 2]
    own = result["cells"][1]
    assert own["retained"] == [1.0, None, 1.0] and own["hook"] == HOOK
    for cell in (result["cells"][0], result["cells"][2]):
        assert cell["retained"][1] is None
        assert all(isinstance(r, float) for r in (cell["retained"][0], cell["retained"][2]))
    moved = effects(model, tokenizer, vector, COEFS, PAIRS, hook="blocks.2.hook_resid_post")
    assert result["cells"][2]["effect"] == moved


def test_layer_transfer_outside_the_model_is_an_error(setup) -> None:
    model, tokenizer, vector = setup
    with pytest.raises(SaelabError, match="outside this model"):
        layer_transfer(model, tokenizer, vector, [1, 7], COEFS, PAIRS)


def test_model_transfer_to_the_same_model_retains_everything(setup) -> None:
    model, tokenizer, vector = setup
    reference = effects(model, tokenizer, vector, COEFS, PAIRS)
    result = model_transfer(model, tokenizer, vector, COEFS, PAIRS, reference=reference)
    assert result["retained"] == [1.0, None, 1.0]


def test_model_transfer_between_two_models_of_one_width(setup) -> None:
    model, tokenizer, vector = setup
    reference = effects(model, tokenizer, vector, COEFS, PAIRS)
    other = build_tiny_model("gemma", seed=3)
    result = model_transfer(other, tokenizer, vector, COEFS, PAIRS, reference=reference)
    assert result["from_model"] == "tiny-llama" and result["retained"][1] is None
    assert result["effect"] == effects(other, tokenizer, vector, COEFS, PAIRS)
    for i in (0, 2):  # coefficient 0 has no effect to retain
        here = effect_by_hand(model, tokenizer, vector, COEFS[i])
        there = effect_by_hand(other, tokenizer, vector, COEFS[i])
        assert abs(here) > 1e-2 and abs(there) > 1e-2  # a ratio of two real effects
        assert result["reference"][i] == pytest.approx(here, rel=1e-4, abs=1e-5)
        assert result["effect"][i] == pytest.approx(there, rel=1e-4, abs=1e-5)
        assert result["retained"][i] == pytest.approx(there / here, rel=1e-3)


def test_model_transfer_to_another_width_is_a_one_line_error(setup) -> None:
    _, tokenizer, vector = setup
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    narrow = AutoModelForCausalLM.from_config(config)
    with pytest.raises(SaelabError, match="d_model=64") as error:
        model_transfer(narrow, tokenizer, vector, COEFS, PAIRS, reference=[1.0, 0.0, 1.0])
    assert "\n" not in str(error.value) and "width 32" in str(error.value)
