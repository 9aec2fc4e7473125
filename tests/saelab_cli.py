"""Running the real ``saelab`` command in a subprocess, for the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_saelab(
    *args: str | Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``python -m saelab -q ARGS`` offline, with output captured as text."""
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "saelab", "-q", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command (exit 2, no traceback)."""
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("saelab: error:")
    assert "Traceback" not in done.stderr
    return lines[0]


TINY_HOOK = "blocks.1.hook_resid_post"
"""The hook the tiny-model CLI tests train at."""


def tiny_train_args(
    model_dir: str | Path, text: str | Path, out: str | Path, *, tokens: int, extra: tuple = ()
) -> tuple[str, ...]:
    """``saelab train`` arguments of the small TopK run the CLI tests use (x4, k 8, batch 256,
    context 32, a 1024-row buffer) on a tiny model folder and a text file; ``extra`` goes before
    ``--out``."""
    return (
        "train",
        "--model",
        str(model_dir),
        "--hook",
        TINY_HOOK,
        "--arch",
        "topk",
        "--expansion",
        "4",
        "--k",
        "8",
        "--tokens",
        str(tokens),
        "--batch-size",
        "256",
        "--dataset",
        str(text),
        "--context",
        "32",
        "--set",
        "data.buffer_size=1024",
        *extra,
        "--out",
        str(out),
    )
