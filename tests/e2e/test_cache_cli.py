"""``saelab cache``, ``train --activations`` and ``sweep`` through the real command.

``cache`` and ``train --activations`` run as subprocesses (``python -m saelab``) on a tiny local
model; the rest goes through the same ``main()`` in-process (interpreter start-up is most of a
subprocess's cost). Every bad input must give exit status 2 and one ``saelab: error:`` line.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from saelab.cli import main
from saelab.data.cache import INDEX_FILENAME
from saelab.evaluation.evaluate import METRIC_KEYS
from saelab.training.sweep import SUMMARY_FILENAME
from saelab_cli import run_saelab

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]

HOOK = "blocks.1.hook_resid_post"
MLP = "blocks.0.hook_mlp_out"
FOLDER = f"{HOOK}-topk-x4-k8"
TOKENS = 4000

SWEEP_TOML = f"""
[train]
tokens = 2048
batch_size = 256

[data]
buffer_size = 1024

[[sae]]
hook = "{HOOK}"
architecture = "topk"
k = 8
expansion = 4

[[sae]]
hook = "{HOOK}"
architecture = "relu"
l1_coefficient = 1.0
expansion = 2

[[sae]]
hook = "{MLP}"
architecture = "topk"
k = 4
expansion = 2
"""


def saelab(*args: str) -> subprocess.CompletedProcess:
    return run_saelab(*args, env={"OMP_NUM_THREADS": "1"})  # as one_thread does in-process


@pytest.fixture(scope="module")
def cache(tiny_model_dir, words_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "acts"
    done = saelab(
        "cache",
        "--model",
        str(tiny_model_dir),
        "--hook",
        HOOK,
        "--hook",
        MLP,
        "--tokens",
        str(TOKENS),
        "--dataset",
        str(words_file),
        "--context",
        "32",
        "--shard-tokens",
        "1500",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert f"cached {TOKENS:,} tokens" in done.stdout
    return out


def train_args(cache, out, *extra):
    return (
        "train",
        "--activations",
        str(cache),
        "--hook",
        HOOK,
        "--arch",
        "topk",
        "--expansion",
        "4",
        "--k",
        "8",
        "--tokens",
        "2048",
        "--batch-size",
        "256",
        "--set",
        "data.buffer_size=1024",
        "--out",
        str(out),
        *extra,
    )


def test_cache_writes_shards_and_index(cache, tiny_model_dir, words_file):
    index = json.loads((cache / INDEX_FILENAME).read_text())
    assert index["hooks"] == [HOOK, MLP] and index["count"] == TOKENS
    assert [s["count"] for s in index["shards"]] == [1500, 1500, 1000]
    assert index["model"] == str(tiny_model_dir) and index["dataset"] == str(words_file)
    assert index["context"] == 32 and set(index["scales"]) == {HOOK, MLP}


def test_train_from_the_cache_without_the_model_then_eval_finds_it(
    cache, tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    # A model that does not exist: training from the cache must not try to load it.
    done = saelab(*train_args(cache, out, "--model", "no-such/model"))
    assert done.returncode == 0, done.stderr
    assert str(out / FOLDER) in done.stdout
    cfg = json.loads((out / FOLDER / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == str(tiny_model_dir)
    assert cfg["metadata"]["context_size"] == 32

    # In-process from here on: the same main(), without another interpreter start-up.
    assert main(["-q", "eval", str(out / FOLDER), "--tokens", "1024"]) == 0
    metrics = json.loads((out / FOLDER / "metrics.json").read_text())
    assert tuple(metrics) == METRIC_KEYS and 0 < metrics["l0"] <= 8


def test_sweep_from_the_cache_prints_and_writes_the_summary(cache, tmp_path, capsys):
    config = tmp_path / "sweep.toml"
    config.write_text(SWEEP_TOML)
    out = tmp_path / "sweep"
    args = ["sweep", str(config), "--activations", str(cache), "--eval-tokens", "512"]
    assert main(["-q", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / SUMMARY_FILENAME).read_text())
    assert len(summary["saes"]) == 3 and summary["eval_tokens"] == 512
    for row in summary["saes"]:
        assert (out / row["folder"] / "sae_weights.safetensors").is_file()
        assert row["folder"] in printed
        assert all(key in row for key in ("l0", "fvu", "gamma", "frac_dead"))
    assert all(m in printed.splitlines()[0] for m in ("l0", "fvu", "gamma", "frac_dead"))


# ----- bad input: exit status 2, one line ------------------------------------------------------


def run_main(capsys, *args: str) -> str:
    code = main(["-q", *args])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saelab: error:"), captured.err
    return lines[0]


def test_corrupt_shard_is_named(cache, tmp_path, capsys):
    damaged = shutil.copytree(cache, tmp_path / "acts")
    shard = damaged / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-64] ^= 0xFF
    shard.write_bytes(bytes(data))
    message = run_main(capsys, *train_args(damaged, tmp_path / "run"))
    assert "shard_00001.safetensors" in message and "checksum" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"--activations": "{tmp}/nowhere"}, "not an activation cache"),
        ({"--hook": "blocks.2.hook_mlp_out"}, f"holds {HOOK}, {MLP}"),
        ({"--tokens": "1e6"}, f"holds {TOKENS:,} tokens"),
    ],
)
def test_bad_train_inputs(cache, tmp_path, capsys, change, expected):
    args = list(train_args(cache, tmp_path / "run"))
    for flag, value in change.items():
        args[args.index(flag) + 1] = value.format(tmp=tmp_path)
    assert expected in run_main(capsys, *args)


def test_bad_cache_and_sweep_inputs(cache, tiny_model_dir, tmp_path, capsys):
    base = ["cache", "--model", str(tiny_model_dir), "--tokens", "100"]
    assert "float8" in run_main(capsys, *base, "--dtype", "float8", "--out", str(tmp_path / "c"))
    assert "already holds" in run_main(capsys, *base, "--out", str(cache))
    message = run_main(capsys, *base, "--hook", "blocks.7.hook_resid_post", "--out", str(tmp_path))
    assert "blocks.7.hook_resid_post" in message
    assert "does not exist" in run_main(capsys, "sweep", str(tmp_path / "none.toml"))
    config = tmp_path / "sweep.toml"
    config.write_text(SWEEP_TOML)
    sweep = ["sweep", str(config), "--activations", str(cache), "--out", str(tmp_path / "s")]
    assert "eval-tokens" in run_main(capsys, *sweep, "--eval-tokens", "0")
    assert "held-out" in run_main(capsys, *sweep, "--eval-tokens", "3000")
