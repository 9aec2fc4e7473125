"""The running statistics of one pass: every batch of feature activations folded into tensors
whose size depends on the number of features F, never on the number of tokens.

* fired counts, activation sums and maxima ``[F]``;
* a 32-bin histogram ``[F, 32]`` of the non-zero activations;
* the top-K examples ``[F, K]`` (value, sequence, position, and the feature's activations on the
  context window around the token), merged by a stable sort after every batch;
* random examples from 8 activation intervals ``[F, 8, n]`` (reservoir sampling with random
  priority keys, merged the same way).

Bins without a second pass: every feature has an *envelope* ``M = 2**e``, the smallest power of
two above its running max (``max < M ≤ 2·max``). Histogram bins and quantile intervals are equal
fractions of ``M``. When a batch raises a feature's max past ``M``, ``M`` doubles (once or more)
and every bin merges with its neighbour: bin ``j`` of the old envelope is exactly part of bin
``j >> shift`` of the new one, so counts add up exactly, and a reservoir of the merged interval is
the ``n`` largest keys of the merged reservoirs, which is still a uniform sample of that interval
(every firing drew an independent key, so the top ``n`` keys of a union are a uniform sample of
it). At the end ``M`` is within a factor 2 of the max, so 16 to 32 histogram bins and 4 to 8
quantile intervals cover ``[0, max]``.

Context windows are gathered while the examples enter the top-K or a reservoir, from the very
activations they were ranked by (looked up among the batch's firings: a TopK SAE's activations
never exist as a dense ``[tokens, F]`` block), so a window's activation at its ranked token equals
the example's value exactly, with no second model pass.

Example:
    >>> stats = _RunningStats(16, top_k=4, n_quantile=2, window=(2, 1), device="cpu", seed=0)
    >>> stats.update_(torch.rand(3, 8, 16), n_scored=24, first_seq=0)   # 3 sequences of 8
    >>> stats.update_firings_(tok_E, feat_E, value_E, P=8, n_scored=24, first_seq=3)  # sparse
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from saelab.analysis.features.stats import HIST_BINS, QUANTILE_BUCKETS

_NEVER = -(2**40)  # envelope exponent of a feature that has not fired yet
_MAX_SHIFT = 62  # shifting an int64 bin index by more is undefined; 62 already empties it


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
        """Fold in dense feature activations of ``N`` whole sequences (zero where not scored):
        their firings, in (token, feature) order, go to :meth:`update_firings_`."""
        N, P, F = acts_NPF.shape
        acts_TF = acts_NPF.reshape(N * P, F)
        tok_E, feat_E = (acts_TF > 0).nonzero(as_tuple=True)
        self.update_firings_(tok_E, feat_E, acts_TF[tok_E, feat_E], P, n_scored, first_seq)

    @torch.no_grad()
    def update_firings_(
        self,
        tok_E: Int[Tensor, " E"],
        feat_E: Int[Tensor, " E"],
        value_E: Float[Tensor, " E"],
        P: int,
        n_scored: int,
        first_seq: int,
    ) -> None:
        """Fold in the firings (token, feature, value > 0) of whole sequences of ``P`` tokens,
        token ``t`` being position ``t % P`` of sequence ``first_seq + t // P``, sorted by
        (token, feature): the order of a dense ``nonzero``, so ties and random keys fall alike.

        Everything works on the firings alone (~L0 per token instead of F): dense reductions
        over ``[tokens, F]`` cost more than the model's forward pass at 10k+ features, and the
        context windows are looked up among the firings too.
        """
        F = self.fired_F.shape[0]
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
        firings = (tok_E * F + feat_E, tok_E, feat_E, value_E, P, first_seq)
        self._offer_(self.top, feat_E, value_E, firings)
        interval_E = (frac_E * QUANTILE_BUCKETS).long().clamp_(0, QUANTILE_BUCKETS - 1)
        key_E = torch.rand(len(tok_E), generator=self.generator).to(value_E.device)
        self._offer_(self.quantiles, feat_E * QUANTILE_BUCKETS + interval_E, key_E, firings)

    def _offer_(self, slots: _Slots, group_E: Tensor, key_E: Tensor, firings: tuple) -> None:
        """Let every firing compete, by ``key_E``, for a slot of its group (row of ``slots``)."""
        cell_E, tok_E, feat_E, value_E, P, first_seq = firings
        if len(tok_E) == 0:
            return
        # Only the batch's n best keys per group can enter; their windows are gathered now,
        # from the activations they were ranked by.
        src_S, group_S, rank_S = _top_n_per_group(group_E, key_E, slots.key.shape[1])
        rows_U, slot_S = torch.unique_consecutive(group_S, return_inverse=True)
        new = _Slots(len(rows_U), slots.key.shape[1], len(self.offsets_W), value_E.device)
        tok_S = tok_E[src_S]
        new.key[slot_S, rank_S] = key_E[src_S]
        new.value[slot_S, rank_S] = value_E[src_S]
        new.seq[slot_S, rank_S] = first_seq + tok_S // P
        new.pos[slot_S, rank_S] = tok_S % P
        new.acts[slot_S, rank_S] = self._windows(cell_E, value_E, tok_S, feat_E[src_S], P)
        slots.merge_(rows_U, new.fields())

    def _windows(
        self, cell_E: Tensor, value_E: Tensor, tok_S: Tensor, feat_S: Tensor, P: int
    ) -> Float[Tensor, "S W"]:
        """Each entry's feature activations on its window, NaN outside its sequence: looked up
        among the firings (``cell_E`` = token·F + feature, ascending), 0 where it did not fire."""
        F = self.fired_F.shape[0]
        pos_S = tok_S % P
        pos_SW = pos_S[:, None] + self.offsets_W
        inside_SW = (pos_SW >= 0) & (pos_SW < P)
        rows_SW = (tok_S - pos_S)[:, None] + pos_SW.clamp(0, P - 1)
        want_SW = rows_SW * F + feat_S[:, None]
        at_SW = torch.searchsorted(cell_E, want_SW).clamp_(max=len(cell_E) - 1)
        found_SW = cell_E[at_SW] == want_SW
        acts_SW = torch.where(found_SW, value_E[at_SW], value_E.new_zeros(()))
        return acts_SW.masked_fill(~inside_SW, math.nan)

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
