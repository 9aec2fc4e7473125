"""Feature statistics of a tiny random Llama and a tiny TopK SAE, for tests of what reads them.

>>> from feature_fixtures import tiny_feature_stats
>>> stats = tiny_feature_stats(words_file)          # FeatureStats, 128 features, ~500 tokens
"""

from __future__ import annotations

from pathlib import Path

from saelab.analysis.features import FeatureStats, compute_feature_stats
from saelab.config import SAEConfig
from saelab.saes import TopKSAE
from saelab.saes.base import SparseAutoencoder
from tiny_models import D_MODEL, build_tiny_model, build_tiny_tokenizer

HOOK = "blocks.1.hook_resid_post"
CONTEXT = 32


def tiny_sae(d_sae: int = 128, k: int = 4, seed: int = 0) -> SparseAutoencoder:
    """A random TopK SAE on the tiny models' residual stream at :data:`HOOK`."""
    return TopKSAE(SAEConfig(hook=HOOK, k=k, width=d_sae), d_in=D_MODEL, seed=seed)


def tiny_feature_stats(
    words_file: str | Path,
    *,
    tokens: int = 512,
    d_sae: int = 128,
    top_k: int = 8,
    n_quantile_examples: int = 3,
    window: tuple[int, int] = (4, 2),
    batch_size: int = 4,
    sae: SparseAutoencoder | None = None,
    model=None,
    **kwargs,
) -> FeatureStats:
    """:func:`compute_feature_stats` of a tiny SAE (default :func:`tiny_sae`) and the tiny Llama
    on ``words_file`` (the ``words_file`` fixture), context :data:`CONTEXT`."""
    return compute_feature_stats(
        sae if sae is not None else tiny_sae(d_sae),
        model if model is not None else build_tiny_model("llama"),
        build_tiny_tokenizer(),
        data=str(words_file),
        tokens=tokens,
        context=CONTEXT,
        batch_size=batch_size,
        top_k=top_k,
        n_quantile_examples=n_quantile_examples,
        window=window,
        progress=False,
        **kwargs,
    )
