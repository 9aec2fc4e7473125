"""Transfer: a vector retains all of its effect where it was built (exactly 1), moves to other
layers and to another model of the same width, and refuses a model of another width."""

from __future__ import annotations

import pytest
import torch
from steering_fixtures import HOOK, PAIRS
from transformers import AutoModelForCausalLM, LlamaConfig

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
    assert all(isinstance(r, float) for r in (result["retained"][0], result["retained"][2]))


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
