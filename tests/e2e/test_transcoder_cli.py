"""The real ``saelab`` command trains and evaluates a transcoder on a tiny local Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from saelab.cli import main
from saelab.evaluation.evaluate import METRIC_KEYS
from saelab.saes import TopKSkipTranscoder
from saelab.saes.storage import load_sae
from saelab_cli import run_saelab as saelab

pytestmark = pytest.mark.e2e

IN_HOOK, OUT_HOOK = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
FOLDER = f"{IN_HOOK}-topk_skip_transcoder-x4-k8"


def train_args(model_dir: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--hook",
        IN_HOOK,
        "--expansion",
        "4",
        "--k",
        "8",
        "--tokens",
        "5120",
        "--batch-size",
        "128",
        "--lr",
        "0.01",
        "--dataset",
        str(text),
        "--context",
        "32",
        "--set",
        "data.buffer_size=512",
        "--out",
        str(out),
        *extra,
    ]


def test_train_then_eval_a_skip_transcoder(tiny_model_dir, words_file, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, words_file, out, "--arch", "topk_skip_transcoder")
    done = saelab(*args, "--output-hook", OUT_HOOK)
    assert done.returncode == 0, done.stderr
    tc_dir = out / FOLDER
    assert f"{tc_dir}" in done.stdout
    cfg = json.loads((tc_dir / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == IN_HOOK
    assert cfg["metadata"]["hook_name_out"] == OUT_HOOK and cfg["d_out"] == 64
    weights = load_file(tc_dir / "sae_weights.safetensors")
    assert weights["W_skip"].shape == (64, 64) and weights["W_skip"].abs().sum() > 0
    resolved = json.loads((out / "resolved.json").read_text())
    assert set(resolved["hooks"]) == {IN_HOOK, OUT_HOOK}
    assert "output_hook" in (out / "config.toml").read_text()

    evaluated = saelab("eval", str(tc_dir), "--tokens", "1024")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tc_dir / "metrics.json").read_text())
    assert tuple(metrics) == METRIC_KEYS
    assert 0 < metrics["l0"] <= 8
    assert 0 < metrics["fvu"] < 1  # scored against hook_mlp_out, not the input
    assert json.loads((tc_dir / "eval_info.json").read_text())["output_hook"] == OUT_HOOK
    assert isinstance(load_sae(tc_dir), TopKSkipTranscoder)


def test_transcoder_flags_are_validated_on_one_line(tiny_model_dir, words_file, tmp_path, capsys):
    """Config mistakes stop ``main`` before any model is loaded (in-process: no startup cost)."""
    args = train_args(tiny_model_dir, words_file, tmp_path / "run")
    for extra, expected in (
        (["--arch", "transcoder"], "--output-hook"),
        (["--arch", "topk", "--set", f"sae.output_hook={OUT_HOOK}"], "only for transcoders"),
    ):
        assert main([*args, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("saelab: error:"), lines
        assert "output_hook" in lines[0] and expected in lines[0]
    assert not (tmp_path / "run").exists()


def test_help_lists_every_transcoder_architecture(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--output-hook" in text
    for arch in ("transcoder", "skip_transcoder", "topk_transcoder", "topk_skip_transcoder"):
        assert arch in text
