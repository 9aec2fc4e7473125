"""Training from an activation cache (never the model) and ``sweep``: several SAEs from one pass,
measured on held-out activations; checked against a naive recomputation from the saved SAEs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import saelab.data.activations as activations_module
import saelab.training.run as run_module
from saelab.config import DataConfig, ModelConfig, RunConfig, SAEConfig, TrainConfig
from saelab.data.cache import ActivationCacheStream, read_cache_index, write_activation_cache
from saelab.errors import SaelabError
from saelab.saes.registry import sae_folder_name
from saelab.saes.storage import load_sae, read_sae_cfg
from saelab.training.run import train_run
from saelab.training.sweep import (
    SUMMARY_FILENAME,
    SUMMARY_METRICS,
    format_summary_table,
    sweep_run,
)
from tiny_models import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

HOOK = "blocks.1.hook_resid_post"
MLP = "blocks.0.hook_mlp_out"
CACHED = 3000
BATCH = 128


@pytest.fixture(scope="module")
def cache(tiny_model_dir, words_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "acts"
    write_activation_cache(
        build_tiny_model("llama"),
        build_tiny_tokenizer(),
        [HOOK, MLP],
        out,
        tokens=CACHED,
        model_name=str(tiny_model_dir),
        dataset=str(words_file),
        context=16,
        model_batch_size=8,
        shard_tokens=700,
        progress=False,
    )
    return out


def three_saes():
    """Two hooks, two architectures."""
    return (
        SAEConfig(hook=HOOK, architecture="topk", k=4, expansion=2),
        SAEConfig(hook=HOOK, architecture="relu", l1_coefficient=1.0, expansion=2),
        SAEConfig(hook=MLP, architecture="topk", k=8, expansion=2),
    )


def config(words_file, *, model="no/such-model", saes=None, train=None, **data) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name=str(model)),
        data=DataConfig(
            dataset=str(words_file), context=16, model_batch_size=8, buffer_size=512, **data
        ),
        train=TrainConfig(
            **(
                {"tokens": 8 * BATCH, "batch_size": BATCH, "lr": 1e-3, "log_every_steps": 4}
                | (train or {})
            )
        ),
        saes=saes or (SAEConfig(hook=HOOK, k=4, expansion=2),),
    )


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a language model fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the language model was loaded")

    monkeypatch.setattr(run_module, "load_model", refuse)


# ----- training from a cache ------------------------------------------------------------------


def test_training_from_a_cache_never_loads_the_model(
    cache, words_file, tiny_model_dir, no_model, tmp_path
):
    cfg = config(words_file, activations=str(cache))
    results = train_run(cfg, tmp_path, progress=False)
    folder = sae_folder_name(cfg.saes[0])
    assert results[folder]["tokens"] == 8 * BATCH
    saved = read_sae_cfg(tmp_path / folder)
    # The cache's provenance, not the config's model name, so `saelab eval` finds the model.
    assert saved["metadata"]["model_name"] == str(tiny_model_dir)
    assert saved["metadata"]["context_size"] == 16
    assert saved["metadata"]["dataset_path"] == str(words_file.resolve())
    assert saved["metadata"]["activation_cache"] == str(cache.resolve())
    assert saved["d_in"] == 64
    scale = read_cache_index(cache).scales[HOOK]
    assert saved["saelab"]["activation_scale_folded"] == pytest.approx(scale)
    resolved = json.loads((tmp_path / "resolved.json").read_text())
    assert resolved["activations"] == str(cache.resolve())


def test_cache_run_resumes_bit_exactly(cache, words_file, no_model, tmp_path):
    cfg = config(words_file, activations=str(cache), train={"checkpoint_every_tokens": 4 * BATCH})
    train_run(cfg, tmp_path, progress=False)
    folder = tmp_path / sae_folder_name(cfg.saes[0])
    first = load_file(folder / "sae_weights.safetensors")
    # Resuming replays steps 4..8 from the checkpoint (stream buffer, RNG, shard position).
    train_run(cfg, tmp_path, resume=True, progress=False)
    second = load_file(folder / "sae_weights.safetensors")
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_hook_missing_from_the_cache_lists_the_cached_hooks(cache, words_file, no_model, tmp_path):
    saes = (SAEConfig(hook="blocks.2.hook_mlp_out", k=4),)
    with pytest.raises(SaelabError) as exc:
        train_run(config(words_file, saes=saes, activations=str(cache)), tmp_path, progress=False)
    assert "blocks.2.hook_mlp_out" in str(exc.value) and f"{HOOK}, {MLP}" in str(exc.value)
    assert not list(tmp_path.glob("*/cfg.json"))


def test_too_few_cached_tokens_is_an_error_up_front(cache, words_file, no_model, tmp_path):
    cfg = config(words_file, activations=str(cache), train={"tokens": 4000})
    with pytest.raises(SaelabError, match="holds 3,000 tokens but training needs 4,096"):
        train_run(cfg, tmp_path, progress=False)
    # Two epochs make room; held-out tokens of a sweep count too.
    twice = config(words_file, activations=str(cache), activation_epochs=2, train={"tokens": 4000})
    with pytest.raises(SaelabError, match="training and held-out evaluation need 6,144"):
        sweep_run(twice, tmp_path, eval_tokens=2000, progress=False)


# ----- sweeps ---------------------------------------------------------------------------------


def test_sweep_trains_every_sae_from_one_pass_of_the_model(
    tiny_model_dir, words_file, tmp_path, monkeypatch
):
    computed = []
    real = activations_module.model_activations

    def counting(model, tokens_NP, hooks, keep_NP):
        computed.append(int(keep_NP.sum()))
        return real(model, tokens_NP, hooks, keep_NP)

    monkeypatch.setattr(activations_module, "model_activations", counting)
    cfg = config(words_file, model=tiny_model_dir, saes=three_saes())
    summary = sweep_run(cfg, tmp_path, eval_tokens=300, progress=False)

    rows = {row["folder"]: row for row in summary["saes"]}
    assert list(rows) == [sae_folder_name(s) for s in cfg.saes]
    written = json.loads((tmp_path / SUMMARY_FILENAME).read_text())
    assert written["saes"] == json.loads(json.dumps(summary["saes"]))
    for sae_cfg in cfg.saes:
        row = rows[sae_folder_name(sae_cfg)]
        assert (tmp_path / sae_folder_name(sae_cfg) / "cfg.json").is_file()
        assert all(math.isfinite(row[m]) for m in SUMMARY_METRICS)
        assert 0 <= row["frac_dead"] <= 1 and row["fvu"] > 0 and row["gamma"] > 0
    assert rows[sae_folder_name(cfg.saes[0])]["l0"] <= 4
    assert rows[sae_folder_name(cfg.saes[2])]["l0"] <= 8
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0
    assert summary["model"] == str(tiny_model_dir) and summary["activations"] is None
    # One pass: the model made the training rows, the held-out rows and one buffer, not 3×.
    budget = 8 * BATCH + math.ceil(300 / BATCH) * BATCH + 512 + 8 * 16
    assert sum(computed) <= budget < 3 * 8 * BATCH


def test_sweep_metrics_match_a_naive_recomputation_from_the_saved_saes(
    cache, words_file, no_model, tmp_path
):
    # Plus a transcoder: its target is another hook, with that hook's scale.
    transcoder = SAEConfig(
        hook=MLP, output_hook=HOOK, architecture="topk_skip_transcoder", k=4, expansion=2
    )
    cfg = config(words_file, saes=(*three_saes(), transcoder), activations=str(cache))
    summary = sweep_run(cfg, tmp_path, eval_tokens=300, progress=False)
    assert summary["activations"] == str(cache.resolve())
    # The held-out rows are the ones the stream serves right after the training batches.
    replay = ActivationCacheStream(cache, cfg.hooks, batch_size=BATCH, buffer_size=512)
    batches = iter(replay)
    for _ in range(cfg.train.steps):
        next(batches)
    held = [next(batches) for _ in range(math.ceil(300 / BATCH))]
    assert len(summary["saes"]) == 4
    for row in summary["saes"]:

        def raw(hook):
            return torch.cat([b[hook] for b in held])[:300].double() / replay.scales[hook]

        x = raw(row["hook"])
        y = raw(row["output_hook"] or row["hook"])  # what the SAE reconstructs
        sae = load_sae(tmp_path / row["folder"]).double()  # model units, scales folded in
        feats = sae.encode(x)
        recon = sae(x)
        expected = {
            "l0": (feats > 0).sum(-1).double().mean().item(),
            "fvu": ((y - recon).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item(),
            "gamma": (recon.pow(2).sum() / (y * recon).sum()).item(),
            "frac_dead": ((feats > 0).sum(0) == 0).double().mean().item(),
        }
        for metric, value in expected.items():
            assert row[metric] == pytest.approx(value, rel=1e-3, abs=1e-3), (row["folder"], metric)


def test_summary_table_has_one_row_per_sae_and_the_four_metrics():
    summary = {
        "train_tokens": 1024,
        "eval_tokens": 300,
        "wall_time_s": 1.5,
        "saes": [
            {"folder": "a-topk", "l0": 4.0, "fvu": 0.25, "gamma": 0.98, "frac_dead": 0.5},
            {
                "folder": "b-relu-longer-name",
                "l0": 12.5,
                "fvu": 0.125,
                "gamma": 0.9,
                "frac_dead": 0,
            },
        ],
    }
    lines = format_summary_table(summary).splitlines()
    assert all(m in lines[0] for m in SUMMARY_METRICS)
    assert lines[2].split() == ["a-topk", "4", "0.25", "0.98", "0.5"]
    assert lines[3].split() == ["b-relu-longer-name", "12.5", "0.125", "0.9", "0"]
    assert "2 SAE(s)" in lines[-1]
