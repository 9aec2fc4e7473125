"""Text to activations: text specs → packed token rows → model activations, live or on disk.

``text`` (text specs and packing), ``corpus`` (the embedded default text), ``activations`` (the
live stream from the model), ``scale`` (the dataset-wide activation scale), ``shuffle`` (the
buffer both streams serve from), ``cache`` (activations stored on disk and read back).

Example:
    >>> from saelab.data import ActivationStream, TokenBatches
    >>> batches = TokenBatches("default", tokenizer, context=128, batch_size=32)
    >>> stream = ActivationStream(model, batches, ["blocks.6.hook_resid_post"], batch_size=4096)
"""

from saelab.data.activations import ActivationStream, model_activations
from saelab.data.cache import ActivationCacheStream, cache_model_activations, read_cache_index
from saelab.data.scale import activation_scale
from saelab.data.shuffle import ShuffleBuffer
from saelab.data.text import TokenBatches, iter_documents, pack_tokens

__all__ = [
    "ActivationCacheStream",
    "ActivationStream",
    "ShuffleBuffer",
    "TokenBatches",
    "activation_scale",
    "cache_model_activations",
    "iter_documents",
    "model_activations",
    "pack_tokens",
    "read_cache_index",
]
