"""Building steering vectors: invariants (identical texts → 0, swapped pairs → −v) and naive
references written here (one sequence at a time, no batching or padding)."""

from __future__ import annotations

import pytest
import torch
from steering_fixtures import HOOK, PAIRS, TEXTS, tiny_sae

from saelab.analysis.steering.build import (
    actadd_vector,
    build_vector,
    caa_vector,
    mean_centred_vector,
    sae_clamp_vector,
    sae_feature_vector,
)
from saelab.analysis.steering.config import STEERING_METHODS, SteerConfig, SteerVectorConfig
from saelab.analysis.steering.data import ContrastPair, encode, read_text_rows
from saelab.analysis.steering.registry import BUILDERS, builder_for, register_method
from saelab.errors import SaelabError
from saelab.models.intervene import run_to_hooks
from tiny_models import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def acts_of(model, ids: list[int]) -> torch.Tensor:
    """The hook's activations `[pos, D]` of one unpadded sequence."""
    return run_to_hooks(model, torch.tensor([ids]), [HOOK])[HOOK][0]


def test_every_method_has_exactly_one_builder() -> None:
    # The config offers exactly the registered methods, and each of them has a builder.
    assert tuple(BUILDERS) == STEERING_METHODS
    assert all(callable(builder_for(method)) for method in STEERING_METHODS)
    # A second builder for a name is refused, and the first one stays.
    caa = BUILDERS["caa"]
    with pytest.raises(SaelabError, match="steering method 'caa' is already registered"):
        register_method("caa")(lambda model, tokenizer, cfg, model_name: None)
    assert BUILDERS["caa"] is caa and tuple(BUILDERS) == STEERING_METHODS
    with pytest.raises(SaelabError, match="choose one of: caa, actadd"):
        builder_for("nope")


def test_mean_centred_vector_of_identical_texts_is_zero(model, tokenizer, words_file) -> None:
    spec = str(words_file)
    vector = mean_centred_vector(model, tokenizer, spec, HOOK, general=spec, tokens=300)
    assert vector.source["target_tokens"] == vector.source["general_tokens"] == 300
    assert torch.equal(vector.vector, torch.zeros(64))
    same = mean_centred_vector(model, tokenizer, TEXTS, HOOK, general=list(TEXTS))
    assert torch.equal(same.vector, torch.zeros(64))


def test_caa_vector_of_swapped_pairs_is_the_negative(model, tokenizer) -> None:
    swapped = [ContrastPair(p.prompt, p.negative, p.positive) for p in PAIRS]
    vector = caa_vector(model, tokenizer, PAIRS, HOOK)
    assert vector.vector.abs().sum() > 0
    assert torch.equal(caa_vector(model, tokenizer, swapped, HOOK).vector, -vector.vector)


@pytest.mark.parametrize("offset", [-1, -2])
def test_caa_vector_equals_a_pair_by_pair_reference(model, tokenizer, offset) -> None:
    bos = tokenizer.bos_token_id
    diffs = []
    for pair in PAIRS:
        prompt = encode(tokenizer, pair.prompt)
        ends = []
        for completion in (pair.positive, pair.negative):
            ids = [bos, *prompt, *encode(tokenizer, completion)]
            ends.append(acts_of(model, ids)[len(ids) + offset])
        diffs.append(ends[0] - ends[1])
    expected = torch.stack(diffs).mean(0)
    vector = caa_vector(model, tokenizer, PAIRS, HOOK, answer_offset=offset)
    torch.testing.assert_close(vector.vector, expected, atol=1e-5, rtol=1e-5)
    assert vector.source["pairs"] == 3 and vector.method == "caa" and vector.layer == 1


def test_caa_answer_offset_before_the_text_is_an_error(model, tokenizer) -> None:
    with pytest.raises(SaelabError, match="answer offset -5"):
        caa_vector(model, tokenizer, [ContrastPair("w5", " w6", " w7")], HOOK, answer_offset=-5)


def test_mean_centred_vector_equals_a_text_by_text_reference(model, tokenizer) -> None:
    general = ["w200 w201 w202", "w7 w9 w11 w13 w15"]

    def mean(texts: list[str], context: int) -> torch.Tensor:
        rows = []
        for text in texts:
            ids = encode(tokenizer, text)
            for start in range(0, len(ids), context - 1):  # rows of context - 1 text tokens
                rows.append(acts_of(model, [1, *ids[start : start + context - 1]])[1:])
        return torch.cat(rows).double().mean(0).float()

    vector = mean_centred_vector(model, tokenizer, TEXTS, HOOK, general=general, context=5)
    torch.testing.assert_close(vector.vector, mean(TEXTS, 5) - mean(general, 5), atol=1e-5, rtol=0)


def test_text_rows_read_exactly_the_tokens_asked_for(tokenizer) -> None:
    rows = read_text_rows(TEXTS, tokenizer, tokens=12, context=4)
    assert rows.n_tokens == 12
    assert (rows.ids_NP[:, 0] == tokenizer.bos_token_id).all()
    assert not rows.keep_NP[:, 0].any()
    assert rows.ids_NP.shape[1] <= 4


def test_actadd_vector_is_per_position_and_padded(model, tokenizer) -> None:
    vector = actadd_vector(model, tokenizer, "w5 w6 w7 w8", "w9", HOOK)
    assert vector.vector.shape == (4, 64) and vector.per_position
    pad = vector.source["pad_token_id"]
    positive = acts_of(model, [1, 5, 6, 7, 8])
    negative = acts_of(model, [1, 9, pad, pad, pad])
    torch.testing.assert_close(vector.vector, positive[1:] - negative[1:], atol=1e-5, rtol=0)


def test_sae_feature_vector_units(model, tokenizer) -> None:
    sae, feature = tiny_sae(scale=2.0), 5
    d_D = sae.W_dec[feature].detach() / 2.0  # what f_i = 1 adds, in model units
    raw = sae_feature_vector(model, tokenizer, sae, feature, units="activation")
    torch.testing.assert_close(raw.vector, d_D)
    rows = read_text_rows(TEXTS, tokenizer, tokens=100)
    kept = torch.cat(
        [
            acts_of(model, ids[:n].tolist())[1:]
            for ids, n in zip(rows.ids_NP, rows.lengths_N, strict=True)
        ]
    )
    with torch.no_grad():
        max_act = float(sae.encode(kept)[:, feature].max())
    resid = float(kept.norm(dim=-1).mean())
    by_max = sae_feature_vector(model, tokenizer, sae, feature, units="max_act", general=TEXTS)
    torch.testing.assert_close(by_max.vector, max_act * d_D, atol=1e-5, rtol=1e-5)
    by_norm = sae_feature_vector(model, tokenizer, sae, feature, units="resid_norm", general=TEXTS)
    assert by_norm.norm == pytest.approx(resid, rel=1e-5)
    # A known max activation is used as it is: the general text is never read.
    known = sae_feature_vector(model, tokenizer, sae, feature, max_act=3.0, general="/no/such.txt")
    torch.testing.assert_close(known.vector, 3.0 * d_D)
    clamp = sae_clamp_vector(model, tokenizer, sae, feature, units="max_act", general=TEXTS)
    torch.testing.assert_close(clamp.vector, d_D)
    assert clamp.source["unit_scale"] == pytest.approx(max_act, rel=1e-5)
    assert clamp.sae is sae


def test_build_vector_from_config(model, tokenizer, tmp_path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "w10 w11 w12", "target": " w5", "contrast": " w6"}\n\n')
    cfg = SteerVectorConfig(method="caa", pairs=str(pairs), hook=HOOK)
    vector = build_vector(model, tokenizer, cfg, model_name="tiny")
    expected = caa_vector(model, tokenizer, PAIRS[:1], HOOK)
    assert torch.equal(vector.vector, expected.vector)
    assert vector.model == "tiny" and vector.source["pairs_file"] == str(pairs)


def test_config_says_what_each_method_needs() -> None:
    for method, flag in [("caa", "--pairs"), ("actadd", "--positive"), ("mean", "--target")]:
        with pytest.raises(SaelabError, match=flag):
            SteerVectorConfig(method=method)
    with pytest.raises(SaelabError, match="--sae SAE_DIR and --feature"):
        SteerVectorConfig(method="sae-clamp", sae="x")
    with pytest.raises(SaelabError, match="must be one of"):
        SteerVectorConfig(method="nope")


def test_run_config_needs_one_vector_source_and_sane_values() -> None:
    build = SteerVectorConfig(method="mean", target="x.txt")
    with pytest.raises(SaelabError, match="either --method"):
        SteerConfig()
    with pytest.raises(SaelabError, match="either --method"):
        SteerConfig(build=build, vector="runs/steer/vector")
    for bad, flag in [
        ({"coefs": ()}, "--coefs"),
        ({"coefs": (float("nan"),)}, "--coefs"),
        ({"positions": "middle"}, "--positions"),
        ({"top_p": 0.0}, "--top-p"),
    ]:
        with pytest.raises(SaelabError, match=flag):
            SteerConfig(build=build, **bad)
