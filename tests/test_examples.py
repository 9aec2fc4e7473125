"""Every ready-to-run file in ``examples/`` is a valid run: ``saelab validate`` accepts it.

``saelab validate RUN.toml`` is the command users run before a long job, so it is the oracle; the
config loader is asserted too, so a file that only the loader rejects cannot slip through.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from saelab.cli import main
from saelab.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = sorted((ROOT / "examples").glob("*.toml"))


def test_the_examples_folder_has_run_files():
    names = {p.name for p in RUN_FILES}
    assert {"sweep_l0.toml", "transcoders.toml", "cache_then_sweep.toml"} <= names, names


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.name)
def test_example_run_file_loads(path: Path):
    cfg = load_run_config(path)
    assert cfg.saes, f"{path.name} has no [[sae]] table"


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.name)
def test_example_run_file_passes_saelab_validate(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A run file that trains from a cache names it relative to where it is run; the cache is the
    # output of the `saelab cache` line in its header, which validate requires to exist (it reads
    # the cache's hooks only when the run starts), so a folder stands in for it here.
    monkeypatch.chdir(tmp_path)
    cache = load_run_config(path).data.activations
    if cache is not None:
        (tmp_path / cache).mkdir(parents=True)
    try:
        status = main(["validate", str(path)])
    except SystemExit as exc:  # argparse: e.g. no such command
        pytest.fail(f"saelab validate {path.name} exited with {exc.code}")
    assert status == 0, f"saelab validate {path.name} returned {status}"
