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
