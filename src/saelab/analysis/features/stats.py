"""The stored feature statistics: :class:`FeatureStats` with its accessors, save and load.

A statistics folder holds ``feature_stats.safetensors`` (tensors, feature ``i`` is row ``i`` of
each) and ``feature_stats.json`` (what was run, and the string of every token id stored, so
readers never need the tokenizer). Histogram bins and activation intervals are equal fractions of
each feature's envelope ``2**envelope_exp``, as :mod:`saelab.analysis.features.running` keeps them.

Example:
    >>> stats = FeatureStats.load("runs/demo/blocks.6.hook_resid_post-topk-x16-k32/features")
    >>> stats.top_examples(3)[0].tokens      # the context of feature 3's largest activation
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from saelab.atomic import write_json, write_safetensors
from saelab.errors import SaelabError
from saelab.safetensors_check import NUMBER_DTYPES, read_tensors
from saelab.signals import held_back

STATS_FILENAME = "feature_stats.safetensors"
META_FILENAME = "feature_stats.json"
DEFAULT_STATS_DIRNAME = "features"
"""Where ``saelab features`` saves an SAE's statistics by default: ``SAE_DIR/features``."""
FORMAT_VERSION = 1
HIST_BINS = 32
"""Histogram bins per feature, equal fractions of its envelope (16 to 32 of them cover [0, max])."""
QUANTILE_BUCKETS = 8
"""Activation intervals sampled per feature, equal fractions of its envelope (4 to 8 are used)."""


@dataclass(frozen=True)
class Example:
    """One context in which a feature fired."""

    tokens: list[str]
    """Decoded token strings of the context window, in order."""
    acts: list[float]
    """This feature's activation on each of those tokens (model units; 0 on unscored tokens)."""
    max_index: int
    """Index into ``tokens`` of the token the example is ranked by."""
    value: float
    """Activation at ``max_index``."""
    sequence: int
    """Sequence id in the run (row of the stored token ids)."""
    position: int
    """Position of ``tokens[max_index]`` in that sequence."""


_TENSOR_NAMES = (
    "feature_ids",
    "fired",
    "act_sum",
    "max_act",
    "envelope_exp",
    "hist",
    "top_value",
    "top_seq",
    "top_pos",
    "top_acts",
    "q_value",
    "q_seq",
    "q_pos",
    "q_acts",
    "tokens",
    "logit_pos_ids",
    "logit_pos",
    "logit_neg_ids",
    "logit_neg",
)


class FeatureStats:
    """Per-feature statistics of one SAE over a corpus; save/load as safetensors + JSON.

    Feature ``i`` is row ``i`` of every tensor; it is SAE feature ``feature_ids[i]`` (the same
    unless a ``features`` slice was computed).

    >>> stats = FeatureStats.load("runs/demo-features")
    >>> ex = stats.top_examples(3)[0]; "".join(ex.tokens), ex.value
    >>> promoted, suppressed = stats.logit_effects(3)
    >>> from saelab.analysis.dashboard import feature_fragment
    >>> HTML(feature_fragment(stats, 3))     # in Jupyter: feature 3 as the dashboard shows it
    """

    def __init__(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.tensors = tensors
        self.meta = meta
        self.vocab: dict[int, str] = {int(k): v for k, v in meta.get("vocab", {}).items()}
        self.n_tokens: int = int(meta["n_tokens"])
        self.feature_ids: Tensor = tensors["feature_ids"]
        self.n_features: int = len(self.feature_ids)
        fired_F = tensors["fired"]
        self.fired: Tensor = fired_F
        self.density: Tensor = fired_F.double() / max(self.n_tokens, 1)
        self.mean_act: Tensor = tensors["act_sum"] / fired_F.clamp_min(1).double()
        self.max_act: Tensor = tensors["max_act"]
        self.tokens: Tensor = tensors["tokens"]
        self.window: tuple[int, int] = tuple(meta["window"])  # type: ignore[assignment]

    def _check(self, i: int) -> int:
        if not -self.n_features <= i < self.n_features:
            raise SaelabError(
                f"feature {i} is out of range; pass 0..{self.n_features - 1} (rows of these "
                "statistics)"
            )
        return i % self.n_features

    def _token(self, token_id: int) -> str:
        return self.vocab.get(token_id, f"<{token_id}>")

    def histogram(self, i: int) -> tuple[list[float], list[int]]:
        """Bin edges (``B + 1``) and counts (``B``) of feature ``i``'s non-zero activations:
        ``B`` ≤ 32 equal bins from 0 up to the bin holding its max (``([0.0], [])`` if it never
        fired). Counts add up to the number of tokens it fired on."""
        i = self._check(i)
        if int(self.fired[i]) == 0:
            return [0.0], []
        counts = self.tensors["hist"][i].tolist()
        used = max(j for j, c in enumerate(counts) if c) + 1
        width = 2.0 ** int(self.tensors["envelope_exp"][i]) / HIST_BINS
        return [j * width for j in range(used + 1)], counts[:used]

    def _example(self, i: int, prefix: str, index: tuple[int, ...]) -> Example | None:
        seq = int(self.tensors[f"{prefix}_seq"][(i, *index)])
        if seq < 0:
            return None
        pos = int(self.tensors[f"{prefix}_pos"][(i, *index)])
        acts_W = self.tensors[f"{prefix}_acts"][(i, *index)]
        before, _ = self.window
        P = self.tokens.shape[1]
        start, stop = max(0, pos - before), min(P, pos + len(acts_W) - before)
        ids = self.tokens[seq, start:stop].tolist()
        acts = acts_W[start - (pos - before) : stop - (pos - before)].tolist()
        return Example(
            tokens=[self._token(t) for t in ids],
            acts=acts,
            max_index=pos - start,
            value=float(self.tensors[f"{prefix}_value"][(i, *index)]),
            sequence=seq,
            position=pos,
        )

    def top_examples(self, i: int, n: int | None = None) -> list[Example]:
        """Feature ``i``'s largest activations with their contexts, largest first."""
        i = self._check(i)
        K = self.tensors["top_value"].shape[1]
        examples = [self._example(i, "top", (k,)) for k in range(K if n is None else min(n, K))]
        return [e for e in examples if e is not None]

    def quantile_examples(self, i: int) -> list[tuple[str, list[Example]]]:
        """Random examples from each activation interval feature ``i`` fired in, highest interval
        first: ``[(label, examples), ...]``, labels such as ``"0.38–0.50 of max (12.5%)"`` (the
        share of its firings that fell in the interval); examples largest first."""
        i = self._check(i)
        if int(self.fired[i]) == 0:
            return []
        per = HIST_BINS // QUANTILE_BUCKETS
        envelope = 2.0 ** int(self.tensors["envelope_exp"][i])
        top = float(self.max_act[i])
        counts = self.tensors["hist"][i].view(QUANTILE_BUCKETS, per).sum(1).tolist()
        n = self.tensors["q_value"].shape[2]
        groups = []
        for b in reversed(range(QUANTILE_BUCKETS)):
            if not counts[b]:
                continue
            lo, hi = (
                b * envelope / QUANTILE_BUCKETS,
                min((b + 1) * envelope / QUANTILE_BUCKETS, top),
            )
            share = counts[b] / int(self.fired[i])
            label = f"{lo / top:.2f}–{hi / top:.2f} of max ({share:.1%})"
            found = [self._example(i, "q", (b, j)) for j in range(n)]
            examples = sorted((e for e in found if e is not None), key=lambda e: -e.value)
            groups.append((label, examples))
        return groups

    def logit_effects(
        self, i: int, n: int = 10
    ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """Tokens whose logits feature ``i``'s decoder direction raises most (largest first) and
        lowers most (most negative first), with the effect per unit activation; empty when the
        SAE does not write to the residual stream."""
        i = self._check(i)
        out = []
        for side in ("pos", "neg"):
            ids = self.tensors[f"logit_{side}_ids"][i, :n].tolist()
            values = self.tensors[f"logit_{side}"][i, :n].tolist()
            out.append([(self._token(t), float(v)) for t, v in zip(ids, values, strict=True)])
        return out[0], out[1]

    def summary(self) -> dict[str, float]:
        """``frac_dead`` (never fired in these tokens), mean and median density, mean L0."""
        return {
            "n_features": self.n_features,
            "n_tokens": self.n_tokens,
            "frac_dead": float((self.fired == 0).double().mean()),
            "mean_density": float(self.density.mean()),
            "median_density": float(self.density.median()),
            "mean_l0": float(self.fired.sum()) / max(self.n_tokens, 1),
        }

    def _repr_html_(self) -> str:
        """Jupyter's view of the statistics: a table of the run and :meth:`summary`. One
        feature's HTML is ``saelab.analysis.dashboard.feature_fragment(stats, i)``."""
        rows = {
            "model": self.meta.get("model"),
            "hook": self.meta.get("hook"),
            "SAE": self.meta.get("sae_dir"),
            "architecture": self.meta.get("architecture"),
            **{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in self.summary().items()},
            "context": self.meta.get("context"),
        }
        body = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in rows.items()
        )
        return f"<table><caption>FeatureStats</caption>{body}</table>"

    def __repr__(self) -> str:
        return (
            f"FeatureStats({self.n_features} features, {self.n_tokens} tokens, "
            f"hook={self.meta.get('hook')!r})"
        )

    # ----- files

    def save(self, directory: str | Path) -> Path:
        """Write ``feature_stats.safetensors`` then ``feature_stats.json`` (last: a folder with
        the JSON is complete), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with held_back():  # a signal waits for both: no new tensors under old metadata
            write_safetensors(directory / STATS_FILENAME, self.tensors)
            write_json(directory / META_FILENAME, self.meta)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> FeatureStats:
        """Statistics saved by :meth:`save` (no model or tokenizer needed)."""
        directory = Path(directory)
        redo = "rerun saelab features SAE_DIR --out DIR to write them again"
        meta_path, stats_path = directory / META_FILENAME, directory / STATS_FILENAME
        for path in (meta_path, stats_path):
            if not path.is_file():
                raise SaelabError(f"{path} is missing; {redo}")
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict) or "n_tokens" not in meta or "window" not in meta:
                raise ValueError("not a feature statistics file")
        except (ValueError, UnicodeDecodeError) as exc:
            raise SaelabError(f"{meta_path} is corrupt ({_first_line(exc)}); {redo}") from exc
        # The header is checked before any tensor is read: a hostile one is a one-line error.
        tensors = read_tensors(stats_path, fix=redo, dtypes=NUMBER_DTYPES)
        missing = [name for name in _TENSOR_NAMES if name not in tensors]
        if missing:
            raise SaelabError(f"{stats_path} lacks tensors {missing}; {redo}")
        n = len(tensors["feature_ids"]) if tensors["feature_ids"].ndim else -1
        wrong = [k for k in _TENSOR_NAMES if k != "tokens" and tensors[k].shape[:1] != (n,)]
        if wrong:
            raise SaelabError(f"{stats_path} has tensors {wrong} not of {n} features; {redo}")
        return cls(tensors, meta)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
