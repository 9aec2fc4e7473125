"""``examples/steer_topic.py --quick`` on the real SmolLM2: the wedding vector raises wedding words
over everyday words, costs something on neutral text, and writes its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "steer_topic.py"


def test_steer_topic_example_quick(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--out", tmp_path],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "best coefficient" in done.stdout
    result = json.loads((tmp_path / "steer.json").read_text())
    clean, steered = result["sweep"]
    assert clean["coef"] == 0.0 and clean["kl"] == 0.0 and clean["delta_logit_diff"] == 0.0
    assert steered["delta_logprob_target"] > 0 > steered["delta_logprob_contrast"]
    assert steered["kl"] > 0
    assert (tmp_path / "steer.png").is_file() and (tmp_path / "vector" / "vector.json").is_file()
