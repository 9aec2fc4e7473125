"""Per-feature statistics of an SAE over a corpus (METHODS §6.3), computed in one pass.

``saelab features SAE_DIR`` (or :func:`compute_feature_stats`) runs text through the model up to
the SAE's hook and keeps, per feature, its density, mean and max activation, a histogram of its
non-zero activations, its top-K contexts, random contexts from 8 activation intervals and the
tokens its decoder direction promotes and suppresses; memory depends on the number of features,
never on the number of tokens. They are saved as ``feature_stats.safetensors`` and
``feature_stats.json`` in ``SAE_DIR/features`` by default, and read back without the model.

* :mod:`~saelab.analysis.features.collect`: the pass over a corpus (:func:`compute_feature_stats`);
* :mod:`~saelab.analysis.features.running`: the running statistics it folds every batch into;
* :mod:`~saelab.analysis.features.logit_effects`: decoder directions through the unembedding;
* :mod:`~saelab.analysis.features.stats`: :class:`FeatureStats`, its accessors, save and load.

HTML of the statistics (a feature's fragment for Jupyter, the static site) is
:mod:`saelab.analysis.dashboard`.

Example:
    >>> stats = compute_feature_stats("runs/demo/blocks.6.hook_resid_post-topk-x16-k32",
    ...                               tokens=50_000)
    >>> stats.top_examples(3)[0].tokens      # the context of feature 3's largest activation
    >>> stats.logit_effects(3)               # (promoted, suppressed) tokens
    >>> FeatureStats.load("runs/demo/blocks.6.hook_resid_post-topk-x16-k32/features")
"""

from saelab.analysis.features.logit_effects import final_norm, logit_effects_of, norm_gain
from saelab.analysis.features.stats import (
    DEFAULT_STATS_DIRNAME,
    FORMAT_VERSION,
    HIST_BINS,
    META_FILENAME,
    QUANTILE_BUCKETS,
    STATS_FILENAME,
    Example,
    FeatureStats,
)
from saelab.lazy import lazy_exports

# The pass over a corpus loads the model stack: imported when first used, so reading saved
# statistics (the dashboard, `saelab serve`) does not pay for it.
__getattr__ = lazy_exports(
    __name__,
    dict.fromkeys(
        ("compute_feature_stats", "write_feature_stats"), "saelab.analysis.features.collect"
    ),
)

__all__ = [
    "DEFAULT_STATS_DIRNAME",
    "FORMAT_VERSION",
    "HIST_BINS",
    "META_FILENAME",
    "QUANTILE_BUCKETS",
    "STATS_FILENAME",
    "Example",
    "FeatureStats",
    "compute_feature_stats",
    "final_norm",
    "logit_effects_of",
    "norm_gain",
    "write_feature_stats",
]
