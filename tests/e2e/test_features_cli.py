"""``saelab features`` end to end: the tiny Llama folder as a subprocess, and the demo SAE
on the real default model."""

from __future__ import annotations

import re

import pytest

from saelab.analysis.features import META_FILENAME, STATS_FILENAME, FeatureStats
from saelab.cli import main
from saelab.config import SAEConfig
from saelab.saes import TopKSAE
from saelab.saes.storage import save_sae
from saelab_cli import run_saelab
from tiny_models import D_MODEL

DEFAULT_D_MODEL = 576
"""SmolLM2-135M's residual width."""


@pytest.mark.e2e
def test_features_command_writes_statistics_beside_the_sae(tmp_path, tiny_model_dir, words_file):
    sae_dir = tmp_path / "sae"
    sae = TopKSAE(SAEConfig(hook="blocks.1.hook_resid_post", k=4, width=96), d_in=D_MODEL, seed=0)
    meta = {"model_name": str(tiny_model_dir), "dataset_path": str(words_file)}
    save_sae(sae, sae_dir, metadata=meta)
    done = run_saelab(
        "features",
        sae_dir,
        "--tokens",
        "256",
        "--context",
        "32",
        "--top-k",
        "5",
        env={"SAELAB_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    out = sae_dir / "features"
    assert (out / STATS_FILENAME).is_file() and (out / META_FILENAME).is_file()
    assert str(out / STATS_FILENAME) in done.stdout
    assert re.search(r"96 features over [\d,]+ tokens: dead [\d.]+%, mean density", done.stdout)
    stats = FeatureStats.load(out)
    assert stats.meta["model"] == str(tiny_model_dir)
    assert stats.meta["dataset"] == str(words_file) and stats.meta["sae_dir"] == str(sae_dir)
    assert stats.tensors["top_value"].shape == (96, 5) and stats.tokens.shape == (8, 32)
    live = int(stats.fired.argmax())
    assert stats.top_examples(live)[0].value == pytest.approx(float(stats.max_act[live]))


def test_features_of_a_folder_without_an_sae_is_one_line(tmp_path, capsys):
    assert main(["-q", "features", str(tmp_path), "--tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saelab: error:") and err.count("\n") == 1 and "cfg.json" in err


@pytest.mark.slow
@pytest.mark.e2e
def test_sae_statistics_on_the_default_model(tmp_path):
    from saelab.analysis.features import write_feature_stats

    # A freshly initialised TopK SAE saved for the default model's layer 6 (a clean clone has no
    # trained one): the real model, tokenizer, text and unembedding are what this test exercises.
    sae_dir = tmp_path / "sae"
    cfg = SAEConfig(hook="blocks.6.hook_resid_post", k=32, width=2048)
    save_sae(
        TopKSAE(cfg, d_in=DEFAULT_D_MODEL, seed=0),
        sae_dir,
        metadata={"model_name": "default", "dataset_path": "default"},
    )
    # 1024 of the 2048 features: the logit-effect product is the slow part on 2 cores.
    stats, out = write_feature_stats(
        sae_dir,
        tmp_path / "features",
        tokens=2048,
        top_k=8,
        features=slice(0, 1024),
        progress=False,
    )
    F = stats.n_features
    assert F == 1024 and stats.meta["d_sae"] == 2048
    assert stats.tensors["top_acts"].shape == (F, 8, 17) and stats.tokens.shape == (16, 128)
    assert 0 < stats.summary()["mean_l0"] <= 32  # TopK k=32 over all 2048 features
    back = FeatureStats.load(out)
    live = int(back.fired.argmax())
    example = back.top_examples(live)[0]
    assert example.value == pytest.approx(float(back.max_act[live]))
    assert "".join(example.tokens).strip() and example.position > 0
    promoted, suppressed = back.logit_effects(live)
    assert len(promoted) == len(suppressed) == 10
    # Real token strings of SmolLM2's vocabulary, not ids or placeholders.
    words = [t for t, _ in promoted + suppressed]
    assert all(isinstance(t, str) and t and not t.startswith("<") for t in words)
    assert promoted[0][1] > 0 > suppressed[0][1]
