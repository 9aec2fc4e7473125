"""Shared pieces of the steering tests: prompt pairs and a small SAE for the tiny models."""

from __future__ import annotations

from saelab.analysis.steering.data import ContrastPair
from saelab.config import SAEConfig
from saelab.saes.topk import TopKSAE
from tiny_models import D_MODEL

HOOK = "blocks.1.hook_resid_post"

PAIRS = [
    ContrastPair("w10 w11 w12", " w5", " w6"),
    ContrastPair("w20 w21", " w7 w8", " w9"),
    ContrastPair("w30", " w40 w41 w42", " w43 w44"),
]
"""Prompts and completions of different lengths, so batches are padded."""

TEXTS = [
    "w3 w4 w5 w6 w7 w8 w9 w10",
    "w100 w101",
    "w50 w51 w52 w53 w54 w55 w56 w57 w58 w59 w60 w61 w62",
]


def tiny_sae(hook: str = HOOK, scale: float = 1.0) -> TopKSAE:
    """A random TopK SAE on the tiny models' residual stream; ``scale`` is its activation scale
    (an SAE fresh from training, not yet folded)."""
    sae = TopKSAE(SAEConfig(hook=hook, architecture="topk", expansion=2, k=8), D_MODEL, seed=0)
    sae.activation_scale.fill_(scale)
    return sae.eval()
