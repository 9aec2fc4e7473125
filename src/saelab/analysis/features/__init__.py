"""Per-feature statistics of an SAE over a corpus (METHODS §6.3), computed in one pass.

``saelab features SAE_DIR`` (or :func:`compute_feature_stats`) runs packed, BOS-prefixed sequences
through the model up to the SAE's hook (the forward pass stops there), encodes the scored tokens
and folds every batch into running statistics whose size depends on the number of features F,
never on the number of tokens:

* fired counts, activation sums and maxima ``[F]`` → density, mean and max activation;
* a 32-bin histogram ``[F, 32]`` of the non-zero activations;
* the top-K examples ``[F, K]`` (value, sequence, position, and the feature's activations on the
  context window around the token), merged with ``torch.topk`` after every batch;
* random examples from 8 activation intervals ``[F, 8, n]`` (reservoir sampling with random
  priority keys, merged the same way);
* logit effects: each decoder direction through the final norm's gain and the unembedding.

Bins without a second pass: every feature has an *envelope* ``M = 2**e``, the smallest power of
two above its running max (``max < M ≤ 2·max``). Histogram bins and quantile intervals are equal
fractions of ``M``. When a batch raises a feature's max past ``M``, ``M`` doubles (once or more)
and every bin merges with its neighbour: bin ``j`` of the old envelope is exactly part of bin
``j >> shift`` of the new one, so counts add up exactly, and a reservoir of the merged interval is
the ``n`` largest keys of the merged reservoirs, which is still a uniform sample of that interval
(every firing drew an independent key, so the top ``n`` keys of a union are a uniform sample of
it). At the end ``M`` is within a factor 2 of the max, so 16 to 32 histogram bins and 4 to 8
quantile intervals cover ``[0, max]``. Labels give the interval as fractions of the true max.

Context windows are gathered while the examples enter the top-K or a reservoir, from the very
activations they were ranked by, so a window's activation at its ranked token equals the
example's value exactly, with no second model pass. Position 0 (BOS) and special tokens are never
scored: they count nowhere, are never examples, and show activation 0 inside windows.

Everything is saved as ``feature_stats.safetensors`` (tensors) and ``feature_stats.json`` (what
was run, and the strings of every token id stored, so readers never need the tokenizer).

>>> stats = compute_feature_stats("runs/demo/blocks.6.hook_resid_post-topk-x16-k32", tokens=50_000)
>>> stats.top_examples(3)[0].tokens                # the context of feature 3's largest activation
>>> stats.logit_effects(3)                         # (promoted, suppressed) tokens
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab import __version__
from saelab.atomic import write_json, write_safetensors
from saelab.data.activations import special_token_ids, token_mask
from saelab.data.text import TokenBatches
from saelab.errors import SaelabError
from saelab.models.hookpoints import hook_dim
from saelab.models.intervene import run_to_hooks
from saelab.models.loading import load_model
from saelab.saes.base import SparseAutoencoder
from saelab.saes.storage import load_sae

log = logging.getLogger(__name__)

STATS_FILENAME = "feature_stats.safetensors"
META_FILENAME = "feature_stats.json"
FORMAT_VERSION = 1
HIST_BINS = 32
"""Histogram bins per feature, equal fractions of its envelope (16 to 32 of them cover [0, max])."""
QUANTILE_BUCKETS = 8
"""Activation intervals sampled per feature, equal fractions of its envelope (4 to 8 are used)."""
SKIP_POSITIONS = 1
"""Leading positions never scored: position 0 holds BOS, the attention-sink outlier (§7.1)."""
DENSE_BUDGET = 2**25
"""Floats in one dense ``[tokens, d_sae]`` block of feature activations (128 MiB)."""
LOGIT_CHUNK = 256
"""Features whose logit effects ``[chunk, vocab]`` are computed at once."""

_NEVER = -(2**40)  # envelope exponent of a feature that has not fired yet
_MAX_SHIFT = 62  # shifting an int64 bin index by more is undefined; 62 already empties it


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


# ---------------------------------------------------------------- running statistics


def _top_n_per_group(
    group_E: Int[Tensor, " E"], key_E: Float[Tensor, " E"], n: int
) -> tuple[Int[Tensor, " S"], Int[Tensor, " S"], Int[Tensor, " S"]]:
    """The entries with the ``n`` largest keys of each group: (entry indices, their group,
    their rank 0..n-1 within it), grouped in ascending group order."""
    order_E = torch.argsort(key_E, descending=True, stable=True)
    order_E = order_E[torch.argsort(group_E[order_E], stable=True)]
    sorted_E = group_E[order_E]
    rank_E = torch.arange(len(sorted_E), device=group_E.device) - torch.searchsorted(
        sorted_E, sorted_E
    )
    keep_E = rank_E < n
    return order_E[keep_E], sorted_E[keep_E], rank_E[keep_E]


class _Slots:
    """Kept examples ``[G, n]`` (value, sequence, position, window acts ``[G, n, W]``) plus the
    key they are ranked by: the value itself for top-K, a random priority for reservoirs."""

    def __init__(self, groups: int, n: int, width: int, device: torch.device) -> None:
        self.key = torch.full((groups, n), -1.0, device=device)
        self.value = torch.zeros(groups, n, device=device)
        self.seq = torch.full((groups, n), -1, dtype=torch.int64, device=device)
        self.pos = torch.full((groups, n), -1, dtype=torch.int64, device=device)
        self.acts = torch.zeros(groups, n, width, device=device)

    def fields(self) -> tuple[Tensor, ...]:
        return self.key, self.value, self.seq, self.pos, self.acts

    def merge_(self, rows: Tensor, new: tuple[Tensor, ...]) -> None:
        """Keep, in each of ``rows``, the ``n`` largest keys among the slots there and ``new``
        (the same fields, ``[len(rows), m]``)."""
        n = self.key.shape[1]
        joined = [
            torch.cat([old[rows], add], dim=1) for old, add in zip(self.fields(), new, strict=True)
        ]
        # A stable sort, not topk: on equal keys the slot held longer (an earlier sequence)
        # stays, on every device alike.
        pick_RN = joined[0].sort(dim=1, descending=True, stable=True).indices[:, :n]
        for old, both in zip(self.fields(), joined, strict=True):
            index = pick_RN if both.ndim == 2 else pick_RN[..., None].expand(-1, -1, both.shape[2])
            old[rows] = both.gather(1, index)


class _RunningStats:
    """Everything :func:`compute_feature_stats` accumulates, as tensors on one device."""

    def __init__(
        self,
        n_features: int,
        *,
        top_k: int,
        n_quantile: int,
        window: tuple[int, int],
        device: torch.device,
        seed: int,
    ) -> None:
        F, Q = n_features, QUANTILE_BUCKETS
        before, after = window
        self.offsets_W = torch.arange(-before, after + 1, device=device)
        W = len(self.offsets_W)
        self.fired_F = torch.zeros(F, dtype=torch.int64, device=device)
        self.sum_F = torch.zeros(F, dtype=torch.float64, device=device)
        self.max_F = torch.zeros(F, device=device)
        self.exp_F = torch.full((F,), _NEVER, dtype=torch.int64, device=device)
        self.hist_FH = torch.zeros(F, HIST_BINS, dtype=torch.int64, device=device)
        self.top = _Slots(F, top_k, W, device)
        self.quantiles = _Slots(F * Q, n_quantile, W, device)  # row f * Q + interval
        self.generator = torch.Generator().manual_seed(seed)
        self.n_tokens = 0
        self.n_fired = 0

    @torch.no_grad()
    def update_(self, acts_NPF: Float[Tensor, "N P F"], n_scored: int, first_seq: int) -> None:
        """Fold in feature activations of ``N`` whole sequences (zero where not scored).

        Everything but the windows works on the firings alone (token, feature, value), which
        are ~L0 per token instead of F: dense reductions over ``[tokens, F]`` cost more than the
        model's forward pass at 10k+ features.
        """
        N, P, F = acts_NPF.shape
        acts_TF = acts_NPF.reshape(N * P, F)
        tok_E, feat_E = (acts_TF > 0).nonzero(as_tuple=True)
        value_E = acts_TF[tok_E, feat_E]
        self.n_tokens += n_scored
        self.n_fired += len(value_E)
        self.fired_F += torch.bincount(feat_E, minlength=F)
        self.sum_F.index_add_(0, feat_E, value_E.double())
        batch_max_F = torch.zeros_like(self.max_F).scatter_reduce_(0, feat_E, value_E, "amax")
        self.max_F = torch.maximum(self.max_F, batch_max_F)
        self._grow_envelopes_(batch_max_F)
        # Activation as a fraction of the envelope, in [0, 1); powers of two scale exactly.
        frac_E = value_E * torch.exp2(-self.exp_F[feat_E].double()).float()
        bin_E = (frac_E * HIST_BINS).long().clamp_(0, HIST_BINS - 1)
        self.hist_FH.view(-1).index_add_(
            0, feat_E * HIST_BINS + bin_E, torch.ones_like(bin_E, dtype=torch.int64)
        )
        firings = (acts_TF, tok_E, feat_E, value_E, P, first_seq)
        self._offer_(self.top, feat_E, value_E, firings)
        interval_E = (frac_E * QUANTILE_BUCKETS).long().clamp_(0, QUANTILE_BUCKETS - 1)
        key_E = torch.rand(len(tok_E), generator=self.generator).to(acts_TF.device)
        self._offer_(self.quantiles, feat_E * QUANTILE_BUCKETS + interval_E, key_E, firings)

    def _offer_(self, slots: _Slots, group_E: Tensor, key_E: Tensor, firings: tuple) -> None:
        """Let every firing compete, by ``key_E``, for a slot of its group (row of ``slots``)."""
        acts_TF, tok_E, feat_E, value_E, P, first_seq = firings
        if len(tok_E) == 0:
            return
        # Only the batch's n best keys per group can enter; their windows are gathered now,
        # from the activations they were ranked by.
        src_S, group_S, rank_S = _top_n_per_group(group_E, key_E, slots.key.shape[1])
        rows_U, slot_S = torch.unique_consecutive(group_S, return_inverse=True)
        new = _Slots(len(rows_U), slots.key.shape[1], len(self.offsets_W), acts_TF.device)
        tok_S = tok_E[src_S]
        new.key[slot_S, rank_S] = key_E[src_S]
        new.value[slot_S, rank_S] = value_E[src_S]
        new.seq[slot_S, rank_S] = first_seq + tok_S // P
        new.pos[slot_S, rank_S] = tok_S % P
        new.acts[slot_S, rank_S] = self._windows(acts_TF, tok_S, feat_E[src_S], P)
        slots.merge_(rows_U, new.fields())

    def _windows(
        self, acts_TF: Tensor, tok_E: Tensor, feat_E: Tensor, P: int
    ) -> Float[Tensor, "E W"]:
        """Each entry's feature activations on its window, NaN outside its sequence."""
        pos_E = tok_E % P
        pos_EW = pos_E[:, None] + self.offsets_W
        inside_EW = (pos_EW >= 0) & (pos_EW < P)
        rows_EW = (tok_E - pos_E)[:, None] + pos_EW.clamp(0, P - 1)
        return acts_TF[rows_EW, feat_E[:, None]].masked_fill(~inside_EW, math.nan)

    def _grow_envelopes_(self, batch_max_F: Tensor) -> None:
        """Raise each envelope above the batch's max, merging bins and reservoirs to match."""
        _, exp_F = torch.frexp(batch_max_F)  # batch_max < 2**exp
        new_F = torch.where(batch_max_F > 0, torch.maximum(self.exp_F, exp_F.long()), self.exp_F)
        shift_F = new_F - self.exp_F
        grow_F = (shift_F > 0) & (self.exp_F != _NEVER)  # never fired: nothing to merge
        if grow_F.any():
            rows_R = grow_F.nonzero().squeeze(1)
            shift_R = shift_F[rows_R].clamp(max=_MAX_SHIFT)
            self._coarsen_histograms_(rows_R, shift_R)
            self._coarsen_reservoirs_(rows_R, shift_R)
        self.exp_F = new_F

    def _coarsen_histograms_(self, rows_R: Tensor, shift_R: Tensor) -> None:
        bins_H = torch.arange(HIST_BINS, device=rows_R.device)
        target_RH = bins_H[None] >> shift_R[:, None]
        merged_RH = torch.zeros_like(self.hist_FH[rows_R]).scatter_add_(
            1, target_RH, self.hist_FH[rows_R]
        )
        self.hist_FH[rows_R] = merged_RH

    def _coarsen_reservoirs_(self, rows_R: Tensor, shift_R: Tensor) -> None:
        Q, device = QUANTILE_BUCKETS, rows_R.device
        n = self.quantiles.key.shape[1]
        slots_RQ = (rows_R[:, None] * Q + torch.arange(Q, device=device)).reshape(-1)
        old = [field[slots_RQ] for field in self.quantiles.fields()]  # [R*Q, n, ...]
        target_RQ = torch.arange(Q, device=device)[None] >> shift_R[:, None]
        group_RQN = (rows_R[:, None] * Q + target_RQ)[..., None].expand(-1, -1, n).reshape(-1)
        key_E = old[0].reshape(-1)
        valid_E = (key_E >= 0).nonzero().squeeze(1)
        src_S, group_S, rank_S = _top_n_per_group(group_RQN[valid_E], key_E[valid_E], n)
        src_S = valid_E[src_S]
        merged = _Slots(len(slots_RQ), n, old[4].shape[-1], device)
        # Merged slots land in the row of their (feature, new interval); rows_R is sorted, so
        # slot row = position of that group within slots_RQ.
        dest_S = torch.searchsorted(slots_RQ, group_S)
        for target, source in zip(merged.fields(), old, strict=True):
            flat = source.reshape(-1, *source.shape[2:])
            target[dest_S, rank_S] = flat[src_S]
        for field, value in zip(self.quantiles.fields(), merged.fields(), strict=True):
            field[slots_RQ] = value


# ---------------------------------------------------------------- logit effects


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied to the residual stream before the unembedding: the last direct child of
    the base model whose class name ends in ``Norm`` (``ln_f``, ``norm``, ``final_layer_norm``)."""
    base = getattr(model, "base_model", model)
    norms = [m for m in base.children() if type(m).__name__.endswith("Norm")]
    return norms[-1] if norms else None


def norm_gain(norm: nn.Module, d: int) -> Float[Tensor, " D"]:
    """The norm's elementwise gain, measured by running it: on a ±1 probe (mean 0, RMS 1) every
    LayerNorm / RMSNorm variant (Gemma's ``1 + w`` included) returns ``gain · probe + bias``, up to
    a factor ``1/sqrt(1 + eps)``; the bias cancels between the probe and its negative."""
    param = next(norm.parameters(), None)
    probe_D = torch.ones(d, device=param.device if param is not None else "cpu")
    probe_D[1::2] = -1
    probe_D = probe_D.to(param.dtype if param is not None else torch.float32)
    with torch.no_grad():
        gain_D = (norm(probe_D[None]) - norm(-probe_D[None]))[0] / 2 * probe_D
    return gain_D.float()


@torch.no_grad()
def logit_effects_of(
    directions_FD: Float[Tensor, "F D"], model: nn.Module, n: int
) -> dict[str, Tensor] | None:
    """Top ``n`` promoted and suppressed tokens of each direction written to the residual stream.

    Effect = ``W_U (g ⊙ c(d))``, ``g`` the final norm's gain and ``c`` its centring (LayerNorm
    only). The norm's division by each token's own scale is left out: it is positive and the same
    for every vocabulary entry, so the ranking is exact and values are logits per unit of
    activation at unit residual norm. Biases and Gemma2's final soft-capping (monotone) are
    ignored. ``None`` when the directions do not live in the unembedding's input space.
    """
    unembed = model.get_output_embeddings()
    if unembed is None or unembed.weight.shape[1] != directions_FD.shape[1]:
        return None
    W_VD = unembed.weight.detach().float()
    dirs_FD = directions_FD.detach().float().to(W_VD.device)
    norm = final_norm(model)
    if norm is not None:
        if isinstance(norm, nn.LayerNorm):
            dirs_FD = dirs_FD - dirs_FD.mean(-1, keepdim=True)
        dirs_FD = dirs_FD * norm_gain(norm, dirs_FD.shape[1]).to(W_VD.device)
    n = min(n, W_VD.shape[0])
    parts: dict[str, list[Tensor]] = {k: [] for k in ("pos_ids", "pos", "neg_ids", "neg")}
    for start in range(0, len(dirs_FD), LOGIT_CHUNK):
        effect_CV = dirs_FD[start : start + LOGIT_CHUNK] @ W_VD.T
        top, top_ids = effect_CV.topk(n, dim=1)
        low, low_ids = effect_CV.topk(n, dim=1, largest=False)
        for key, value in zip(parts, (top_ids, top, low_ids, low), strict=True):
            parts[key].append(value.cpu())
    out = {f"logit_{k}": torch.cat(v) for k, v in parts.items()}
    out["logit_pos_ids"] = out["logit_pos_ids"].int()
    out["logit_neg_ids"] = out["logit_neg_ids"].int()
    return out


# ---------------------------------------------------------------- the statistics


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

    def feature_html(self, i: int) -> str:
        """An HTML fragment for feature ``i``: the dashboard's, when it is installed."""
        try:
            from saelab.analysis.dashboard.render import feature_fragment
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("saelab.analysis.dashboard"):
                raise
            return self._plain_html(i)
        return feature_fragment(self, i)

    def _plain_html(self, i: int) -> str:
        i = self._check(i)
        esc = html.escape

        def context(e: Example) -> str:
            cells = [
                f'<span title="{a:.3g}" style="background:rgba(255,120,0,'
                f'{0 if a != a else max(0.0, min(1.0, a / max(e.value, 1e-12))):.2f})">'
                f"{'<b>' if j == e.max_index else ''}{esc(t)}{'</b>' if j == e.max_index else ''}"
                "</span>"
                for j, (t, a) in enumerate(zip(e.tokens, e.acts, strict=True))
            ]
            return f"<li><code>{e.value:.3g}</code> {''.join(cells)}</li>"

        promoted, suppressed = self.logit_effects(i)
        logits = "".join(
            f"<tr><td>{esc(a)}</td><td>{x:+.3g}</td><td>{esc(b)}</td><td>{y:+.3g}</td></tr>"
            for (a, x), (b, y) in zip(promoted, suppressed, strict=False)
        )
        return (
            f"<div><h3>feature {int(self.feature_ids[i])}</h3>"
            f"<p>density {float(self.density[i]):.3g}, mean {float(self.mean_act[i]):.3g}, "
            f"max {float(self.max_act[i]):.3g}</p>"
            f"<ol>{''.join(context(e) for e in self.top_examples(i, 10))}</ol>"
            f"<table><tr><th>promoted</th><th></th><th>suppressed</th><th></th></tr>{logits}"
            "</table></div>"
        )

    def _repr_html_(self) -> str:
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
        try:
            with safe_open(str(stats_path), framework="pt", device="cpu") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types, or OSError
            raise SaelabError(f"{stats_path} is corrupt ({_first_line(exc)}); {redo}") from exc
        missing = [name for name in _TENSOR_NAMES if name not in tensors]
        if missing:
            raise SaelabError(f"{stats_path} lacks tensors {missing}; {redo}")
        n = len(tensors["feature_ids"])
        wrong = [k for k in _TENSOR_NAMES if k != "tokens" and tensors[k].shape[0] != n]
        if wrong:
            raise SaelabError(f"{stats_path} has tensors {wrong} not of {n} features; {redo}")
        return cls(tensors, meta)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- computing them


def _decode_vocab(tokenizer: Any, ids: list[int]) -> dict[str, str]:
    """Each id's string as it reads in text (``" the"``); the raw token where one id alone is
    an incomplete UTF-8 sequence."""
    texts = tokenizer.batch_decode(
        [[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    raw = tokenizer.convert_ids_to_tokens(ids)
    return {
        str(i): (r if "\ufffd" in t and r is not None else t)
        for i, t, r in zip(ids, texts, raw, strict=True)
    }


def _resolve_inputs(
    sae_dir_or_sae: str | Path | SparseAutoencoder,
    model: Any,
    tokenizer: Any,
    data: str | None,
    device: str,
) -> tuple[SparseAutoencoder, Any, Any, str, str, str | None]:
    """(sae, model, tokenizer, model name, text spec, SAE folder) with the SAE's own model and
    text as defaults, as ``saelab eval`` resolves them."""
    if isinstance(sae_dir_or_sae, SparseAutoencoder):
        sae, sae_dir = sae_dir_or_sae, None
    else:
        sae_dir = str(sae_dir_or_sae)
        sae = load_sae(sae_dir, device=device)
    meta = sae.metadata
    model_name = model if isinstance(model, str) else str(meta.get("model_name") or "default")
    if model is None or isinstance(model, str):
        model, tokenizer = load_model(model_name, device=device)
    elif tokenizer is None:
        raise SaelabError("a model was passed without its tokenizer; pass tokenizer= as well")
    else:
        config = getattr(model, "config", None)
        model_name = str(
            getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")
        )
    text = data or str(meta.get("dataset_path") or "default")
    width = hook_dim(model, sae.cfg.hook)
    if width != sae.d_in:
        raise SaelabError(
            f"SAE expects d_in={sae.d_in} but {sae.cfg.hook} of this model has width {width}; "
            "use the model it was trained on (--model)"
        )
    return sae, model, tokenizer, model_name, text, sae_dir


@torch.no_grad()
def compute_feature_stats(
    sae_dir_or_sae: str | Path | SparseAutoencoder,
    model: Any = None,
    tokenizer: Any = None,
    *,
    data: str | None = None,
    tokens: int,
    context: int = 128,
    batch_size: int = 16,
    top_k: int = 20,
    n_quantile_examples: int = 5,
    window: tuple[int, int] = (12, 4),
    device: str = "cpu",
    seed: int = 0,
    features: slice | None = None,
    n_logits: int = 20,
    progress: bool = True,
) -> FeatureStats:
    """Statistics of every feature (or ``features``, a slice of them) over ``tokens`` tokens.

    ``sae_dir_or_sae``: a saved SAE folder or an SAE. ``model`` (a model, or a model name) and
    ``data`` (a text spec) default to the ones the SAE was trained on; a model object needs its
    ``tokenizer``. ``context`` tokens per sequence, ``batch_size`` sequences per forward pass;
    ``top_k`` examples per feature, ``n_quantile_examples`` per activation interval, each with
    ``window = (before, after)`` tokens around the ranked one; ``n_logits`` promoted and
    suppressed tokens stored. Memory: ``O(F·(K + 8·n)·W)``, independent of ``tokens``, plus the
    run's token ids (4 bytes each).

    >>> stats = compute_feature_stats("runs/demo/blocks.6.hook_resid_post-topk-x16-k32",
    ...                               tokens=50_000)
    """
    if tokens < 1 or top_k < 1 or n_quantile_examples < 1 or n_logits < 1:
        raise SaelabError("tokens, top_k, n_quantile_examples and n_logits must each be at least 1")
    if min(window) < 0:
        raise SaelabError(f"window {window} has a negative side; pass (before, after) ≥ 0")
    sae, model, tokenizer, model_name, text, sae_dir = _resolve_inputs(
        sae_dir_or_sae, model, tokenizer, data, device
    )
    run_device = next(model.parameters()).device
    sae = sae.to(run_device).eval()
    ids_F = torch.arange(sae.d_sae)[features or slice(None)]
    if len(ids_F) == 0:
        raise SaelabError(f"features={features} selects no feature of this {sae.d_sae}-wide SAE")
    stats = _RunningStats(
        len(ids_F),
        top_k=top_k,
        n_quantile=n_quantile_examples,
        window=window,
        device=run_device,
        seed=seed,
    )
    specials = special_token_ids(tokenizer)
    batches = TokenBatches(text, tokenizer, context=context, batch_size=batch_size, seed=seed)
    n_sequences = math.ceil(tokens / context)  # the last batch is cut to this many
    # Whole sequences per dense encode, so windows never straddle two blocks.
    seqs_per_block = max(1, DENSE_BUDGET // (context * sae.d_sae))
    all_tokens: list[Tensor] = []
    bar = tqdm(
        total=n_sequences * context,
        disable=not progress,
        unit="tok",
        unit_scale=True,
        desc="features",
    )
    first_seq = 0
    while first_seq < n_sequences:
        tokens_NP = next(batches, None)
        if tokens_NP is None:
            break
        tokens_NP = tokens_NP[: n_sequences - first_seq]
        all_tokens.append(tokens_NP.to(torch.int32))
        tokens_NP = tokens_NP.to(run_device)
        keep_NP = token_mask(tokens_NP, SKIP_POSITIONS, specials)
        x_NPD = run_to_hooks(model, tokens_NP, [sae.cfg.hook])[sae.cfg.hook]
        for start in range(0, len(tokens_NP), seqs_per_block):
            keep_nP = keep_NP[start : start + seqs_per_block]
            x_nPD = x_NPD[start : start + seqs_per_block]
            feats_TF = sae.encode(x_nPD[keep_nP].float())
            if features is not None:
                feats_TF = feats_TF[:, ids_F.to(run_device)]
            acts_nPF = x_nPD.new_zeros(*keep_nP.shape, len(ids_F), dtype=torch.float32)
            acts_nPF[keep_nP] = feats_TF
            stats.update_(acts_nPF, int(keep_nP.sum()), first_seq + start)
        first_seq += len(tokens_NP)
        bar.update(tokens_NP.numel())
        bar.set_postfix(scored=stats.n_tokens, l0=f"{stats.n_fired / max(stats.n_tokens, 1):.1f}")
    bar.close()
    if stats.n_tokens == 0:
        raise SaelabError(f"no tokens came from {text!r}; pass a larger text or more --tokens")
    directions_FD = sae.W_dec.detach()[ids_F.to(run_device)] / sae.activation_scale
    logits = logit_effects_of(directions_FD, model, n_logits)
    if logits is None:
        log.info("%s does not write to the residual stream: no logit effects", sae.cfg.hook)
        empty_F0 = torch.zeros(len(ids_F), 0)
        logits = {
            "logit_pos_ids": empty_F0.int(),
            "logit_pos": empty_F0,
            "logit_neg_ids": empty_F0.int(),
            "logit_neg": empty_F0,
        }
    tensors = _tensors_of(stats, ids_F, torch.cat(all_tokens), logits)
    used_ids = torch.cat(
        [tensors[name].reshape(-1).long() for name in ("tokens", "logit_pos_ids", "logit_neg_ids")]
    )
    norm = final_norm(model)
    meta = {
        "format_version": FORMAT_VERSION,
        "saelab_version": __version__,
        "model": model_name,
        "hook": sae.cfg.hook,
        "output_hook": sae.cfg.output_hook,
        "sae_dir": sae_dir,
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dataset": text,
        "seed": seed,
        "context": context,
        "n_sequences": int(tensors["tokens"].shape[0]),
        "tokens_read": int(tensors["tokens"].numel()),
        "n_tokens": stats.n_tokens,
        "skip_positions": SKIP_POSITIONS,
        "special_token_ids": specials,
        "top_k": top_k,
        "n_quantile_examples": n_quantile_examples,
        "window": list(window),
        "hist_bins": HIST_BINS,
        "quantile_buckets": QUANTILE_BUCKETS,
        "logit_effects": {
            "n": int(logits["logit_pos"].shape[1]),
            "final_norm": None if norm is None else type(norm).__name__,
            "how": "W_U (norm gain * decoder row), LayerNorm centring included, per-token norm "
            "scale, biases and soft-capping left out",
        },
        "vocab": _decode_vocab(tokenizer, torch.unique(used_ids).tolist()),
    }
    return FeatureStats(tensors, meta)


def _tensors_of(
    stats: _RunningStats, ids_F: Tensor, tokens_SP: Tensor, logits: dict[str, Tensor]
) -> dict[str, Tensor]:
    """The saved tensors, on the CPU; slots that never held a firing get sequence -1."""
    F, Q = len(ids_F), QUANTILE_BUCKETS
    top, q = stats.top, stats.quantiles
    top_seq = top.seq.masked_fill(top.value <= 0, -1)
    q_seq = q.seq.masked_fill(q.key < 0, -1)
    n = q.key.shape[1]
    out = {
        "feature_ids": ids_F,
        "fired": stats.fired_F,
        "act_sum": stats.sum_F,
        "max_act": stats.max_F,
        "envelope_exp": stats.exp_F.clamp(min=-(2**31)).int(),
        "hist": stats.hist_FH,
        "top_value": top.value.clamp_min(0),
        "top_seq": top_seq.int(),
        "top_pos": top.pos.masked_fill(top_seq < 0, -1).int(),
        "top_acts": top.acts,
        "q_value": q.value.view(F, Q, n),
        "q_seq": q_seq.view(F, Q, n).int(),
        "q_pos": q.pos.masked_fill(q_seq < 0, -1).view(F, Q, n).int(),
        "q_acts": q.acts.view(F, Q, n, -1),
        "tokens": tokens_SP.int(),
        **logits,
    }
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def write_feature_stats(
    sae_dir: str | Path, out: str | Path | None = None, **kwargs: Any
) -> tuple[FeatureStats, Path]:
    """Compute the statistics of the saved SAE at ``sae_dir`` (keywords as for
    :func:`compute_feature_stats`; ``model`` may be a name) and save them to ``out``
    (default ``SAE_DIR/features``). Returns them and the folder."""
    stats = compute_feature_stats(sae_dir, **kwargs)
    target = Path(out) if out is not None else Path(sae_dir) / "features"
    return stats, stats.save(target)
