"""The real ``saelab`` command, run as a subprocess, on a tiny local model and a text file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from saelab.evaluation.evaluate import METRIC_KEYS
from saelab_cli import one_line_error, tiny_train_args
from saelab_cli import run_saelab as saelab

pytestmark = pytest.mark.e2e

HOOK = "blocks.1.hook_resid_post"
FOLDER = f"{HOOK}-topk-x4-k8"


def train_args(model_dir, text, out, *extra):
    return (*tiny_train_args(model_dir, text, out, tokens=12800), *extra)


def test_train_then_eval(tiny_model_dir, words_file, tmp_path):
    out = tmp_path / "run"
    done = saelab(*train_args(tiny_model_dir, words_file, out))
    assert done.returncode == 0, done.stderr
    assert f"{out / FOLDER}" in done.stdout
    sae_dir = out / FOLDER
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        assert (sae_dir / name).is_file(), name
    weights = load_file(sae_dir / "sae_weights.safetensors")
    assert weights["W_enc"].shape == (64, 256) and weights["W_dec"].shape == (256, 64)
    assert (out / "config.toml").read_text().count("[[sae]]") == 1
    resolved = json.loads((out / "resolved.json").read_text())
    assert resolved["hooks"][HOOK]["d_in"] == 64
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["tokens"] == 12800 and log[-1]["step"] == 50
    assert list((out / "tensorboard").glob("events.*"))

    evaluated = saelab("eval", str(sae_dir), "--tokens", "2048")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((sae_dir / "metrics.json").read_text())
    assert tuple(metrics) == METRIC_KEYS
    assert 0 < metrics["l0"] <= 8
    assert 0 < metrics["fvu"] < 1.5
    for key in METRIC_KEYS:
        assert key in evaluated.stdout


def test_resume_continues_to_the_same_result(tiny_model_dir, words_file, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, words_file, out, "--checkpoint-every", "5120")
    assert saelab(*args).returncode == 0
    first = load_file(out / FOLDER / "sae_weights.safetensors")
    checkpoints = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert checkpoints["step"] == 40  # 10240 tokens = 40 steps of 256
    # Resuming re-runs steps 40..50 from the checkpoint: the same SAE, bit for bit.
    again = saelab("train", "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr
    second = load_file(out / FOLDER / "sae_weights.safetensors")
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_unknown_hook_lists_the_valid_ones(tiny_model_dir, words_file, tmp_path):
    out = tmp_path / "run"
    args = list(train_args(tiny_model_dir, words_file, out))
    args[args.index(HOOK)] = "blocks.9.hook_resid_post"
    message = one_line_error(saelab(*args))
    assert "blocks.9.hook_resid_post" in message and "hook_resid_post" in message
    assert "valid" in message
    assert not any(out.glob("*/cfg.json"))  # nothing half-made


def test_unknown_arch_is_one_line(tiny_model_dir, words_file, tmp_path):
    args = list(train_args(tiny_model_dir, words_file, tmp_path / "run"))
    args[args.index("topk")] = "sparsest"
    message = one_line_error(saelab(*args))
    assert "relu" in message and "topk" in message


def test_eval_rejects_an_sae_of_another_width(tiny_model_dir, tmp_path):
    from saelab.config import SAEConfig
    from saelab.saes import TopKSAE
    from saelab.saes.storage import save_sae

    save_sae(TopKSAE(SAEConfig(hook=HOOK, k=4), d_in=32), tmp_path / "narrow")
    message = one_line_error(
        saelab("eval", str(tmp_path / "narrow"), "--model", str(tiny_model_dir))
    )
    assert "d_in=32" in message and "64" in message


def test_hooks_lists_every_hook_with_its_width(tiny_model_dir):
    done = saelab("hooks", str(tiny_model_dir))
    assert done.returncode == 0, done.stderr
    rows = dict(line.split("\t") for line in done.stdout.strip().splitlines())
    assert rows["blocks.0.hook_resid_post"] == "64"
    assert rows["blocks.2.mlp.hook_post"] == "96"
    assert len(rows) == 3 * 7


def test_finished_run_is_not_overwritten(tiny_model_dir, words_file, tmp_path):
    out = tmp_path / "run"
    assert saelab(*train_args(tiny_model_dir, words_file, out)).returncode == 0
    message = one_line_error(saelab(*train_args(tiny_model_dir, words_file, out)))
    assert "--resume" in message
