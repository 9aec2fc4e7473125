"""Every architecture's training step under bf16 autocast stays close to float32.

``train.autocast_bf16`` is for CUDA; CPU autocast exercises the same casting rules here: matrix
products drop to bfloat16 while the hand-written kernels run in float32 (``fp32_forward``).
"""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig
from saelab.saes import ARCHITECTURES

D_IN = 32


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_bf16_autocast_step_matches_float32(name):
    cls = ARCHITECTURES[name]
    extra = {"output_hook": "out"} if name.endswith("transcoder") else {}
    cfg = SAEConfig(hook="h", architecture=name, expansion=4, k=4, **extra)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0)) * 3
    target = {"target_BD": 0.5 * x} if extra else {}
    results = {}
    for autocast in (False, True):
        sae = cls(cfg, D_IN, seed=0)
        assert sae.supports_autocast_bf16
        dead = torch.zeros(sae.d_sae, dtype=torch.bool)
        dead[::3] = True
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = sae.training_step(x, dead_F=dead, **target)
        out.loss.backward()
        grads = [p.grad for p in sae.parameters() if p.grad is not None]
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        results[autocast] = (out.loss.item(), torch.cat([g.flatten() for g in grads]))
    (loss32, grad32), (loss16, grad16) = results[False], results[True]
    assert loss16 == pytest.approx(loss32, rel=0.02)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.98
