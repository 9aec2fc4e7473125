"""Activations on disk: one pass of the model written as shards, read back shuffled many times.

A cache folder::

    DIR/shard_00000.safetensors   one tensor per hook, [rows, d_in], row i of every hook is the
    DIR/shard_00001.safetensors   same token; raw model units in the stored dtype (float32)
    ...
    DIR/index.json                model, hooks, d_in and normalisation scale per hook, dtype,
                                  row counts, the text settings, a sha256 checksum per shard

Every file is written to a temp name and renamed, ``index.json`` last: a folder that has one is
complete. Until then ``progress.json`` (rewritten after every shard) records the arguments, the
shards written with their checksums, the text position, the running sums of the scales and a
``pending_NNNNN.safetensors`` file of rows read but not yet in a shard, so an interrupted cache
is continued with ``resume=True`` (``saelab cache --resume``) into exactly the cache an
uninterrupted run writes; both are removed once ``index.json`` is written.

The tokens are chosen exactly as :class:`~saelab.data.activations.ActivationStream`
chooses them (same packing, BOS and special tokens dropped) and the scales are estimated the same
way, so a run trained from the cache sees what a run on the model would have seen.

Reading (:class:`ActivationCacheStream`) goes through ``safetensors.safe_open``, which memory-maps
the file and copies out only the rows asked for. It was chosen over ``numpy.memmap`` on the raw
buffer because it reads bfloat16 (numpy has no such dtype), parses and checks the header itself
(no hand-written offsets), and is equally zero-copy until a slice is taken. Rows are read in shard
order, with the order of the shards shuffled per epoch by the seed, through a shuffle buffer that
is refilled when half of it has been served (METHODS §7.3): memory stays at one buffer whatever
the size of the cache.

Example::

    write_activation_cache(model, tokenizer, ["blocks.6.hook_resid_post"], "acts",
                           tokens=1_000_000, model_name="default")
    stream = ActivationCacheStream("acts", batch_size=4096)
    batch = next(iter(stream))["blocks.6.hook_resid_post"]   # [4096, 576], normalised units
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor
from tqdm.auto import tqdm

from saelab import __version__
from saelab.atomic import write_atomically, write_json
from saelab.data.activations import model_activations, special_token_ids, token_mask
from saelab.data.text import TokenBatches
from saelab.errors import SaelabError
from saelab.models.hookpoints import hook_dim
from saelab.models.loading import load_model

log = logging.getLogger(__name__)

INDEX_FILENAME = "index.json"
SHARD_PATTERN = "shard_{:05d}.safetensors"
FORMAT = "saelab-activation-cache"
FORMAT_VERSION = 1
PROGRESS_FILENAME = "progress.json"
PROGRESS_FORMAT = "saelab-activation-cache-progress"
PENDING_PATTERN = "pending_{:05d}.safetensors"
PENDING_GLOB = "pending_*.safetensors"

CACHE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Dtypes a cache can store; the CLI's ``--dtype`` choices."""

_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

_RECREATE = "recreate the cache with `saelab cache`"


# ----- the index ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheShard:
    file: str
    """File name inside the cache folder."""
    count: int
    """Rows (tokens) in this shard."""
    bytes: int
    """File size; a different size means a truncated or replaced file."""
    sha256: str
    """Checksum of the whole file."""


@dataclass(frozen=True)
class CacheIndex:
    """The content of ``index.json``."""

    model: str
    hooks: tuple[str, ...]
    d_in: dict[str, int]
    dtype: str
    scales: dict[str, float]
    """Per hook, √d_in / mean‖x‖ over the first ``norm_estimate_tokens`` rows (raw units)."""
    count: int
    """Rows in the whole cache."""
    shards: tuple[CacheShard, ...]
    context: int
    dataset: str
    seed: int
    skip_positions: int
    norm_estimate_tokens: int
    saelab_version: str

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}
        out["hooks"] = list(self.hooks)
        out["shards"] = [asdict(s) for s in self.shards]
        return out

    @property
    def cache_id(self) -> str:
        """A short fingerprint of the cached data (its shard checksums)."""
        joined = "\n".join(s.sha256 for s in self.shards)
        return hashlib.sha256(joined.encode()).hexdigest()[:16]

    def metadata(self) -> dict[str, Any]:
        """What a saved SAE's ``cfg.json`` records about its training activations."""
        return {
            "model_name": self.model,
            "context_size": self.context,
            "dataset_path": self.dataset,
            "seqpos_slice": [self.skip_positions, None],
        }


def read_cache_index(cache_dir: str | Path) -> CacheIndex:
    """The index of the cache in ``cache_dir``; a missing or malformed one is a one-line error."""
    path = Path(cache_dir) / INDEX_FILENAME
    if not path.is_file():
        raise SaelabError(
            f"{cache_dir} is not an activation cache (no {INDEX_FILENAME}); create one with "
            "`saelab cache --out DIR`, or the writing was interrupted: run it again"
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format {raw.get('format')!r} v{raw.get('format_version')}")
        return CacheIndex(
            model=str(raw["model"]),
            hooks=tuple(raw["hooks"]),
            d_in={h: int(d) for h, d in raw["d_in"].items()},
            dtype=str(raw["dtype"]),
            scales={h: float(s) for h, s in raw["scales"].items()},
            count=int(raw["count"]),
            shards=tuple(CacheShard(**s) for s in raw["shards"]),
            context=int(raw["context"]),
            dataset=str(raw["dataset"]),
            seed=int(raw["seed"]),
            skip_positions=int(raw["skip_positions"]),
            norm_estimate_tokens=int(raw["norm_estimate_tokens"]),
            saelab_version=str(raw["saelab_version"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SaelabError(
            f"{path} is not a saelab activation cache index ({reason}); {_RECREATE}"
        ) from exc


# ----- writing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheArguments:
    """Everything that decides a cache's bytes; a resumed cache must be written with the same."""

    model: str
    """Model name as given (a local folder is recorded as its absolute path)."""
    hooks: tuple[str, ...]
    """Hook points, in order, duplicates dropped."""
    tokens: int
    """Rows (kept tokens) to cache in all."""
    dataset: str = "default"
    """Text spec (a local file is recorded as its absolute path)."""
    context: int = 128
    """Tokens per sequence."""
    model_batch_size: int = 32
    """Sequences per model forward pass."""
    seed: int = 0
    """Seed of the text order: the only randomness in writing a cache."""
    skip_positions: int = 1
    """Leading positions of each sequence that are not cached (1: BOS)."""
    norm_estimate_tokens: int = 32_768
    """The first rows whose mean norm gives each hook's scale."""
    shard_tokens: int = 65_536
    """Rows per shard."""
    dtype: str = "float32"
    """Stored dtype, one of :data:`CACHE_DTYPES`."""

    def __post_init__(self) -> None:
        if not self.hooks:
            raise SaelabError("no hook to cache; pass at least one --hook")
        if self.tokens < 1 or self.shard_tokens < 1:
            raise SaelabError(
                f"--tokens and --shard-tokens must be positive, got {self.tokens}, "
                f"{self.shard_tokens}"
            )
        if self.dtype not in CACHE_DTYPES:
            raise SaelabError(
                f"cache dtype {self.dtype!r} unknown; choose one of {', '.join(CACHE_DTYPES)}"
            )
        if self.norm_estimate_tokens < 1:
            raise SaelabError(
                f"norm_estimate_tokens must be positive, got {self.norm_estimate_tokens}"
            )

    def recorded(self) -> dict[str, Any]:
        """The JSON form kept in ``progress.json`` and compared on resume."""
        out = asdict(self)
        out["hooks"] = list(self.hooks)
        out["model"] = _local_or_name(self.model)
        out["dataset"] = _local_or_name(self.dataset)
        return out


# ----- progress of an unfinished cache --------------------------------------------------------


@dataclass
class _Progress:
    """The writer's whole state after its last finished shard, so a resume goes on exactly as an
    uninterrupted run would (same shards, counts, scales and checksums).

    The text position is a count of token batches (:class:`TokenBatches` skips to it); the rows
    of the last model batch that did not fit in the shard are kept in a small ``pending`` file
    instead of being recomputed, because a second forward pass need not be bitwise identical.
    There is no other randomness: the text order comes from the seed and the model is in eval mode.
    """

    arguments: dict[str, Any]
    shards: list[CacheShard]
    text_batches: int
    """Token batches read so far (``TokenBatches.batches_yielded``)."""
    norm_sums: dict[str, float]
    """Per hook Σ‖x‖ over the first ``norm_rows`` rows, in float64 so the order of sums is moot
    (and exact through JSON)."""
    norm_rows: int
    pending: CacheShard | None
    """Rows read but not yet in a shard, as a file like a shard (``pending_NNNNN``)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROGRESS_FORMAT,
            "format_version": FORMAT_VERSION,
            "arguments": self.arguments,
            "shards": [asdict(s) for s in self.shards],
            "text_batches": self.text_batches,
            "norm_sums": self.norm_sums,
            "norm_rows": self.norm_rows,
            "pending": asdict(self.pending) if self.pending else None,
        }

    @classmethod
    def read(cls, path: Path) -> _Progress:
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != PROGRESS_FORMAT or raw["format_version"] != FORMAT_VERSION:
                raise ValueError(f"format {raw.get('format')!r} v{raw.get('format_version')}")
            return cls(
                arguments=dict(raw["arguments"]),
                shards=[CacheShard(**s) for s in raw["shards"]],
                text_batches=int(raw["text_batches"]),
                norm_sums={h: float(v) for h, v in raw["norm_sums"].items()},
                norm_rows=int(raw["norm_rows"]),
                pending=CacheShard(**raw["pending"]) if raw["pending"] else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SaelabError(
                f"{path} is not a saelab cache progress file ({reason}); delete "
                f"{path.parent} and cache again, or choose another --out"
            ) from exc


def _local_or_name(spec: str) -> str:
    """Absolute path for a local file or folder (the cache is reused from elsewhere), else as is."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec != "default" and path.exists() else spec


def _check_folder(out_dir: Path, arguments: CacheArguments, resume: bool) -> _Progress | None:
    """What ``out_dir`` holds, checked before any model is loaded: the progress to resume from,
    or None to start afresh. Checksums are checked later, by :func:`_verify_written`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SaelabError(f"--out {out_dir} is a file; pass a folder for the cache")
    if (out_dir / INDEX_FILENAME).exists():
        if resume:
            raise SaelabError(
                f"{out_dir} already holds a complete activation cache; nothing to resume "
                "(train from it with --activations)"
            )
        raise SaelabError(
            f"{out_dir} already holds an activation cache; choose another --out or delete it"
        )
    path = out_dir / PROGRESS_FILENAME
    if not path.is_file():
        if resume:
            raise SaelabError(
                f"nothing to resume: {out_dir} holds no unfinished activation cache (no "
                f"{PROGRESS_FILENAME}); drop --resume"
            )
        return None
    if not resume:
        raise SaelabError(
            f"{out_dir} holds an unfinished activation cache; pass --resume to continue it, "
            "or choose another --out"
        )
    progress = _Progress.read(path)
    now = arguments.recorded()
    for name in [*now, *(k for k in progress.arguments if k not in now)]:
        before, after = progress.arguments.get(name), now.get(name)
        if before != after:
            raise SaelabError(
                f"cannot resume the cache in {out_dir}: it was started with {name}={before!r} "
                f"but this run has {name}={after!r}; resume with the same arguments or choose "
                "another --out"
            )
    return progress


def _verify_written(out_dir: Path, progress: _Progress) -> None:
    """Every file the progress record names must be there with its recorded checksum. A damaged
    shard is an error, not rewritten: the state to recompute it from is gone (it is only kept for
    the last shard), and damage after an atomic write means something else touched the folder."""
    for entry in [*progress.shards, *([progress.pending] if progress.pending else [])]:
        path = out_dir / entry.file
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != entry.bytes or _file_sha256(path) != entry.sha256:
            problem = "fails its sha256 checksum (changed or corrupt since it was written)"
        else:
            continue
        raise SaelabError(
            f"cannot resume: {path} {problem}; delete {out_dir} and cache again, or choose "
            "another --out"
        )


def _clear_incomplete(out_dir: Path) -> None:
    """Remove what a writer without a progress record left (it cannot be resumed), and temp
    files a killed writer could not remove."""
    stale = sorted(out_dir.glob("shard_*.safetensors"))
    if stale:
        log.info("removing %d shard(s) of an unfinished cache in %s", len(stale), out_dir)
    for path in [*stale, *_progress_files(out_dir), *_temp_files(out_dir)]:
        path.unlink()


def _progress_files(out_dir: Path) -> list[Path]:
    return [p for p in [out_dir / PROGRESS_FILENAME] if p.is_file()] + sorted(
        out_dir.glob(PENDING_GLOB)
    )


def _temp_files(out_dir: Path) -> list[Path]:
    """Temp files of :func:`write_atomically` for this writer's files (a killed writer's)."""
    names = (".shard_*.tmp", f".{PENDING_GLOB}.*.tmp", ".*.json.*.tmp")
    return sorted({p for pattern in names for p in out_dir.glob(pattern)})


def _write_shard(path: Path, rows: dict[str, Tensor]) -> CacheShard:
    data = safetensors_bytes({h: r.contiguous() for h, r in rows.items()})
    write_atomically(path, lambda p: p.write_bytes(data))
    count = next(iter(rows.values())).shape[0]
    return CacheShard(path.name, count, len(data), hashlib.sha256(data).hexdigest())


def _save_progress(
    out_dir: Path, progress: _Progress, rest: dict[str, Tensor], text_batches: int
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


def _load_pending(
    out_dir: Path, progress: _Progress, d_in: dict[str, int]
) -> dict[str, list[Tensor]]:
    """The rows read but not yet written when the progress was recorded, in the stored dtype."""
    if progress.pending is None:
        return {h: [] for h in d_in}
    path = out_dir / progress.pending.file
    rows = load_file(path)
    for h, d in d_in.items():
        if h not in rows or rows[h].shape[1:] != (d,):
            raise SaelabError(
                f"cannot resume: {path} does not hold [rows, {d}] rows of {h} (was another model "
                "used?); delete the folder and cache again, or choose another --out"
            )
    return {h: [rows[h]] for h in d_in}


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
    state = _check_folder(out_dir, arguments, resume)
    d_in = {hook: hook_dim(model, hook) for hook in hooks}  # unknown hooks fail before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    if state is None:
        _clear_incomplete(out_dir)
        state = _Progress(arguments.recorded(), [], 0, dict.fromkeys(hooks, 0.0), 0, None)
    else:
        _verify_written(out_dir, state)
        for path in _temp_files(out_dir):
            path.unlink()
        log.info("resuming the cache in %s after %d shard(s)", out_dir, len(state.shards))

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
    pending = _load_pending(out_dir, state, d_in)
    n_pending = state.pending.count if state.pending else 0
    written = sum(s.count for s in state.shards)

    def flush(n: int) -> None:
        nonlocal n_pending, written
        rows = {h: torch.cat(pending[h]) for h in hooks}
        path = out_dir / SHARD_PATTERN.format(len(state.shards))
        state.shards.append(_write_shard(path, {h: r[:n] for h, r in rows.items()}))
        for h in hooks:
            pending[h] = [rows[h][n:]]
        n_pending -= n
        written += n
        _save_progress(out_dir, state, {h: rows[h][n:] for h in hooks}, batches.batches_yielded)

    bar = tqdm(
        total=tokens,
        initial=written + n_pending,
        disable=not progress,
        unit="tok",
        unit_scale=True,
        desc="cache",
    )
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
                state.norm_sums[h] += float(rows_TD[:n_for_norm].double().norm(dim=-1).sum())
            pending[h].append(rows_TD.to(stored))
        state.norm_rows += max(n_for_norm, 0)
        n_pending += take
        bar.update(take)
    if n_pending:
        flush(n_pending)
    bar.close()
    if written == 0:
        raise SaelabError(f"no tokens came from {dataset!r}; pass a larger dataset")

    scales = {}
    for h in hooks:
        mean_norm = state.norm_sums[h] / state.norm_rows
        if not math.isfinite(mean_norm) or mean_norm == 0:
            raise SaelabError(f"activations at {h} are all zero or not finite; pick another hook")
        scales[h] = math.sqrt(d_in[h]) / mean_norm
    index = CacheIndex(
        model=_local_or_name(model_name),
        hooks=tuple(hooks),
        d_in=d_in,
        dtype=dtype,
        scales=scales,
        count=written,
        shards=tuple(state.shards),
        context=context,
        dataset=_local_or_name(dataset),
        seed=seed,
        skip_positions=skip_positions,
        norm_estimate_tokens=norm_estimate_tokens,
        saelab_version=__version__,
    )
    # Last: its presence marks the cache as complete; the progress record is then dropped (a
    # leftover one beside index.json is ignored: the cache is complete).
    write_json(out_dir / INDEX_FILENAME, index.to_json())
    for path in _progress_files(out_dir):
        path.unlink()
    log.info(
        "cached %d tokens of %s in %d shard(s) at %s", written, hooks, len(index.shards), out_dir
    )
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
    _check_folder(Path(out_dir), arguments, resume)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaelabError("--device cuda was asked for but no CUDA device is available")
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


# ----- reading ------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class ActivationCacheStream:
    """Shuffled, normalised ``{hook: [batch, d_in]}`` batches from an activation cache.

    The same protocol as :class:`~saelab.data.activations.ActivationStream` (``scales``,
    ``state_dict``/``load_state_dict`` for exact resumes), without a model. Each epoch serves every
    cached row exactly once; after ``epochs`` epochs it raises a one-line error saying how many
    tokens the cache holds.

    Every shard's size and header (hooks, shapes, dtype) are checked when the stream is made;
    with ``verify`` its sha256 checksum is checked too, when the shard is first read.

    Data-parallel training: with ``world_size`` > 1, ``batch_size`` is the global batch and this
    process gets rows ``rank·b … (rank+1)·b`` of each, ``b = batch_size / world_size``. Every
    process reads the same shuffled rows (reading is cheap next to training), so the processes
    together train on exactly the batches of one process, and the stream's state is the same on
    all of them (:attr:`state_is_shared`).

    Example::

        stream = ActivationCacheStream("acts", ["blocks.6.hook_resid_post"], batch_size=4096)
        for batch in stream: ...   # batch["blocks.6.hook_resid_post"]: [4096, 576]
    """

    def __init__(
        self,
        cache_dir: str | Path,
        hooks: list[str] | None = None,
        *,
        batch_size: int = 4096,
        buffer_size: int = 65_536,
        seed: int = 0,
        epochs: int = 1,
        device: str | torch.device = "cpu",
        verify: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.index = read_cache_index(self.cache_dir)
        self.hooks = list(dict.fromkeys(hooks)) if hooks else list(self.index.hooks)
        missing = [h for h in self.hooks if h not in self.index.hooks]
        if missing:
            raise SaelabError(
                f"the activation cache {self.cache_dir} has no hook {', '.join(missing)}; it "
                f"holds {', '.join(self.index.hooks)} (cache the hook with `saelab cache --hook`)"
            )
        if batch_size < 1 or epochs < 1:
            raise SaelabError("batch_size and epochs of a cache stream must be at least 1")
        if not 0 <= rank < world_size or batch_size % world_size:
            raise SaelabError(
                f"a batch of {batch_size} cannot be split evenly over {world_size} processes; "
                f"choose a --batch-size divisible by {world_size}"
            )
        self.rank, self.world_size = rank, world_size
        self.scales: dict[str, float] = {h: self.index.scales[h] for h in self.hooks}
        self.batch_size = batch_size
        # Half the buffer is served between refills, so it must hold at least two batches.
        self.buffer_size = max(buffer_size, 2 * batch_size)
        self._serve_per_fill = (self.buffer_size // 2 // batch_size) * batch_size
        self.seed = seed
        self.epochs = epochs
        self.device = torch.device(device)
        self.verify = verify
        self.generator = torch.Generator().manual_seed(seed)
        for shard in self.index.shards:
            self._check_header(shard)
        self._verified: set[str] = set()
        self._orders: dict[int, list[int]] = {}
        self._buffer: dict[str, Tensor] = {}
        self._served = 0
        self._last_of_epoch = False
        self._epoch = 0
        self._shard_pos = 0
        self._row_pos = 0

    @property
    def d_in(self) -> dict[str, int]:
        return {h: self.index.d_in[h] for h in self.hooks}

    @property
    def tokens_available(self) -> int:
        """Rows this stream can serve in all: cached tokens × epochs."""
        return self.index.count * self.epochs

    def check_tokens(self, tokens: int, what: str = "training needs") -> None:
        """One-line error unless the stream can serve ``tokens`` rows (``what`` names the use)."""
        if tokens > self.tokens_available:
            raise SaelabError(self._ran_out_message(f"{what} {tokens:,}"))

    def _ran_out_message(self, need: str) -> str:
        epochs = f" ({self.epochs} epochs: {self.tokens_available:,})" if self.epochs > 1 else ""
        return (
            f"the activation cache {self.cache_dir} holds {self.index.count:,} tokens{epochs} "
            f"but {need}; cache more tokens (saelab cache --tokens), train on fewer, or raise "
            "data.activation_epochs"
        )

    # ----- shards ----------------------------------------------------------------------------

    def _shard_path(self, shard: CacheShard) -> Path:
        return self.cache_dir / shard.file

    def _check_header(self, shard: CacheShard) -> None:
        path = self._shard_path(shard)
        if not path.is_file():
            raise SaelabError(f"activation cache shard {path} is missing; {_RECREATE}")
        size = path.stat().st_size
        if size != shard.bytes:
            raise SaelabError(
                f"activation cache shard {path} has {size} bytes where {INDEX_FILENAME} records "
                f"{shard.bytes} (truncated or replaced); {_RECREATE}"
            )
        with self._open(path) as handle:
            names = set(handle.keys())
            if names != set(self.index.hooks):
                raise SaelabError(
                    f"activation cache shard {path} holds {sorted(names)} but {INDEX_FILENAME} "
                    f"lists hooks {list(self.index.hooks)}; {_RECREATE}"
                )
            expected_dtype = _SAFETENSORS_DTYPES.get(self.index.dtype)
            for hook in self.index.hooks:
                tensor = handle.get_slice(hook)
                shape, dtype = list(tensor.get_shape()), tensor.get_dtype()
                expected = [shard.count, self.index.d_in[hook]]
                if shape != expected or dtype != expected_dtype:
                    raise SaelabError(
                        f"activation cache shard {path}: {hook} is {dtype} {shape} but "
                        f"{INDEX_FILENAME} says {expected_dtype} {expected}; {_RECREATE}"
                    )

    @staticmethod
    def _open(path: Path) -> Any:
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types, or OSError
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SaelabError(
                f"activation cache shard {path} is corrupt ({reason}); {_RECREATE}"
            ) from exc

    def _read_shard(self, shard: CacheShard, start: int, stop: int) -> dict[str, Tensor]:
        path = self._shard_path(shard)
        if self.verify and shard.file not in self._verified:
            if _file_sha256(path) != shard.sha256:
                raise SaelabError(
                    f"activation cache shard {path} fails its sha256 checksum (changed or "
                    f"corrupt since it was written); {_RECREATE}"
                )
            self._verified.add(shard.file)
        with self._open(path) as handle:
            return {
                h: handle.get_slice(h)[start:stop].float().to(self.device) * self.scales[h]
                for h in self.hooks
            }

    def _shard_order(self, epoch: int) -> list[int]:
        """The epoch's shard order: a permutation drawn from (seed, epoch) alone."""
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + 1_000_003 * (epoch + 1))
            order = torch.randperm(len(self.index.shards), generator=generator).tolist()
            self._orders = {epoch: order}  # only the current epoch's order is needed again
        return self._orders[epoch]

    def _read_rows(self, n: int) -> dict[str, Tensor]:
        """Up to ``n`` normalised rows in this epoch's shard order; fewer once the epoch ends."""
        order = self._shard_order(self._epoch)
        chunks: dict[str, list[Tensor]] = {
            h: [torch.empty(0, self.index.d_in[h], device=self.device)] for h in self.hooks
        }
        got = 0
        while got < n and self._shard_pos < len(order):
            shard = self.index.shards[order[self._shard_pos]]
            m = min(n - got, shard.count - self._row_pos)
            rows = self._read_shard(shard, self._row_pos, self._row_pos + m)
            for h in self.hooks:
                chunks[h].append(rows[h])
            got += m
            self._row_pos += m
            if self._row_pos >= shard.count:
                self._shard_pos, self._row_pos = self._shard_pos + 1, 0
        return {h: torch.cat(c) for h, c in chunks.items()}

    # ----- the buffer ------------------------------------------------------------------------

    def _limit(self) -> int:
        """Buffer rows to serve before the next refill: half, or all at the end of an epoch."""
        held = self._buffer[self.hooks[0]].shape[0]
        return held if self._last_of_epoch else min(self._serve_per_fill, held)

    def _refill(self) -> None:
        if self._buffer and self._last_of_epoch:  # the epoch is fully served: start the next
            if self._epoch + 1 >= self.epochs:
                raise SaelabError(self._ran_out_message("more were asked for"))
            self._epoch, self._shard_pos, self._row_pos = self._epoch + 1, 0, 0
            self._buffer, self._served, self._last_of_epoch = {}, 0, False
        keep = {h: b[self._served :] for h, b in self._buffer.items()}
        held = keep[self.hooks[0]].shape[0] if keep else 0
        fresh = self._read_rows(self.buffer_size - held)
        if fresh[self.hooks[0]].shape[0] < self.buffer_size - held:
            self._last_of_epoch = True
        joined = {h: torch.cat([keep[h], fresh[h]]) if keep else fresh[h] for h in self.hooks}
        # One permutation for every hook: row i of each hook stays the same token.
        n = joined[self.hooks[0]].shape[0]
        perm = torch.randperm(n, generator=self.generator).to(self.device)
        self._buffer = {h: b[perm] for h, b in joined.items()}
        self._served = 0

    def _take(self, n: int) -> dict[str, Float[Tensor, "B D"]]:
        pieces: list[dict[str, Tensor]] = []
        while n > 0:
            if not self._buffer or self._served >= self._limit():
                self._refill()
            m = min(n, self._limit() - self._served)
            pieces.append({h: b[self._served : self._served + m] for h, b in self._buffer.items()})
            self._served += m
            n -= m
        if len(pieces) == 1:
            return pieces[0]
        return {h: torch.cat([p[h] for p in pieces]) for h in self.hooks}

    def __iter__(self) -> Iterator[dict[str, Float[Tensor, "B D"]]]:
        share = self.batch_size // self.world_size
        while True:
            batch = self._take(self.batch_size)
            if self.world_size > 1:
                mine = slice(self.rank * share, (self.rank + 1) * share)
                batch = {h: b[mine] for h, b in batch.items()}
            yield batch

    # ----- resume ----------------------------------------------------------------------------

    state_is_shared = True
    """Every data-parallel process holds the same state (they read the same rows), so a
    checkpoint needs only one copy of it."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "cache_id": self.index.cache_id,
            "hooks": self.hooks,
            "scales": dict(self.scales),
            "buffer": {h: b.cpu() for h, b in self._buffer.items()},
            "served": self._served,
            "last_of_epoch": self._last_of_epoch,
            "epoch": self._epoch,
            "shard_pos": self._shard_pos,
            "row_pos": self._row_pos,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("cache_id") != self.index.cache_id:
            raise SaelabError(
                f"the checkpoint was taken on another activation cache than {self.cache_dir}; "
                "resume with the same --activations folder"
            )
        if list(state["hooks"]) != self.hooks:
            raise SaelabError(
                f"checkpoint stream has hooks {state['hooks']}, this run has {self.hooks}"
            )
        self._buffer = {h: b.to(self.device) for h, b in state["buffer"].items()}
        self._served = int(state["served"])
        self._last_of_epoch = bool(state["last_of_epoch"])
        self._epoch = int(state["epoch"])
        self._shard_pos = int(state["shard_pos"])
        self._row_pos = int(state["row_pos"])
        self.generator.set_state(state["generator"])
