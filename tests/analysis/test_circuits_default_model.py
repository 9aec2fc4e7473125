"""IOI on the real SmolLM2-135M: the model does the task, and an SAE spliced in with its error
term leaves the metric unchanged (a few hundred tokens)."""

from __future__ import annotations

import pytest
import torch

from saelab.analysis.circuits.spliced import SplicedModel
from saelab.analysis.circuits.tasks import clean_metric, ioi_task, tokenize_task
from saelab.config import SAEConfig
from saelab.models.loading import load_model
from saelab.saes import TopKSAE

pytestmark = pytest.mark.slow


def test_smollm2_prefers_the_indirect_object_and_the_error_splice_keeps_it():
    model, tokenizer = load_model("default")
    batch = tokenize_task(ioi_task(tokenizer, 8), tokenizer)
    clean = clean_metric(model, batch)
    # IO over S on most prompts (SmolLM2's mean logit difference is about 3; GPT-2 small's 3.56).
    assert clean.mean() > 1 and (clean > 0).float().mean() >= 0.6
    sae = TopKSAE(SAEConfig(hook="blocks.6.hook_resid_post", k=16, expansion=2), d_in=576, seed=0)
    spliced = SplicedModel(model, [sae.eval()])
    with torch.no_grad():
        assert torch.allclose(spliced.metric(batch), clean, atol=1e-3)
        assert not torch.allclose(spliced.metric(batch, add_error=False), clean, atol=0.1)
