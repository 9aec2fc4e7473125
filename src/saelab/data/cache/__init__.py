"""Activations on disk: one pass of the model written as shards, read back shuffled many times.

A cache folder::

    DIR/shard_00000.safetensors   one tensor per hook, [rows, d_in], row i of every hook is the
    DIR/shard_00001.safetensors   same token; raw model units in the stored dtype (float32)
    ...
    DIR/index.json                model, hooks, d_in and normalisation scale per hook, dtype,
                                  row counts, the text settings, a sha256 checksum per shard

Every file is written to a temp name and renamed, ``index.json`` last: a folder that has one is
complete. Until then ``progress.json`` records how far the writer got, so an interrupted cache is
continued with ``resume=True`` (``saelab cache --resume``) into exactly the cache an
uninterrupted run writes; it is removed once ``index.json`` is written.

One job per module: :mod:`~saelab.data.cache.index` (the format, ``index.json``),
:mod:`~saelab.data.cache.arguments` (what decides a cache's bytes),
:mod:`~saelab.data.cache.progress` (an unfinished cache and the checks before resuming),
:mod:`~saelab.data.cache.writer` (the one pass of the model) and
:mod:`~saelab.data.cache.reader` (shuffled batches for training).

Example::

    write_activation_cache(model, tokenizer, ["blocks.6.hook_resid_post"], "acts",
                           tokens=1_000_000, model_name="default")
    stream = ActivationCacheStream("acts", batch_size=4096)
    batch = next(iter(stream))["blocks.6.hook_resid_post"]   # [4096, 576], normalised units
"""

from saelab.data.cache.arguments import CacheArguments
from saelab.data.cache.index import (
    CACHE_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILENAME,
    SHARD_PATTERN,
    CacheIndex,
    CacheShard,
    read_cache_index,
)
from saelab.data.cache.progress import (
    PENDING_GLOB,
    PENDING_PATTERN,
    PROGRESS_FILENAME,
    PROGRESS_FORMAT,
)
from saelab.data.cache.reader import ActivationCacheStream
from saelab.data.cache.writer import cache_model_activations, write_activation_cache

__all__ = [
    "CACHE_DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_FILENAME",
    "PENDING_GLOB",
    "PENDING_PATTERN",
    "PROGRESS_FILENAME",
    "PROGRESS_FORMAT",
    "SHARD_PATTERN",
    "ActivationCacheStream",
    "CacheArguments",
    "CacheIndex",
    "CacheShard",
    "cache_model_activations",
    "read_cache_index",
    "write_activation_cache",
]
