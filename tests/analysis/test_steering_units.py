"""The ``max_act`` steering unit from saved feature statistics: given > stats > measured, and
one-line errors for statistics of another SAE or hook, or without the feature."""

from __future__ import annotations

import json

import pytest
import torch
from steering_fixtures import HOOK, TEXTS, tiny_sae

from saelab.analysis.features import FeatureStats, compute_feature_stats
from saelab.analysis.steering.build import build_vector, sae_clamp_vector, sae_feature_vector
from saelab.analysis.steering.config import SteerVectorConfig
from saelab.analysis.steering.vectors import decoder_row, load_vector
from saelab.cli import main
from saelab.errors import SaelabError
from saelab.saes.storage import load_sae, save_sae
from tiny_models import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

NOWHERE = "/no/such/text.txt"
"""A general text that does not exist: reading it would fail, so the unit was not measured."""


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def write_stats(sae_dir, model, tokenizer, words_file, out=None, **kwargs) -> FeatureStats:
    """``saelab features`` of the SAE folder on the tiny Llama, saved to ``out``
    (default ``SAE_DIR/features``)."""
    stats = compute_feature_stats(
        str(sae_dir), model, tokenizer, data=str(words_file), tokens=256, context=32,
        top_k=2, n_quantile_examples=1, window=(1, 1), progress=False, **kwargs,
    )  # fmt: skip
    stats.save(out if out is not None else sae_dir / "features")
    return stats


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, tokenizer, words_file):
    """A saved tiny SAE with its statistics in ``SAE_DIR/features``, and a fired feature."""
    sae_dir = save_sae(tiny_sae(), tmp_path_factory.mktemp("units") / "sae")
    stats = write_stats(sae_dir, model, tokenizer, words_file)
    return sae_dir, stats, int(stats.fired.argmax())


def test_max_act_comes_from_the_saved_statistics(saved, model, tokenizer) -> None:
    sae_dir, stats, feature = saved
    d_D = decoder_row(load_sae(sae_dir), feature)
    expected = float(stats.max_act[feature])
    assert expected > 0
    vector = sae_feature_vector(model, tokenizer, sae_dir, feature, general=NOWHERE)
    torch.testing.assert_close(vector.vector, expected * d_D)
    source = vector.source
    assert source["max_act_source"] == "stats" and source["max_act"] == expected
    assert source["stats"] == str((sae_dir / "features").resolve())
    assert source["stats_tokens"] == stats.n_tokens and source["unit_scale"] == expected
    clamp = sae_clamp_vector(model, tokenizer, sae_dir, feature, general=NOWHERE)
    assert clamp.source["unit_scale"] == expected and torch.equal(clamp.vector, d_D)


def test_given_max_act_overrides_the_statistics(saved, model, tokenizer) -> None:
    sae_dir, _, feature = saved
    vector = sae_feature_vector(model, tokenizer, sae_dir, feature, max_act=3.0, stats=NOWHERE)
    torch.testing.assert_close(vector.vector, 3.0 * decoder_row(load_sae(sae_dir), feature))
    assert vector.source["max_act_source"] == "given" and "stats" not in vector.source


def test_without_statistics_the_unit_is_measured(tmp_path, model, tokenizer) -> None:
    sae_dir = save_sae(tiny_sae(), tmp_path / "sae")
    by_object = sae_feature_vector(model, tokenizer, tiny_sae(), 5, general=TEXTS)
    by_folder = sae_feature_vector(model, tokenizer, sae_dir, 5, general=TEXTS)
    assert by_folder.source["max_act_source"] == "measured"
    assert by_folder.source["max_act"] == pytest.approx(by_object.source["max_act"], rel=1e-5)
    # Other units never read statistics, not even a folder that does not exist.
    raw = sae_feature_vector(model, tokenizer, sae_dir, 5, units="activation", stats=NOWHERE)
    assert "max_act_source" not in raw.source and raw.source["unit_scale"] == 1.0


def test_statistics_of_a_feature_slice_are_read_by_feature_id(
    tmp_path, model, tokenizer, words_file
) -> None:
    sae_dir = save_sae(tiny_sae(), tmp_path / "sae")
    part = write_stats(sae_dir, model, tokenizer, words_file, features=slice(16, 48))
    whole = write_stats(sae_dir, model, tokenizer, words_file, out=tmp_path / "all")
    feature = 16 + int(part.fired.argmax())
    cfg = SteerVectorConfig(
        method="sae-feature", sae=str(sae_dir), feature=feature, general=NOWHERE
    )
    vector = build_vector(model, tokenizer, cfg)
    # The slice's row feature - 16 is feature `feature` of the whole SAE.
    assert vector.source["max_act"] == float(whole.max_act[feature]) > 0
    with pytest.raises(SaelabError, match="feature 3 is not in the feature statistics") as info:
        build_vector(model, tokenizer, SteerVectorConfig(method="sae-feature", sae=str(sae_dir),
                                                         feature=3, general=NOWHERE))  # fmt: skip
    assert "16..47" in str(info.value) and "\n" not in str(info.value)


def edited_copy(stats: FeatureStats, out, **meta) -> str:
    FeatureStats(stats.tensors, {**stats.meta, **meta}).save(out)
    return str(out)


def test_statistics_of_another_sae_or_hook_are_refused(saved, tmp_path, model, tokenizer) -> None:
    sae_dir, stats, feature = saved
    cases = [
        ({"hook": "blocks.0.hook_resid_post"}, "hook 'blocks.0.hook_resid_post'"),
        ({"d_sae": 4096}, "d_sae 4096"),
        ({"sae_dir": str(tmp_path / "elsewhere" / "sae")}, "elsewhere"),
    ]
    for n, (meta, expected) in enumerate(cases):
        other = edited_copy(stats, tmp_path / f"stats{n}", **meta)
        with pytest.raises(SaelabError, match="are of") as info:
            sae_feature_vector(model, tokenizer, sae_dir, feature, stats=other)
        assert expected in str(info.value) and "\n" not in str(info.value)
    # The folder recorded relative to where saelab features ran is the same SAE.
    relative = edited_copy(stats, tmp_path / "relative", sae_dir=sae_dir.name)
    vector = sae_feature_vector(model, tokenizer, sae_dir, feature, stats=relative)
    assert vector.source["max_act"] == float(stats.max_act[feature])


def test_a_feature_that_never_fired_in_the_statistics_is_an_error(
    saved, tmp_path, model, tokenizer
) -> None:
    sae_dir, stats, feature = saved
    tensors = dict(stats.tensors)
    tensors["max_act"] = tensors["max_act"].clone()
    tensors["max_act"][feature] = 0.0
    FeatureStats(tensors, stats.meta).save(tmp_path / "dead")
    with pytest.raises(SaelabError, match="never fired.*--max-act"):
        sae_feature_vector(model, tokenizer, sae_dir, feature, stats=tmp_path / "dead")


def test_stats_flag_is_only_for_sae_methods() -> None:
    with pytest.raises(SaelabError, match="--stats is for"):
        SteerVectorConfig(method="mean", target="x.txt", stats="dir")


def test_steer_cli_records_the_stats_unit(saved, tmp_path, tiny_model_dir, words_file) -> None:
    sae_dir, stats, feature = saved
    out = tmp_path / "out"
    argv = [
        "-q", "steer", "--model", tiny_model_dir, "--neutral", words_file, "--neutral-tokens",
        "32", "--method", "sae-clamp", "--sae", sae_dir, "--feature", feature, "--stats",
        sae_dir / "features", "--general", NOWHERE, "--coefs", "1", "--out", out,
    ]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    meta = json.loads((out / "vector" / "vector.json").read_text())
    source = meta["source"]
    assert meta["hook"] == HOOK
    assert source["max_act_source"] == "stats"
    assert source["max_act"] == float(stats.max_act[feature])
    assert load_vector(out / "vector").source["stats"] == str((sae_dir / "features").resolve())


def test_the_dashboard_steer_command_runs_and_reads_the_statistics(
    saved, tmp_path, tiny_model_dir, words_file
) -> None:
    import shlex

    from saelab.analysis.dashboard.render import steer_command

    sae_dir, stats, feature = saved
    command = steer_command(FeatureStats.load(sae_dir / "features").meta, feature)
    argv = shlex.split(command)[1:]
    # The statistics were taken with a model object; the CLI loads the same model from a folder.
    argv += ["--model", str(tiny_model_dir), "--neutral", str(words_file)]
    argv += ["--neutral-tokens", "32", "--general", NOWHERE, "--coefs", "1"]
    argv += ["--out", str(tmp_path / "out")]
    assert main(["-q", *argv]) == 0
    source = load_vector(tmp_path / "out" / "vector").source
    assert (source["sae"], source["feature"]) == (str(sae_dir.resolve()), feature)
    assert source["max_act_source"] == "stats" and source["max_act"] == float(
        stats.max_act[feature]
    )
