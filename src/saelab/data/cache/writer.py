"""Writing an activation cache: one pass of the model, shards and progress after each, the index
last; an interrupted cache is continued with ``resume=True`` (``saelab cache --resume``).

The tokens are chosen exactly as :class:`~saelab.data.activations.ActivationStream` chooses them
(same packing, BOS and special tokens dropped) and the scales come from :mod:`saelab.data.scale`,
as the stream's do, so a run trained from the cache sees what a run on the model would have seen.

Example::

    write_activation_cache(model, tokenizer, ["blocks.6.hook_resid_post"], "acts",
                           tokens=1_000_000, model_name="default")
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from tqdm.auto import tqdm

from saelab import __version__
from saelab.atomic import write_atomically, write_json
from saelab.data.activations import model_activations, special_token_ids, token_mask
from saelab.data.cache.arguments import CacheArguments
from saelab.data.cache.index import (
    CACHE_DTYPES,
    INDEX_FILENAME,
    SHARD_PATTERN,
    CacheIndex,
    CacheShard,
    local_or_name,
)
from saelab.data.cache.progress import (
    PENDING_PATTERN,
    PROGRESS_FILENAME,
    CacheProgress,
    check_folder,
    clear_incomplete,
    interruptions_reported,
    load_pending,
    progress_files,
    temp_files,
    verify_written,
)
from saelab.data.scale import activation_scale, norm_sum
from saelab.data.text import TokenBatches
from saelab.errors import SaelabError
from saelab.models.hookpoints import hook_dim
from saelab.models.loading import load_model
from saelab.outputs import check_output_location
from saelab.signals import InterruptGuard

log = logging.getLogger(__name__)


def _write_shard(path: Path, rows: dict[str, Tensor]) -> CacheShard:
    data = safetensors_bytes({h: r.contiguous() for h, r in rows.items()})
    write_atomically(path, lambda p: p.write_bytes(data))
    count = next(iter(rows.values())).shape[0]
    return CacheShard(path.name, count, len(data), hashlib.sha256(data).hexdigest())


def _save_progress(
    out_dir: Path, progress: CacheProgress, rest: dict[str, Tensor], text_batches: int
) -> None:
    """Record a finished shard: the pending rows under a new name, then ``progress.json``
    (atomically, so it always names files that exist), then drop the previous pending file."""
    before = progress.pending
    n_rest = next(iter(rest.values())).shape[0]
    name = PENDING_PATTERN.format(len(progress.shards))
    progress.pending = _write_shard(out_dir / name, rest) if n_rest else None
    progress.text_batches = text_batches
    write_json(out_dir / PROGRESS_FILENAME, progress.to_json())
    if before is not None:
        (out_dir / before.file).unlink(missing_ok=True)


def write_activation_cache(
    model: Any,
    tokenizer: Any,
    hooks: list[str],
    out_dir: str | Path,
    *,
    tokens: int,
    model_name: str,
    dataset: str = "default",
    context: int = 128,
    model_batch_size: int = 32,
    seed: int = 0,
    skip_positions: int = 1,
    norm_estimate_tokens: int = 32_768,
    shard_tokens: int = 65_536,
    dtype: str = "float32",
    progress: bool = True,
    resume: bool = False,
) -> CacheIndex:
    """Run ``model`` over ``tokens`` kept tokens of ``dataset`` once and write the cache.

    ``model_name`` is recorded (it is how later runs and ``saelab eval`` find the model). If the
    text runs out first, the cache holds what there was and a warning says so.

    After each shard, ``progress.json`` records the state to go on from. With ``resume`` an
    interrupted cache is continued: the arguments must equal the recorded ones and every written
    shard must match its recorded checksum (each a one-line error otherwise); the finished cache
    is byte for byte the one an uninterrupted run writes. Without ``resume``, a folder with an
    unfinished cache is a one-line error (shards left without a progress record, which cannot be
    resumed, are removed as before).
    """
    arguments = CacheArguments(
        model=model_name,
        hooks=tuple(dict.fromkeys(hooks)),
        tokens=tokens,
        dataset=dataset,
        context=context,
        model_batch_size=model_batch_size,
        seed=seed,
        skip_positions=skip_positions,
        norm_estimate_tokens=norm_estimate_tokens,
        shard_tokens=shard_tokens,
        dtype=dtype,
    )
    hooks = list(arguments.hooks)
    out_dir = Path(out_dir)
    state = check_folder(out_dir, arguments, resume)
    d_in = {hook: hook_dim(model, hook) for hook in hooks}  # unknown hooks fail before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    if state is None:
        clear_incomplete(out_dir)
        state = CacheProgress(arguments.recorded(), [], 0, dict.fromkeys(hooks, 0.0), 0, None)
    else:
        verify_written(out_dir, state)
        for path in temp_files(out_dir):
            path.unlink()
        log.info("resuming the cache in %s after %d shard(s)", out_dir, len(state.shards))

    # A shard and its progress record are written together or not at all: a signal meanwhile
    # waits for both, so what the interruption reports is what a resume finds.
    with interruptions_reported(out_dir, tokens), InterruptGuard() as guard:
        index = _write_shards(
            model, tokenizer, hooks, out_dir, arguments, state, d_in, guard, progress
        )
    log.info(
        "cached %d tokens of %s in %d shard(s) at %s",
        index.count,
        hooks,
        len(index.shards),
        out_dir,
    )
    return index


def _write_shards(
    model: Any,
    tokenizer: Any,
    hooks: list[str],
    out_dir: Path,
    arguments: CacheArguments,
    state: CacheProgress,
    d_in: dict[str, int],
    guard: InterruptGuard,
    progress: bool,
) -> CacheIndex:
    """The model pass of :func:`write_activation_cache` from ``state`` on: shards, then the
    index."""
    a = arguments
    dataset, context, model_batch_size, seed = a.dataset, a.context, a.model_batch_size, a.seed
    tokens, shard_tokens, dtype = a.tokens, a.shard_tokens, a.dtype
    skip_positions, norm_estimate_tokens = a.skip_positions, a.norm_estimate_tokens
    batches = TokenBatches(
        dataset,
        tokenizer,
        context=context,
        batch_size=model_batch_size,
        seed=seed,
        start_batch=state.text_batches,
    )
    specials = special_token_ids(tokenizer)
    stored = CACHE_DTYPES[dtype]
    pending = load_pending(out_dir, state, d_in)
    n_pending = state.pending.count if state.pending else 0
    written = sum(s.count for s in state.shards)
    # The shards still to write, before the model's first forward pass.
    need = (tokens - written) * sum(d_in.values()) * stored.itemsize
    check_output_location(out_dir, need_bytes=need)

    def flush(n: int) -> None:
        nonlocal n_pending, written
        rows = {h: torch.cat(pending[h]) for h in hooks}
        path = out_dir / SHARD_PATTERN.format(len(state.shards))
        with guard.shield():
            state.shards.append(_write_shard(path, {h: r[:n] for h, r in rows.items()}))
            rest = {h: rows[h][n:] for h in hooks}
            _save_progress(out_dir, state, rest, batches.batches_yielded)
        for h in hooks:
            pending[h] = [rows[h][n:]]
        n_pending -= n
        written += n

    bar = tqdm(
        total=tokens,
        initial=written + n_pending,
        disable=not progress,
        unit="tok",
        unit_scale=True,
        desc="cache",
    )
    with bar:  # closed before an error or interruption is reported, not after
        while True:
            while n_pending >= shard_tokens:
                flush(shard_tokens)
            if written + n_pending >= tokens:
                break
            tokens_NP = next(batches, None)
            if tokens_NP is None:
                log.warning(
                    "the text of %r ran out after %d tokens of %d; the cache holds what there was",
                    dataset,
                    written + n_pending,
                    tokens,
                )
                break
            keep_NP = token_mask(tokens_NP, skip_positions, specials)
            acts = model_activations(model, tokens_NP, hooks, keep_NP)
            take = min(int(keep_NP.sum()), tokens - written - n_pending)
            n_for_norm = min(take, norm_estimate_tokens - state.norm_rows)
            for h in hooks:
                rows_TD = acts[h][:take].cpu()
                if n_for_norm > 0:
                    state.norm_sums[h] += norm_sum(rows_TD[:n_for_norm])
                pending[h].append(rows_TD.to(stored))
            state.norm_rows += max(n_for_norm, 0)
            n_pending += take
            bar.update(take)
        if n_pending:
            flush(n_pending)
    if written == 0:
        raise SaelabError(f"no tokens came from {dataset!r}; pass a larger dataset")

    scales = {h: activation_scale(state.norm_sums[h], state.norm_rows, d_in[h], h) for h in hooks}
    index = CacheIndex(
        model=local_or_name(a.model),
        hooks=tuple(hooks),
        d_in=d_in,
        dtype=dtype,
        scales=scales,
        count=written,
        shards=tuple(state.shards),
        context=context,
        dataset=local_or_name(dataset),
        seed=seed,
        skip_positions=skip_positions,
        norm_estimate_tokens=norm_estimate_tokens,
        saelab_version=__version__,
    )
    # Last: its presence marks the cache as complete; the progress record is then dropped (a
    # leftover one beside index.json is ignored: the cache is complete). A signal from here on
    # is let go: the cache is finished, there is nothing left to stop.
    guard.armed = True
    with guard.shield():
        write_json(out_dir / INDEX_FILENAME, index.to_json())
        for path in progress_files(out_dir):
            path.unlink()
    return index


def cache_model_activations(
    model_name: str,
    hooks: list[str],
    out_dir: str | Path,
    *,
    tokens: int,
    device: str = "cpu",
    dtype: str = "float32",
    shard_tokens: int = 65_536,
    resume: bool = False,
    **options: Any,
) -> CacheIndex:
    """Load ``model_name`` and :func:`write_activation_cache` from it; the options, the folder
    and (with ``resume``) the recorded arguments are checked before the (slow) model load.
    ``options``: dataset, context, model_batch_size, seed, ...
    """
    settings = {k: v for k, v in options.items() if k != "progress"}
    arguments = CacheArguments(
        model=model_name,
        hooks=tuple(dict.fromkeys(hooks)),
        tokens=tokens,
        shard_tokens=shard_tokens,
        dtype=dtype,
        **settings,
    )
    check_folder(Path(out_dir), arguments, resume)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaelabError("--device cuda was asked for but no CUDA device is available")
    with interruptions_reported(Path(out_dir), tokens):
        model, tokenizer = load_model(model_name, device=device)
    return write_activation_cache(
        model,
        tokenizer,
        hooks,
        out_dir,
        tokens=tokens,
        model_name=model_name,
        dtype=dtype,
        shard_tokens=shard_tokens,
        resume=resume,
        **options,
    )
