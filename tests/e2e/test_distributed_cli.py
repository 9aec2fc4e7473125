"""``torchrun --nproc-per-node 2 -m saelab train|sweep`` (gloo, CPU) against the same command in
one process: data-parallel from an activation cache gives the same SAE and resumes exactly;
SAE-parallel sweeps from the model give the same SAEs and summary; data-parallel from the model
runs each process on its share of the text. The one-process references run in-process
(``main()``) with one thread, as each torchrun process has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.cli import main
from saelab.data.cache import write_activation_cache
from tiny_models import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]

HOOK = "blocks.1.hook_resid_post"
MLP = "blocks.0.hook_mlp_out"
FOLDER = f"{HOOK}-topk-x2-k4"


def torchrun(*args: str | Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m saelab -q ARGS`` (a free port)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "saelab", "-q", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def weights(sae_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(sae_dir / "sae_weights.safetensors")


def assert_close_weights(a: Path, b: Path, atol: float) -> None:
    ours, reference = weights(a), weights(b)
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def cache(tiny_model_dir, words_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "acts"
    write_activation_cache(
        build_tiny_model("llama"),
        build_tiny_tokenizer(),
        [HOOK],
        out,
        tokens=3000,
        model_name=str(tiny_model_dir),
        dataset=str(words_file),
        context=16,
        progress=False,
    )
    return out


def test_data_parallel_train_from_a_cache_matches_one_process_and_resumes(cache, tmp_path, capsys):
    args = ["train", "--activations", cache, "--hook", HOOK, "--k", "4", "--expansion", "2"]
    args += ["--tokens", "2560", "--batch-size", "128", "--checkpoint-every", "1536"]
    args += ["--set", "data.buffer_size=512"]
    assert main(["-q", *map(str, args), "--out", str(tmp_path / "one")]) == 0
    done = torchrun(*args, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 1 SAE(s)") == 1  # rank 0 alone reports
    assert_close_weights(tmp_path / "two" / FOLDER, tmp_path / "one" / FOLDER, atol=1e-5)
    resolved = json.loads((tmp_path / "two" / "resolved.json").read_text())
    assert resolved["processes"] == 2 and resolved["distributed"] == "ddp"
    first = weights(tmp_path / "two" / FOLDER)

    # Both processes resume from step 12 (of 20): the same SAE, bit for bit.
    again = torchrun("train", "--out", tmp_path / "two", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    for name, tensor in weights(tmp_path / "two" / FOLDER).items():
        assert torch.equal(tensor, first[name]), name
    # One process cannot take over a checkpoint of two: one line, exit status 2.
    assert main(["-q", "train", "--out", str(tmp_path / "two"), "--resume"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("saelab: error: checkpoint") and "\n" not in message
    assert "written by 2 process(es) but this run has 1" in message


SWEEP_TOML = f"""
[train]
tokens = 1536
batch_size = 128
log_every_steps = 4
distributed = "sae"

[data]
buffer_size = 512
context = 16

[[sae]]
hook = "{HOOK}"
k = 4
expansion = 2

[[sae]]
hook = "{HOOK}"
architecture = "relu"
l1_coefficient = 1.0
expansion = 2

[[sae]]
hook = "{MLP}"
k = 4
expansion = 2
"""


def test_sae_parallel_sweep_from_the_model_matches_one_process(
    tiny_model_dir, words_file, tmp_path
):
    """Rank 0 runs the model and broadcasts its batches; rank 0 trains SAEs 0 and 2, rank 1
    SAE 1; the SAEs, log and summary are those of one process training all three."""
    config = tmp_path / "sweep.toml"
    config.write_text(SWEEP_TOML)
    args = ["sweep", config, "--set", f"model.name={tiny_model_dir}"]
    args += ["--set", f"data.dataset={words_file}", "--eval-tokens", "300"]
    assert main(["-q", *map(str, args), "--out", str(tmp_path / "one")]) == 0
    done = torchrun(*args, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [r["folder"] for r in two["saes"]] == [r["folder"] for r in one["saes"]]
    for ours, reference in zip(two["saes"], one["saes"], strict=True):
        for metric in ("l0", "fvu", "gamma", "frac_dead", "mse"):
            assert ours[metric] == pytest.approx(reference[metric], rel=1e-5), metric
        assert_close_weights(
            tmp_path / "two" / ours["folder"], tmp_path / "one" / ours["folder"], 1e-6
        )
    lines = (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()
    trained = [json.loads(line)["sae"] for line in lines]
    assert all(trained.count(r["folder"]) == 3 for r in one["saes"])  # 12 steps, logged every 4


def test_data_parallel_train_from_the_model_runs_each_process_on_its_share(
    tiny_model_dir, words_file, tmp_path
):
    args = ["train", "--model", tiny_model_dir, "--dataset", words_file, "--hook", HOOK]
    args += ["--k", "4", "--expansion", "2", "--tokens", "2560", "--batch-size", "128"]
    args += ["--context", "16", "--set", "data.buffer_size=512"]
    done = torchrun(*args, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["-q", *map(str, args), "--out", str(tmp_path / "one")]) == 0
    log = [json.loads(x) for x in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["tokens"] == 2560 and log[-1]["step"] == 20
    assert log[-1]["fvu"] < log[0]["fvu"]
    # The scale of all processes' first rows is near the one of one process's first rows.
    scales = [
        json.loads((tmp_path / run / "resolved.json").read_text())["hooks"][HOOK][
            "activation_scale"
        ]
        for run in ("one", "two")
    ]
    assert scales[1] == pytest.approx(scales[0], rel=0.02)
