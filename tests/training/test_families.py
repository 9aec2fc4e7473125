"""Model → stream → trainer → saved SAE, on a tiny random model of every supported family."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.data.activations import ActivationStream
from saelab.data.text import TokenBatches
from saelab.models.hookpoints import hook_dim
from saelab.models.intervene import run_to_hooks
from saelab.saes import ReLUSAE, TopKSAE
from saelab.saes.registry import sae_folder_name
from saelab.saes.storage import load_sae
from saelab.training.trainer import Trainer
from tiny_models import FAMILIES, VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.integration

HOOKS = ("blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.2.attn.hook_z")


@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_over_hooks_trains_and_saves_for_each_family(family, words_file, tmp_path):
    model = build_tiny_model(family)
    tokenizer = build_tiny_tokenizer()
    saes = [
        TopKSAE(SAEConfig(hook=HOOKS[0], k=4, expansion=2), hook_dim(model, HOOKS[0]), seed=0),
        ReLUSAE(
            SAEConfig(hook=HOOKS[1], architecture="relu", expansion=2),
            hook_dim(model, HOOKS[1]),
            seed=0,
        ),
        TopKSAE(SAEConfig(hook=HOOKS[2], k=4, expansion=2), hook_dim(model, HOOKS[2]), seed=0),
    ]
    tokens = TokenBatches(str(words_file), tokenizer, context=32, batch_size=8, seed=0)
    stream = ActivationStream(model, tokens, list(HOOKS), batch_size=64, buffer_size=512)
    cfg = TrainConfig(tokens=64 * 20, batch_size=64, lr=1e-3, log_every_steps=5)
    results = Trainer(saes, cfg, tmp_path, progress=False, tensorboard=False).fit(stream)
    assert len(results) == 3
    probe = torch.randint(3, VOCAB_SIZE, (2, 10))
    acts = run_to_hooks(model, probe, list(HOOKS))
    for sae in saes:
        loaded = load_sae(tmp_path / sae_folder_name(sae.cfg), expected_d_in=sae.d_in)
        x = acts[sae.cfg.hook]
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-4, atol=1e-4)
        # The stream's scale reached the SAE and was folded into the saved weights.
        assert float(sae.activation_scale) == pytest.approx(stream.scales[sae.cfg.hook])
        assert float(loaded.activation_scale) == 1.0
