"""The progress record of an unfinished cache, and the checks a writer makes before going on.

``progress.json`` (rewritten after every shard) records the arguments, the shards written with
their checksums, the text position, the running sums of the scales and a
``pending_NNNNN.safetensors`` file of rows read but not yet in a shard. A resume checks that the
arguments are the same and every recorded file is intact, then goes on from there.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from saelab.data.cache.arguments import CacheArguments
from saelab.data.cache.index import FORMAT_VERSION, INDEX_FILENAME, CacheShard, file_sha256
from saelab.errors import SaelabError
from saelab.safetensors_check import read_tensors
from saelab.signals import Interrupted, is_accounted_for, signal_of

log = logging.getLogger(__name__)

RECREATE_PENDING = "delete the folder and cache again, or choose another --out"
"""What to do about a damaged pending-rows file: it cannot be repaired, only written again."""

PROGRESS_FILENAME = "progress.json"
PROGRESS_FORMAT = "saelab-activation-cache-progress"
PENDING_PATTERN = "pending_{:05d}.safetensors"
PENDING_GLOB = "pending_*.safetensors"


@dataclass
class CacheProgress:
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
    def read(cls, path: Path) -> CacheProgress:
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


def check_folder(out_dir: Path, arguments: CacheArguments, resume: bool) -> CacheProgress | None:
    """What ``out_dir`` holds, checked before any model is loaded: the progress to resume from,
    or None to start afresh. Checksums are checked later, by :func:`verify_written`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SaelabError(f"--out {out_dir} is a file; pass a folder for the cache")
    if (out_dir / INDEX_FILENAME).exists():
        # A writer killed between writing index.json and dropping its progress record leaves
        # that record beside a complete cache: nothing reads it, so it goes.
        if leftover := progress_files(out_dir):
            for path in leftover:
                path.unlink()
            log.warning(
                "removed the progress record of an interrupted saelab cache run in %s "
                "(the cache itself is complete)",
                out_dir,
            )
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
    progress = CacheProgress.read(path)
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


def verify_written(out_dir: Path, progress: CacheProgress) -> None:
    """Every file the progress record names must be there with its recorded checksum. A damaged
    shard is an error, not rewritten: the state to recompute it from is gone (it is only kept for
    the last shard), and damage after an atomic write means something else touched the folder."""
    for entry in [*progress.shards, *([progress.pending] if progress.pending else [])]:
        path = out_dir / entry.file
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != entry.bytes or file_sha256(path) != entry.sha256:
            problem = "fails its sha256 checksum (changed or corrupt since it was written)"
        else:
            continue
        raise SaelabError(
            f"cannot resume: {path} {problem}; delete {out_dir} and cache again, or choose "
            "another --out"
        )


def clear_incomplete(out_dir: Path) -> None:
    """Remove what a writer without a progress record left (it cannot be resumed), and temp
    files a killed writer could not remove."""
    stale = sorted(out_dir.glob("shard_*.safetensors"))
    if stale:
        log.info("removing %d shard(s) of an unfinished cache in %s", len(stale), out_dir)
    for path in [*stale, *progress_files(out_dir), *temp_files(out_dir)]:
        path.unlink()


def progress_files(out_dir: Path) -> list[Path]:
    return [p for p in [out_dir / PROGRESS_FILENAME] if p.is_file()] + sorted(
        out_dir.glob(PENDING_GLOB)
    )


def temp_files(out_dir: Path) -> list[Path]:
    """Temp files of :func:`write_atomically` for this writer's files (a killed writer's)."""
    names = (".shard_*.tmp", f".{PENDING_GLOB}.*.tmp", ".*.json.*.tmp")
    return sorted({p for pattern in names for p in out_dir.glob(pattern)})


def load_pending(
    out_dir: Path, progress: CacheProgress, d_in: dict[str, int]
) -> dict[str, list[Tensor]]:
    """The rows read but not yet written when the progress was recorded, in the stored dtype."""
    if progress.pending is None:
        return {h: [] for h in d_in}
    path = out_dir / progress.pending.file
    rows = read_tensors(path, fix=RECREATE_PENDING)
    for h, d in d_in.items():
        if h not in rows or rows[h].shape[1:] != (d,):
            raise SaelabError(
                f"cannot resume: {path} does not hold [rows, {d}] rows of {h} (was another model "
                "used?); delete the folder and cache again, or choose another --out"
            )
    return {h: [rows[h]] for h in d_in}


@contextlib.contextmanager
def interruptions_reported(out_dir: Path, tokens: int) -> Iterator[None]:
    """Within the block an interruption becomes :class:`Interrupted` saying what the progress
    record on disk keeps (the shards written are safe, ``--resume`` goes on after them), or
    that there is nothing to resume before the first shard."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if is_accounted_for(exc):
            raise
        path = out_dir / PROGRESS_FILENAME
        if not path.is_file():
            raise Interrupted(
                f"interrupted before the first shard of {out_dir} was written; there is "
                "nothing to resume",
                signum=signal_of(exc),
            ) from None
        progress = CacheProgress.read(path)
        rows = sum(s.count for s in progress.shards)
        rows += progress.pending.count if progress.pending else 0
        raise Interrupted(
            f"interrupted with {len(progress.shards)} shard(s) and {rows:,} of {tokens:,} "
            f"tokens safe in {out_dir}",
            resumable=True,
            signum=signal_of(exc),
        ) from None
