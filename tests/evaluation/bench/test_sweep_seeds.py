"""``saelab sweep --seeds N``: every [[sae]] trained under N seeds from ONE pass of the model,
each seed its own folder, seed in cfg.json and in the summary."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import saelab.data.activations as activations_module
from saelab.config import DataConfig, ModelConfig, RunConfig, SAEConfig, TrainConfig
from saelab.errors import SaelabError
from saelab.saes.storage import read_sae_cfg
from saelab.training.sweep import sweep_run, with_seeds

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

HOOK = "blocks.1.hook_resid_post"
BATCH = 128


def run_config(model_dir, words_file, saes) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name=str(model_dir)),
        data=DataConfig(dataset=str(words_file), context=16, model_batch_size=8, buffer_size=512),
        train=TrainConfig(tokens=4 * BATCH, batch_size=BATCH, lr=1e-3, log_every_steps=2),
        saes=saes,
        seed=5,
    )


def counting_forwards(monkeypatch) -> list[int]:
    rows: list[int] = []
    real = activations_module.model_activations

    def counting(model, tokens_NP, hooks, keep_NP):
        rows.append(int(keep_NP.sum()))
        return real(model, tokens_NP, hooks, keep_NP)

    monkeypatch.setattr(activations_module, "model_activations", counting)
    return rows


def test_seeds_give_distinct_saes_from_one_model_pass(
    tiny_model_dir, words_file, tmp_path, monkeypatch
):
    saes = (
        SAEConfig(hook=HOOK, architecture="topk", k=4, expansion=2),
        SAEConfig(hook=HOOK, architecture="relu", l1_coefficient=1.0, expansion=2),
    )
    rows = counting_forwards(monkeypatch)
    summary = sweep_run(
        run_config(tiny_model_dir, words_file, saes),
        tmp_path / "three",
        eval_tokens=200,
        seeds=3,
        progress=False,
    )
    three = sum(rows)
    rows.clear()
    sweep_run(
        run_config(tiny_model_dir, words_file, saes[:1]),
        tmp_path / "one",
        eval_tokens=200,
        progress=False,
    )
    assert three == sum(rows)  # six SAEs cost the model what one costs
    folders = [row["folder"] for row in summary["saes"]]
    assert len(folders) == len(set(folders)) == 6
    assert [row["seed"] for row in summary["saes"]] == [5, 6, 7, 5, 6, 7]
    assert all(f.endswith(f"-seed{s}") for f, s in zip(folders, [5, 6, 7] * 2, strict=False))
    weights = [load_file(tmp_path / "three" / f / "sae_weights.safetensors") for f in folders[:3]]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not torch.equal(weights[a]["W_dec"], weights[b]["W_dec"])
    for folder, seed in zip(folders, [5, 6, 7, 5, 6, 7], strict=True):
        assert read_sae_cfg(tmp_path / "three" / folder)["saelab"]["sae"]["seed"] == seed
    assert all(math.isfinite(row["fvu"]) for row in summary["saes"])
    saved = json.loads((tmp_path / "three" / "summary.json").read_text())
    assert [row["seed"] for row in saved["saes"]] == [5, 6, 7, 5, 6, 7]


def test_with_seeds_copies_each_sae_and_refuses_seeded_tables(tiny_model_dir, words_file):
    cfg = run_config(tiny_model_dir, words_file, (SAEConfig(hook=HOOK),))
    assert with_seeds(cfg, 1) is cfg
    assert [s.seed for s in with_seeds(cfg, 4).saes] == [5, 6, 7, 8]
    with pytest.raises(SaelabError, match="--seeds must be positive"):
        with_seeds(cfg, 0)
    seeded = run_config(tiny_model_dir, words_file, (SAEConfig(hook=HOOK, seed=1),))
    with pytest.raises(SaelabError, match="already has seed"):
        with_seeds(seeded, 2)
