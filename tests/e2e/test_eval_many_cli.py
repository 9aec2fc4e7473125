"""``saelab eval`` on many SAEs at once: a quoted glob and a run folder, as a subprocess."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from saelab.config import SAEConfig
from saelab.evaluation.evaluate import EXTRA_KEYS, METRIC_KEYS, SUMMARY_FILENAME
from saelab.saes import TopKSAE
from saelab.saes.storage import save_sae
from saelab_cli import run_saelab
from tiny_models import D_MODEL

pytestmark = pytest.mark.e2e

HOOKS = ("blocks.0.hook_resid_post", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


def saelab(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return run_saelab(*args, env={"SAELAB_CACHE_DIR": str(cache)})


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir, words_file) -> Path:
    """A run folder with three saved SAEs (two on one hook) of the tiny Llama, and a stray file."""
    run = tmp_path / "run"
    meta = {"model_name": str(tiny_model_dir), "dataset_path": str(words_file), "context_size": 32}
    for i, hook in enumerate(HOOKS):
        sae = TopKSAE(SAEConfig(hook=hook, k=4, expansion=2), d_in=D_MODEL, seed=i)
        save_sae(sae, run / f"sae{i}", metadata=meta)
    (run / "summary.json").write_text("{}")
    return run


def check_outputs(run: Path, summary_path: Path, stdout: str) -> None:
    summary = json.loads(summary_path.read_text())
    assert [Path(e["sae_dir"]).name for e in summary["saes"]] == ["sae0", "sae1", "sae2"]
    for entry in summary["saes"]:
        assert set(entry["metrics"]) == {*METRIC_KEYS, *EXTRA_KEYS}
        assert entry["context"] == 32 and isinstance(entry["warnings"], list)
        sae_dir = Path(entry["sae_dir"])
        assert tuple(json.loads((sae_dir / "metrics.json").read_text())) == METRIC_KEYS
        info = json.loads((sae_dir / "eval_info.json").read_text())
        assert set(EXTRA_KEYS) <= set(info) and "warnings" in info
    assert "clean CE of" in stdout and "context 32" in stdout
    for key in (*METRIC_KEYS, *EXTRA_KEYS):
        assert key in stdout


def test_eval_a_quoted_glob_writes_the_summary_in_the_common_parent(run_dir, tmp_path):
    done = saelab("eval", str(run_dir / "sae*"), "--tokens", "256", cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    check_outputs(run_dir, run_dir / SUMMARY_FILENAME, done.stdout)


def test_eval_a_run_folder_with_a_summary_path(run_dir, tmp_path):
    target = tmp_path / "out" / "summary.json"
    target.parent.mkdir()
    done = saelab(
        "eval", str(run_dir), "--tokens", "256", "--summary", str(target), cache=tmp_path / "c"
    )
    assert done.returncode == 0, done.stderr
    check_outputs(run_dir, target, done.stdout)


def test_eval_of_a_folder_without_saes_is_one_line(tmp_path):
    done = saelab("eval", str(tmp_path / "nothing*"), cache=tmp_path / "cache")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "cfg.json" in done.stderr
