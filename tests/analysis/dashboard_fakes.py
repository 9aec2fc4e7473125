"""A hand-made stand-in for ``FeatureStats`` with the same attributes and methods, so the
dashboard's rendering and site code can be tested in milliseconds, with known values."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

EVIL = "<script>window.__pwned=1</script>"
"""A token that would run if it reached a page unescaped."""
EVIL_ATTR = '" onmouseover="window.__pwned=1" x="'
"""A token that would add an attribute if it reached a quoted attribute unescaped."""


@dataclass(frozen=True)
class FakeExample:
    tokens: list[str]
    acts: list[float]
    max_index: int
    value: float
    sequence: int
    position: int


@dataclass
class FakeStats:
    """``n`` features; feature ``i`` fires ``i + 1`` times with value ``i + 1`` at its examples'
    position 2, except the ``dead`` ones. Every context holds the two hostile tokens."""

    n: int = 5
    dead: tuple[int, ...] = (3,)
    meta: dict = field(default_factory=lambda: {"model": f"tiny {EVIL}", "hook": "blocks.0.x"})
    n_tokens: int = 1000

    @property
    def n_features(self) -> int:
        return self.n

    @property
    def feature_ids(self) -> torch.Tensor:
        return torch.arange(self.n)

    @property
    def density(self) -> torch.Tensor:
        d = torch.tensor([(i + 1) / self.n_tokens for i in range(self.n)])
        d[[i for i in self.dead if i < self.n]] = 0
        return d

    @property
    def max_act(self) -> torch.Tensor:
        m = torch.arange(1, self.n + 1, dtype=torch.float32)
        m[[i for i in self.dead if i < self.n]] = 0
        return m

    @property
    def mean_act(self) -> torch.Tensor:
        return self.max_act / 2

    def histogram(self, i: int) -> tuple[list[float], list[int]]:
        edges = [k * (i + 1) / 8 for k in range(9)]
        return edges, [k * (i % 3) for k in range(8)]

    def top_examples(self, i: int, n: int | None = None) -> list[FakeExample]:
        if i in self.dead:
            return []
        out = []
        for j in range(min(i + 1, n or 99)):
            value = float(i + 1) - j * 0.25
            tokens = [f" w{i}", "\n", EVIL, EVIL_ATTR, f" tok{i}_{j}", " "]
            acts = [0.0, value / 2, value, 0.0, 0.0, 0.0]
            out.append(FakeExample(tokens, acts, 2, value, j, 2))
        return out

    def quantile_examples(self, i: int) -> list[tuple[str, list[FakeExample]]]:
        top = self.top_examples(i)
        return [("upper half", top[:1]), ("lower half", top[1:2])]

    def logit_effects(
        self, i: int, n: int = 10
    ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        return [(" up", 1.5), (EVIL, 1.0)], [(" down", -2.0)]
