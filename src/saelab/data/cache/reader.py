"""Reading an activation cache: shuffled, normalised batches, epoch after epoch, resumable.

Reading goes through ``safetensors.safe_open``, which memory-maps the file and copies out only the
rows asked for. It was chosen over ``numpy.memmap`` on the raw buffer because it reads bfloat16
(numpy has no such dtype), parses and checks the header itself (no hand-written offsets), and is
equally zero-copy until a slice is taken. Rows are read in shard order, with the order of the
shards shuffled per epoch by the seed, through the shuffle buffer of :mod:`saelab.data.shuffle`
(the live stream's): memory stays at one buffer whatever the size of the cache.

Example::

    stream = ActivationCacheStream("acts", ["blocks.6.hook_resid_post"], batch_size=4096)
    batch = next(iter(stream))["blocks.6.hook_resid_post"]   # [4096, 576], normalised units
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from torch import Tensor

from saelab.data.cache.index import (
    INDEX_FILENAME,
    RECREATE,
    SAFETENSORS_DTYPES,
    CacheShard,
    file_sha256,
    read_cache_index,
)
from saelab.data.shuffle import ShuffleBuffer
from saelab.errors import SaelabError
from saelab.safetensors_check import check_safetensors


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
        self.seed = seed
        self.epochs = epochs
        self.device = torch.device(device)
        self.verify = verify
        self.buffer = ShuffleBuffer(batch_size, buffer_size, seed, self.device, kept_first=True)
        """Normalised rows waiting to be served, shuffled; at an epoch's end it serves all it
        holds (``buffer.last``) and the next epoch starts from an empty buffer."""
        for shard in self.index.shards:
            self._check_header(shard)
        self._verified: set[str] = set()
        self._orders: dict[int, list[int]] = {}
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
            raise SaelabError(f"activation cache shard {path} is missing; {RECREATE}")
        size = path.stat().st_size
        if size != shard.bytes:
            raise SaelabError(
                f"activation cache shard {path} has {size} bytes where {INDEX_FILENAME} records "
                f"{shard.bytes} (truncated or replaced); {RECREATE}"
            )
        # Parsed by saelab first: a hostile header (absurd shapes, overlapping offsets) is a
        # one-line error before safetensors maps the file.
        check_safetensors(path, fix=RECREATE)
        with self._open(path) as handle:
            names = set(handle.keys())
            if names != set(self.index.hooks):
                raise SaelabError(
                    f"activation cache shard {path} holds {sorted(names)} but {INDEX_FILENAME} "
                    f"lists hooks {list(self.index.hooks)}; {RECREATE}"
                )
            expected_dtype = SAFETENSORS_DTYPES.get(self.index.dtype)
            for hook in self.index.hooks:
                tensor = handle.get_slice(hook)
                shape, dtype = list(tensor.get_shape()), tensor.get_dtype()
                expected = [shard.count, self.index.d_in[hook]]
                if shape != expected or dtype != expected_dtype:
                    raise SaelabError(
                        f"activation cache shard {path}: {hook} is {dtype} {shape} but "
                        f"{INDEX_FILENAME} says {expected_dtype} {expected}; {RECREATE}"
                    )

    @staticmethod
    def _open(path: Path) -> Any:
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types, or OSError
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SaelabError(
                f"activation cache shard {path} is corrupt ({reason}); {RECREATE}"
            ) from exc

    def _read_shard(self, shard: CacheShard, start: int, stop: int) -> dict[str, Tensor]:
        path = self._shard_path(shard)
        if self.verify and shard.file not in self._verified:
            if file_sha256(path) != shard.sha256:
                raise SaelabError(
                    f"activation cache shard {path} fails its sha256 checksum (changed or "
                    f"corrupt since it was written); {RECREATE}"
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

    def _refill(self) -> None:
        if self.buffer.rows and self.buffer.last:  # the epoch is fully served: start the next
            if self._epoch + 1 >= self.epochs:
                raise SaelabError(self._ran_out_message("more were asked for"))
            self._epoch, self._shard_pos, self._row_pos = self._epoch + 1, 0, 0
            self.buffer.clear()
        need = self.buffer.space()
        fresh = self._read_rows(need)
        self.buffer.refill(fresh, last=fresh[self.hooks[0]].shape[0] < need)

    def _take(self, n: int) -> dict[str, Float[Tensor, "B D"]]:
        pieces: list[dict[str, Tensor]] = []
        while n > 0:
            if self.buffer.due:
                self._refill()
            pieces.append(self.buffer.take(n))
            n -= pieces[-1][self.hooks[0]].shape[0]
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
            **self.buffer.state_dict(),  # buffer, served, generator
            "last_of_epoch": self.buffer.last,
            "epoch": self._epoch,
            "shard_pos": self._shard_pos,
            "row_pos": self._row_pos,
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
        self.buffer.load_state_dict(state, last=bool(state["last_of_epoch"]))
        self._epoch = int(state["epoch"])
        self._shard_pos = int(state["shard_pos"])
        self._row_pos = int(state["row_pos"])
