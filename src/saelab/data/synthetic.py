"""Synthetic activations with known features: a seeded, streamed ground truth for SAEs.

A *world* (:class:`SyntheticConfig`, fixed by ``cfg.seed``) has ``n_features`` unit directions
``d_i`` in ``d`` dimensions (``N ≫ d``: superposition) and, per feature, a firing probability
``p_i ∝ (i + 1)^(−zipf_exponent)`` scaled so that ``Σ p_i = mean_active`` (the expected number of
active features per row). A row is ``x = Σ_{i active} m_i d_i + ε`` with random magnitudes
``m_i > 0`` and Gaussian noise ``ε``. Structure, with every feature's marginal firing probability
kept exactly at ``p_i``:

- **Hierarchy**: the ``n_parents`` most frequent features are parents; each has
  ``children_per_parent`` children taken from the rarest features. A child fires only on rows
  where its parent fires, with probability ``p_child / p_parent`` there (so its marginal is
  ``p_child``); unless ``independent_children``, at most one child of a parent fires per row.
  This is the condition under which SAEs absorb a parent into its children.
- **Correlated groups**: ``n_groups`` disjoint groups of ``group_size`` other features. A grouped
  feature fires when its own coin says so (probability ``a_i = p_i(1−ρ)/(1−ρp_i)``) or when, with
  probability ``ρ = group_correlation``, the group's shared uniform ``u_g`` of the row is below
  ``p_i``; ``P(fire) = a_i + ρp_i − a_iρp_i = p_i``, and features of one group co-fire.

Rows are never held beyond one batch: batch ``i`` of a stream with seed ``s`` is drawn from its
own generator seeded by ``(s, i)``, so it is the same whenever and wherever (on one device) it is
made, and a stream resumes from its position alone. Sampling is sparse: the rows on which a
feature fires are a Bernoulli process drawn by geometric gaps, so a batch costs about
``batch_size · mean_active + 8 · n_features`` random numbers whatever ``N`` is, and the rows are
decoded with one ``embedding_bag``.

The stream yields ``{"synthetic": [batch, d]}`` in training units (E‖x‖ = √d; ``scales`` holds
the factor, estimated once per world), which is what :class:`~saelab.training.trainer.Trainer`
consumes; :meth:`SyntheticActivations.batch` also gives the raw rows and the true feature
activations for scoring.

Example::

    cfg = SyntheticConfig(d=64, n_features=512, mean_active=8)
    stream = SyntheticActivations(cfg, batch_size=1024, seed=0)
    x_BD = next(iter(stream))["synthetic"]              # [1024, 64], E‖x‖ ≈ 8
    truth = stream.batch(0)                              # raw rows and true activations
    truth.active_BN().float().mean(0)                    # ≈ stream.firing_probabilities
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from saelab.config import require
from saelab.data.scale import activation_scale, norm_sum

SYNTHETIC_HOOK = "synthetic"
"""The hook name synthetic batches are yielded under (an SAE's ``sae.hook``)."""

MAGNITUDES = ("folded_normal", "lognormal", "constant")
"""Distributions of an active feature's magnitude (``SyntheticConfig.magnitude``)."""
DIRECTIONS = ("random", "orthogonal")
"""How the true directions are drawn (``SyntheticConfig.directions``)."""

_SCALE_ROWS = 8192
"""Rows of the world's own estimation batch that fix the activation scale."""


@dataclass(frozen=True)
class SyntheticConfig:
    d: int = 256
    """Width of the activations (e.g. 64 to 768)."""
    n_features: int = 4096
    """Number N of true features (directions); N ≫ d puts them in superposition."""
    zipf_exponent: float = 0.5
    """Firing probabilities fall with rank as p_i ∝ (i + 1)^(−zipf_exponent)."""
    mean_active: float = 25.0
    """Expected number of active true features per row (Σ p_i: the true L0)."""
    n_parents: int = 64
    """Hierarchy: the n_parents most frequent features are parents (0: no hierarchy)."""
    children_per_parent: int = 4
    """Hierarchy: children of each parent (taken from the rarest features); a child fires only
    with its parent."""
    independent_children: bool = False
    """Hierarchy: siblings fire independently (default: at most one child of a parent fires per
    row, siblings mutually exclusive)."""
    n_groups: int = 16
    """Correlated groups of features that tend to fire together (0: none)."""
    group_size: int = 8
    """Features per correlated group."""
    group_correlation: float = 0.5
    """Chance ρ that a grouped feature follows its group's shared draw instead of its own."""
    magnitude: str = "folded_normal"
    """Distribution of an active feature's magnitude: folded_normal |N(mean, std)|, lognormal
    (with that mean and std) or constant (the mean)."""
    magnitude_mean: float = 1.0
    """Mean of the magnitude distribution (before folding, for folded_normal)."""
    magnitude_std: float = 0.5
    """Spread of the magnitude distribution (ignored by constant)."""
    noise_std: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to every coordinate (raw units)."""
    directions: str = "random"
    """True directions: random (unit Gaussian vectors) or orthogonal (needs n_features ≤ d)."""
    seed: int = 0
    """Seed of the world: directions, hierarchy and groups (streams draw rows with their own)."""

    def __post_init__(self) -> None:
        require(self.d >= 1, f"synthetic d must be positive, got {self.d}")
        require(
            self.n_features >= 1, f"synthetic n_features must be positive, got {self.n_features}"
        )
        require(self.zipf_exponent >= 0, "synthetic zipf_exponent must be >= 0")
        require(self.mean_active > 0, "synthetic mean_active must be positive")
        require(
            self.n_parents >= 0 and self.children_per_parent >= 0,
            "synthetic n_parents and children_per_parent must be >= 0",
        )
        require(
            self.n_parents * (1 + self.children_per_parent) <= self.n_features,
            f"synthetic hierarchy needs n_parents·(1 + children_per_parent) = "
            f"{self.n_parents * (1 + self.children_per_parent)} <= n_features = "
            f"{self.n_features}; use fewer parents or children",
        )
        require(self.n_groups >= 0 and self.group_size >= 1, "synthetic n_groups must be >= 0")
        free = self.n_features - self.n_parents * self.children_per_parent
        require(
            self.n_groups * self.group_size <= free,
            f"synthetic groups need n_groups·group_size = {self.n_groups * self.group_size} <= "
            f"{free} features that are not children; use fewer or smaller groups",
        )
        require(0 <= self.group_correlation <= 1, "synthetic group_correlation must be in [0, 1]")
        require(
            self.magnitude in MAGNITUDES,
            f"synthetic magnitude must be one of {', '.join(MAGNITUDES)}, got {self.magnitude!r}",
        )
        require(self.magnitude_mean > 0, "synthetic magnitude_mean must be positive")
        require(self.magnitude_std >= 0, "synthetic magnitude_std must be >= 0")
        require(self.noise_std >= 0, "synthetic noise_std must be >= 0")
        require(
            self.directions in DIRECTIONS,
            f"synthetic directions must be one of {', '.join(DIRECTIONS)}, got {self.directions!r}",
        )
        require(
            self.directions != "orthogonal" or self.n_features <= self.d,
            f"orthogonal directions need n_features <= d, got {self.n_features} > {self.d}",
        )
        p_F = self.firing_probabilities()
        require(
            float(p_F[0]) < 1,
            f"synthetic firing probabilities exceed 1 (the most frequent feature gets "
            f"{float(p_F[0]):.3g}); lower mean_active or zipf_exponent, or raise n_features",
        )
        if not self.independent_children and self.n_parents and self.children_per_parent:
            worst = float(self.child_probabilities().sum(-1).max())
            require(
                worst <= 1,
                f"exclusive children of one parent would fire with total probability {worst:.4f} "
                "> 1 on the parent's rows; use fewer children per parent, fewer parents or a "
                "larger zipf_exponent, or independent_children",
            )

    # ----- derived structure (cheap, deterministic) ---------------------------------------------

    def firing_probabilities(self) -> Float[Tensor, " N"]:
        """Each feature's marginal firing probability p_i (float64), Σ p_i = mean_active."""
        rank_N = torch.arange(1, self.n_features + 1, dtype=torch.float64)
        weights_N = rank_N.pow(-self.zipf_exponent)
        return weights_N * (self.mean_active / float(weights_N.sum()))

    def child_ids(self) -> Int[Tensor, "P C"]:
        """Feature ids of each parent's children: parent ``j`` (feature ``j``) has the
        ``children_per_parent`` ids starting at ``N − P·C + j·C``."""
        P, C = self.n_parents, self.children_per_parent
        start = self.n_features - P * C
        return torch.arange(start, self.n_features, dtype=torch.int64).reshape(P, C)

    def child_probabilities(self) -> Float[Tensor, "P C"]:
        """Chance of each child firing on a row where its parent fires: p_child / p_parent."""
        p_N = self.firing_probabilities()
        return p_N[self.child_ids()] / p_N[: self.n_parents, None]

    def parent_of(self) -> Int[Tensor, " N"]:
        """Each feature's parent id, −1 for features that are not children."""
        parent_N = torch.full((self.n_features,), -1, dtype=torch.int64)
        ids_PC = self.child_ids()
        parent_N[ids_PC.reshape(-1)] = torch.arange(self.n_parents).repeat_interleave(
            self.children_per_parent
        )
        return parent_N

    def groups(self) -> Int[Tensor, "G S"]:
        """Feature ids of each correlated group: a seeded draw among features that are not
        children (parents may be grouped)."""
        free = self.n_features - self.n_parents * self.children_per_parent
        gen = torch.Generator().manual_seed(_mix(self.seed, 0x6A09E667))
        chosen = torch.randperm(free, generator=gen)[: self.n_groups * self.group_size]
        return chosen.reshape(self.n_groups, self.group_size)

    def true_directions(self) -> Float[Tensor, "N D"]:
        """The world's unit directions ``[n_features, d]`` (float32)."""
        gen = torch.Generator().manual_seed(_mix(self.seed, 0xBB67AE85))
        if self.directions == "orthogonal":
            q_DN, _ = torch.linalg.qr(torch.randn(self.d, self.n_features, generator=gen))
            return q_DN.T.contiguous().float()
        dirs_ND = torch.randn(self.n_features, self.d, generator=gen)
        return dirs_ND / dirs_ND.norm(dim=-1, keepdim=True)


def _mix(*parts: int) -> int:
    """One 63-bit seed from integers (splitmix64 steps), so nearby seeds give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class SyntheticBatch:
    """One batch with its ground truth, in raw (world) units."""

    x_BD: Float[Tensor, "B D"]
    """The rows: Σ m_i d_i + noise."""
    idx_BK: Int[Tensor, "B K"]
    """Active true features of each row, padded (padding has value 0)."""
    vals_BK: Float[Tensor, "B K"]
    """Their magnitudes m_i (> 0; 0 marks padding)."""
    n_features: int

    def to_dense(self) -> Float[Tensor, "B N"]:
        """True feature activations ``[B, n_features]``."""
        out = self.vals_BK.new_zeros(self.vals_BK.shape[0], self.n_features)
        return out.scatter_add_(-1, self.idx_BK, self.vals_BK)

    def active_BN(self) -> torch.BoolTensor:
        """Which true features fire on each row."""
        return self.to_dense() > 0

    def l0(self) -> float:
        """Mean number of active true features per row."""
        return float((self.vals_BK > 0).sum(-1).double().mean())


class SyntheticActivations:
    """An endless stream of synthetic batches ``{"synthetic": [batch_size, d]}`` of one world.

    ``seed`` picks the sequence of rows (the world is ``cfg.seed``'s): two streams of one world
    with different seeds are independent samples of the same distribution, e.g. training and
    held-out rows. ``true_directions`` ``[N, d]`` are unit rows; :meth:`batch` returns batch ``i``
    with its true activations. ``scales`` (the trainer reads it) maps the hook to the factor from
    raw rows to the yielded, normalised ones; ``state_dict``/``load_state_dict`` hold the position.
    """

    def __init__(
        self,
        cfg: SyntheticConfig,
        batch_size: int = 4096,
        seed: int = 0,
        *,
        device: str | torch.device = "cpu",
        hook: str = SYNTHETIC_HOOK,
    ) -> None:
        require(batch_size >= 1, f"batch_size must be positive, got {batch_size}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.seed = seed
        self.hook = hook
        self.device = torch.device(device)
        self.position = 0
        """Index of the next batch :meth:`__iter__` yields."""
        self.true_directions = cfg.true_directions().to(self.device)
        """``[n_features, d]`` unit rows."""
        self.firing_probabilities = cfg.firing_probabilities()
        """``[n_features]`` float64 marginal firing probabilities (CPU)."""
        self._build_tables()
        self.scales = {hook: self._estimate_scale()}
        """Hook → factor turning raw rows into the yielded ones (E‖x‖ = √d)."""

    @property
    def scale(self) -> float:
        return self.scales[self.hook]

    # ----- precomputed tables -------------------------------------------------------------------

    def _build_tables(self) -> None:
        cfg, dev = self.cfg, self.device
        p_N = self.firing_probabilities
        parent_N = cfg.parent_of()
        groups_GS = cfg.groups()
        rho = cfg.group_correlation
        # Roots draw their own Bernoulli process; grouped ones at the reduced own-rate a_i.
        own_N = p_N.clone()
        if groups_GS.numel():
            p_g = p_N[groups_GS.reshape(-1)]
            own_N[groups_GS.reshape(-1)] = p_g * (1 - rho) / (1 - rho * p_g)
        roots = torch.nonzero(parent_N < 0).squeeze(-1)
        self._root_ids = roots.to(dev)
        self._root_p = own_N[roots].to(dev)
        self._group_ids = groups_GS.reshape(-1).to(dev)
        self._group_of = torch.arange(groups_GS.shape[0]).repeat_interleave(cfg.group_size).to(dev)
        self._group_p = p_N[groups_GS.reshape(-1)].float().to(dev)
        self._child_ids = cfg.child_ids().to(dev)
        q_PC = cfg.child_probabilities()
        self._child_q = q_PC.float().to(dev)
        self._child_cum = q_PC.cumsum(-1).float().to(dev)

    def _estimate_scale(self) -> float:
        """√d / mean‖x‖ over the world's own estimation batch: every stream of one world, whatever
        its seed or batch size, trains in the same units."""
        gen = self._generator(_mix(self.cfg.seed, 0x3C6EF372), 0)
        x_BD, _, _ = self._draw(_SCALE_ROWS, gen)
        return activation_scale(norm_sum(x_BD), _SCALE_ROWS, self.cfg.d, self.hook)

    # ----- drawing ------------------------------------------------------------------------------

    def _generator(self, seed: int, index: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(_mix(seed, index))

    def _draw(self, n_rows: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``n_rows`` raw rows with their padded true activations (idx, vals)."""
        with _one_cpu_thread(self.device):
            idx_BK, vals_BK = self._draw_truth(n_rows, gen)
        # The decode is the one large product (B·K·d): it keeps the process's threads.
        x_BD = F.embedding_bag(idx_BK, self.true_directions, per_sample_weights=vals_BK, mode="sum")
        if self.cfg.noise_std > 0:
            noise_BD = torch.randn(n_rows, self.cfg.d, generator=gen, device=self.device)
            x_BD = x_BD + self.cfg.noise_std * noise_BD
        return x_BD, idx_BK, vals_BK

    def _draw_truth(self, n_rows: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """The padded true activations (idx, vals) of ``n_rows`` rows."""
        cfg, dev = self.cfg, self.device
        N = cfg.n_features
        rows, feats = _bernoulli_events(self._root_p, n_rows, gen)
        feats = self._root_ids[feats]
        if self._group_ids.numel() and cfg.group_correlation > 0:
            u_BG = torch.rand(n_rows, int(self._group_of.max()) + 1, generator=gen, device=dev)
            hit_BS = u_BG[:, self._group_of] < self._group_p
            g_rows, g_slot = torch.nonzero(hit_BS, as_tuple=True)
            follows = torch.rand(g_rows.numel(), generator=gen, device=dev) < cfg.group_correlation
            rows = torch.cat([rows, g_rows[follows]])
            feats = torch.cat([feats, self._group_ids[g_slot[follows]]])
        # One event per (row, feature), sorted by row then feature.
        keys = torch.unique(rows * N + feats)
        if cfg.n_parents and cfg.children_per_parent:
            keys = self._add_children(keys, gen)
        rows, feats = keys // N, keys % N
        mags = self._magnitudes(rows.numel(), gen)
        counts_B = torch.bincount(rows, minlength=n_rows)
        K = max(int(counts_B.max()) if rows.numel() else 0, 1)
        slot = torch.arange(rows.numel(), device=dev) - (counts_B.cumsum(0) - counts_B)[rows]
        idx_BK = torch.zeros(n_rows, K, dtype=torch.int64, device=dev)
        vals_BK = torch.zeros(n_rows, K, device=dev)
        idx_BK[rows, slot] = feats
        vals_BK[rows, slot] = mags
        return idx_BK, vals_BK

    def _add_children(self, keys: Tensor, gen: torch.Generator) -> Tensor:
        """Children of the parent events in ``keys`` (row·N + feature), merged in sorted."""
        N, dev = self.cfg.n_features, self.device
        feats = keys % N
        is_parent = feats < self.cfg.n_parents
        p_rows, parents = keys[is_parent] // N, feats[is_parent]
        if not self.cfg.independent_children:
            u = torch.rand(p_rows.numel(), 1, generator=gen, device=dev)
            slot = (u >= self._child_cum[parents]).sum(-1)  # C means no child fires
            fired = slot < self.cfg.children_per_parent
            c_rows = p_rows[fired]
            children = self._child_ids[parents[fired], slot[fired]]
        else:
            u_EC = torch.rand(
                p_rows.numel(), self.cfg.children_per_parent, generator=gen, device=dev
            )
            e, c = torch.nonzero(u_EC < self._child_q[parents], as_tuple=True)
            c_rows, children = p_rows[e], self._child_ids[parents[e], c]
        merged = torch.cat([keys, c_rows * N + children])
        return torch.sort(merged).values

    def _magnitudes(self, n: int, gen: torch.Generator) -> Tensor:
        cfg, dev = self.cfg, self.device
        mean, std = cfg.magnitude_mean, cfg.magnitude_std
        if cfg.magnitude == "constant" or std == 0:
            return torch.full((n,), mean, device=dev)
        z = torch.randn(n, generator=gen, device=dev)
        if cfg.magnitude == "lognormal":
            s2 = math.log1p((std / mean) ** 2)
            return torch.exp(math.log(mean) - s2 / 2 + math.sqrt(s2) * z)
        # Folded normal; a magnitude of exactly 0 would read as "inactive".
        return (mean + std * z).abs().clamp_min(1e-6)

    # ----- serving ------------------------------------------------------------------------------

    def batch(self, index: int) -> SyntheticBatch:
        """Batch ``index`` of this stream (raw units) with its true activations; deterministic
        in (world, seed, batch size, index)."""
        x_BD, idx_BK, vals_BK = self._draw(self.batch_size, self._generator(self.seed, index))
        return SyntheticBatch(x_BD, idx_BK, vals_BK, self.cfg.n_features)

    def batches(self, start: int = 0) -> Iterator[SyntheticBatch]:
        """Batches ``start, start + 1, ...`` with their truth (does not move :attr:`position`)."""
        index = start
        while True:
            yield self.batch(index)
            index += 1

    def __iter__(self) -> Iterator[dict[str, Float[Tensor, "B D"]]]:
        while True:
            batch = self.batch(self.position)
            self.position += 1
            yield {self.hook: batch.x_BD * self.scale}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "scales": dict(self.scales)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        require(
            int(state["seed"]) == self.seed,
            f"checkpoint stream has seed {state['seed']}, this stream {self.seed}",
        )
        self.position = int(state["position"])


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the sampling's many small CPU ops on one thread: on a busy machine OpenMP threads
    spin-wait for each other (a 100k-element sort took 25× longer on 2 threads than on 1)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bernoulli_events(
    p_F: Float[Tensor, " F"], n_rows: int, gen: torch.Generator
) -> tuple[Int[Tensor, " E"], Int[Tensor, " E"]]:
    """(row, feature) of every success of independent Bernoulli(p_f) trials on rows
    ``0..n_rows−1``, drawn as geometric gaps ``⌊log U / log(1 − p)⌋ + 1`` between successes:
    exact, and about ``n_rows·Σp + 8F`` uniforms instead of ``n_rows·F``."""
    dev = p_F.device
    live = torch.nonzero(p_F > 0).squeeze(-1)
    p = p_F[live].double()
    mean = n_rows * p
    # Enough gaps to pass the last row almost always; the rare feature short of it draws more.
    draws = (mean + 6 * (mean * (1 - p)).sqrt() + 8).ceil().long()
    rows_out, feats_out = [], []
    feats = live
    start = torch.full((live.numel(),), -1, dtype=torch.int64, device=dev)
    log1mp = torch.log1p(-p)
    while feats.numel():
        seg = torch.repeat_interleave(torch.arange(feats.numel(), device=dev), draws)
        u = torch.rand(seg.numel(), generator=gen, device=dev, dtype=torch.float64)
        gaps = (torch.log(u) / log1mp[seg]).floor().clamp(max=n_rows + 1).long() + 1
        cs = gaps.cumsum(0)
        ends = draws.cumsum(0)
        before = torch.cat([cs.new_zeros(1), cs[ends[:-1] - 1]])
        pos = start[seg] + cs - before[seg]
        keep = pos < n_rows
        rows_out.append(pos[keep])
        feats_out.append(feats[seg[keep]])
        last = pos[ends - 1]
        short = last < n_rows - 1
        feats, start, log1mp = feats[short], last[short], log1mp[short]
        draws = draws[short].clamp_min(8)
    return torch.cat(rows_out), torch.cat(feats_out)
