"""Applying steering: coefficient 0 changes nothing, each position mode touches exactly its
positions, clamping matches decode-with-the-feature-replaced plus the error term, and generating
with a KV cache steers the same tokens as recomputing the whole sequence at every step."""

from __future__ import annotations

import pytest
import torch
from steering_fixtures import HOOK, tiny_sae

from saelab.analysis.steering.apply import Steering, generate, generate_ids, steer
from saelab.analysis.steering.vectors import SteeringVector
from saelab.errors import SaelabError
from saelab.models.intervene import capture
from tiny_models import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

IDS = torch.tensor([[1, 17, 42, 99, 5, 230, 64, 12, 8]])
PROMPT_LEN = 4


def vectors(seed: int = 0) -> dict[str, SteeringVector]:
    """A one-row vector and a 3-row ActAdd vector, large enough to change greedy tokens."""
    g = torch.Generator().manual_seed(seed)
    return {
        "row": SteeringVector(3 * torch.randn(64, generator=g), HOOK, "caa", "tiny"),
        "front": SteeringVector(3 * torch.randn(3, 64, generator=g), HOOK, "actadd", "tiny"),
    }


def logits(model, steering: Steering | None = None, prompt_lens=PROMPT_LEN) -> torch.Tensor:
    with torch.no_grad():
        if steering is None:
            return model(IDS).logits
        with steering.applied(model, prompt_lens):
            return model(IDS).logits


def hook_acts(model, steering: Steering | None = None) -> torch.Tensor:
    with torch.no_grad(), capture(model, [HOOK]) as acts:
        if steering is None:
            model(IDS)
        else:
            with steering.applied(model, PROMPT_LEN):
                model(IDS)
    return acts[HOOK][0]


@pytest.mark.parametrize(
    ("kind", "positions"), [("row", "all"), ("row", "after_prompt"), ("front", "front")]
)
def test_coefficient_zero_leaves_logits_unchanged(tiny_model, kind, positions) -> None:
    vector = vectors()[kind]
    assert torch.equal(logits(tiny_model, Steering(vector, 0.0, positions)), logits(tiny_model))


def test_all_positions_add_the_vector_everywhere_but_bos() -> None:
    model, vector = build_tiny_model("llama"), vectors()["row"]
    diff = hook_acts(model, Steering(vector, 2.0, "all")) - hook_acts(model)
    assert torch.equal(diff[0], torch.zeros(64))
    torch.testing.assert_close(diff[1:], (2.0 * vector.vector).expand(len(IDS[0]) - 1, -1))


def test_actadd_is_front_aligned_on_the_positions_after_bos() -> None:
    model, vector = build_tiny_model("gpt2"), vectors()["front"]
    diff = hook_acts(model, Steering(vector, 1.5)) - hook_acts(model)
    torch.testing.assert_close(diff[1:4], 1.5 * vector.vector)
    assert torch.equal(diff[0], torch.zeros(64))
    assert torch.equal(diff[4:], torch.zeros_like(diff[4:]))


def test_after_prompt_leaves_the_prompt_positions_unchanged(tiny_model) -> None:
    steered = logits(tiny_model, Steering(vectors()["row"], 4.0, "after_prompt"))
    clean = logits(tiny_model)
    assert torch.equal(steered[:, :PROMPT_LEN], clean[:, :PROMPT_LEN])
    assert not torch.allclose(steered[:, PROMPT_LEN:], clean[:, PROMPT_LEN:])


def test_after_prompt_takes_one_prompt_length_per_row() -> None:
    model = build_tiny_model("llama")
    ids = torch.cat([IDS, IDS])
    with torch.no_grad(), capture(model, [HOOK]) as clean:
        model(ids)
    steering = Steering(vectors()["row"], 1.0, "after_prompt")
    with (
        torch.no_grad(),
        capture(model, [HOOK]) as acts,
        steering.applied(model, torch.tensor([2, 6])),
    ):
        model(ids)
    changed = (acts[HOOK] != clean[HOOK]).any(-1)
    expected = torch.arange(ids.shape[1])[None] >= torch.tensor([[2], [6]])
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_clamping_equals_decoding_with_the_feature_replaced_plus_the_error(scale) -> None:
    model, sae, feature, value = build_tiny_model("llama"), tiny_sae(scale=scale), 3, 2.5
    d_D = (sae.W_dec[feature] / scale).detach()
    vector = SteeringVector(
        d_D, HOOK, "sae-clamp", "tiny", {"feature": feature, "unit_scale": 0.5}, sae
    )
    h = hook_acts(model)
    with torch.no_grad():
        f = sae.encode(h)
        replaced = f.clone()
        replaced[:, feature] = value
        expected = sae.decode(replaced) + (h - sae.decode(f))
    clamped = hook_acts(model, Steering(vector, value / 0.5))  # c · unit_scale = value
    torch.testing.assert_close(clamped[1:], expected[1:], atol=1e-5, rtol=1e-5)
    assert torch.equal(clamped[0], h[0])  # BOS is never steered


def recompute_greedy(model, ids: torch.Tensor, steering: Steering, n: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence goes through the model each step."""
    prompt_len = ids.shape[1]
    for _ in range(n):
        with torch.no_grad(), steering.applied(model, prompt_len):
            next_token = model(ids, use_cache=False).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
    return ids


@pytest.mark.parametrize(
    ("kind", "positions"), [("row", "all"), ("row", "after_prompt"), ("front", "front")]
)
def test_generation_with_a_kv_cache_equals_full_recompute(tiny_model, kind, positions) -> None:
    # A 2-token prompt: the 3-row ActAdd vector reaches into the generated tokens.
    prompt = IDS[:, :2]
    steering = Steering(vectors()[kind], 5.0, positions)
    cached = generate_ids(tiny_model, prompt, steering, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(cached, recompute_greedy(tiny_model, prompt, steering, 6))
    clean = generate_ids(tiny_model, prompt, None, max_new_tokens=6, pad_token_id=0)
    assert not torch.equal(cached, clean)  # the steering did change what was generated


def test_clamped_generation_with_a_kv_cache_equals_full_recompute() -> None:
    model, sae = build_tiny_model("gemma2"), tiny_sae()
    vector = SteeringVector(sae.W_dec[2].detach(), HOOK, "sae-clamp", "tiny", {"feature": 2}, sae)
    steering = Steering(vector, 30.0, "after_prompt")
    cached = generate_ids(model, IDS[:, :3], steering, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(cached, recompute_greedy(model, IDS[:, :3], steering, 5))


def test_sampling_is_reproducible_by_seed() -> None:
    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    steering = Steering(vectors()["row"], 1.0)
    texts = [
        generate(model, tokenizer, "w5 w6", steering, sample=True, seed=s, max_new_tokens=8)
        for s in (3, 3, 4)
    ]
    assert texts[0] == texts[1] != texts[2]


def test_position_modes_that_do_not_fit_the_vector_are_errors() -> None:
    model, v = build_tiny_model("llama"), vectors()
    with (
        pytest.raises(SaelabError, match="front-aligned"),
        steer(model, v["front"], 1.0, positions="all"),
    ):
        pass
    with (
        pytest.raises(SaelabError, match="needs an ActAdd"),
        steer(model, v["row"], 1.0, positions="front"),
    ):
        pass
    with (
        pytest.raises(SaelabError, match="prompt length"),
        steer(model, v["row"], 1.0, positions="after_prompt"),
    ):
        pass


def test_hooks_are_removed_after_the_block() -> None:
    model = build_tiny_model("llama")
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with steer(model, vectors()["row"], 1.0):
        pass
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert before == after
