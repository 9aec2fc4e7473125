"""The shuffle buffer both activation streams serve from (METHODS §7.3).

It holds rows of several hooks, aligned (row i of every hook is the same token), serves them in a
random order and is refilled when half of it has been served: the fresh rows take the served
ones' places and everything held is shuffled again, so a batch mixes tokens from many sequences
while memory stays at one buffer. One seeded generator draws every permutation, so the order is
fixed by the seed and :meth:`ShuffleBuffer.state_dict` resumes it exactly.

Example::

    buffer = ShuffleBuffer(batch_size=4096, buffer_size=65_536, seed=0)
    while True:
        if buffer.due:
            buffer.refill(read_rows(buffer.space()))   # {hook: [rows, d_in]}
        batch = buffer.take(4096)
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


def buffer_rows(batch_size: int, buffer_size: int) -> int:
    """The rows a buffer holds: ``buffer_size``, raised to two batches, because half of it is
    served between refills and that half must hold at least one whole batch."""
    return max(buffer_size, 2 * batch_size)


class ShuffleBuffer:
    """Aligned rows per hook, served shuffled; refilled when :attr:`due`."""

    def __init__(
        self,
        batch_size: int,
        buffer_size: int,
        seed: int,
        device: str | torch.device = "cpu",
        *,
        kept_first: bool = False,
    ) -> None:
        self.size = buffer_rows(batch_size, buffer_size)
        """Rows held once full."""
        self.serve_per_fill = (self.size // 2 // batch_size) * batch_size
        """Rows served between refills: whole batches, at most half the buffer."""
        self.device = torch.device(device)
        self.kept_first = kept_first
        """Join the kept rows before the fresh ones ahead of each shuffle (the cache reader's
        order) rather than after: the permutation is the same, so this decides which rows it
        picks, and each stream keeps the exact order its runs have always had."""
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: dict[str, Tensor] = {}
        """Per hook, the rows held `[held, d]`, in serving order."""
        self.served = 0
        """Rows of the current fill already served."""
        self.last = False
        """No rows follow the current fill (a stream's end): all of it is served before the next
        refill, not just half."""

    @property
    def held(self) -> int:
        return next(iter(self.rows.values())).shape[0] if self.rows else 0

    def limit(self) -> int:
        """Rows of the current fill to serve before the next refill."""
        return self.held if self.last else min(self.serve_per_fill, self.held)

    @property
    def due(self) -> bool:
        """True when nothing more may be served before a refill (or a :meth:`clear`)."""
        return not self.rows or self.served >= self.limit()

    def space(self) -> int:
        """Rows the next refill needs to fill the buffer: all of it at first, then the served."""
        return self.size - (self.held - self.served)

    def refill(self, fresh: dict[str, Float[Tensor, "N D"]], *, last: bool = False) -> None:
        """Put ``fresh`` rows (up to :meth:`space` per hook) in place of the served ones and
        shuffle everything held; ``last``: no rows will follow these."""
        kept = {h: b[self.served :] for h, b in self.rows.items()}
        if not kept:
            joined = dict(fresh)
        elif self.kept_first:
            joined = {h: torch.cat([kept[h], fresh[h]]) for h in fresh}
        else:
            joined = {h: torch.cat([fresh[h], kept[h]]) for h in fresh}
        n = next(iter(joined.values())).shape[0]
        # One permutation for every hook: row i of each hook stays the same token.
        perm = torch.randperm(n, generator=self.generator).to(self.device)
        self.rows = {h: b[perm] for h, b in joined.items()}
        self.served = 0
        self.last = last

    def take(self, n: int) -> dict[str, Float[Tensor, "M D"]]:
        """The next ``min(n, limit() - served)`` rows per hook (views into the buffer)."""
        m = max(min(n, self.limit() - self.served), 0)
        start, self.served = self.served, self.served + m
        return {h: b[start : start + m] for h, b in self.rows.items()}

    def clear(self) -> None:
        """Drop every row (a new epoch starts from an empty buffer); the generator goes on."""
        self.rows, self.served, self.last = {}, 0, False

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer": {h: b.cpu() for h, b in self.rows.items()},
            "served": self.served,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any], last: bool = False) -> None:
        self.rows = {h: b.to(self.device) for h, b in state["buffer"].items()}
        self.served = int(state["served"])
        self.generator.set_state(state["generator"])
        self.last = last
