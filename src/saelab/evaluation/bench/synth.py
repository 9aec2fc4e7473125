"""``saelab bench synth``: train SAEs on synthetic activations with known features and score them
against the truth (SynthSAEBench, Chanin & Garriga-Alonso 2026, arXiv 2602.14687).

The data are :class:`~saelab.data.synthetic.SyntheticActivations` (one world, fixed by
``world_seed``); every architecture of ``architectures`` is trained on them by the normal
:class:`~saelab.training.Trainer`, all SAEs of one seed on one stream, and each is scored on
held-out rows of the same world by :func:`score_against_truth`. The metrics follow the paper and
the reference implementation of its authors (SAELens ``synthetic/evals.py``); where the issue's
wording and theirs differ both are reported (docs/analysis.md, "Synthetic ground truth"):

- ``mcc``: one-to-one matching of decoder rows to true directions maximising Σ|cos| (Hungarian,
  scipy's ``linear_sum_assignment``; without scipy a greedy matching: best pair first), the mean
  |cos| over the min(F, N) matched pairs.
- ``precision``, ``recall``, ``f1``: each latent is matched to its best true feature (largest
  |cos|) and scored as a detector of it (latent > 0 vs feature active) over the held-out rows;
  the means over all latents (a latent that never fires scores 0).
- ``uniqueness``: distinct true features among the latents' best matches ÷ latents (the paper's);
  ``matched_once``: the share of true features that are the best match of exactly one latent.
- ``shrinkage``: mean ‖x̂‖ / ‖x‖ (the paper's); ``shrinkage_true_directions``:
  Σ x̂·d_i / Σ m_i over the active true features (1 = magnitudes kept along the true directions).
- ``explained_variance``: 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄: the held-out mean).
- ``l0``, ``true_l0``, ``frac_dead`` (latents silent on every held-out row).

Example::

    result = run_synth_bench([], SynthBenchConfig(architectures=("topk",), seeds=2))
    result["saes"]["synth/topk/seed0"]["metrics"]["mcc"]
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saelab.config import require
from saelab.evaluation.bench.registry import Suite, register_suite

if TYPE_CHECKING:
    import torch

    from saelab.data.synthetic import SyntheticActivations, SyntheticConfig
    from saelab.saes.base import SparseAutoencoder

log = logging.getLogger(__name__)

SYNTH_METRICS = (
    "mcc",
    "f1",
    "precision",
    "recall",
    "uniqueness",
    "matched_once",
    "shrinkage",
    "shrinkage_true_directions",
    "explained_variance",
    "l0",
    "true_l0",
    "frac_dead",
)
"""The metrics of :func:`score_against_truth`, in order."""

EVAL_SEED_OFFSET = 1_000_003
"""Held-out rows of seed ``s`` come from the stream with seed ``s + EVAL_SEED_OFFSET``."""


@dataclass(frozen=True)
class SynthBenchConfig:
    architectures: tuple[str, ...] = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
    """Architectures to train and score (names in ``saelab.saes.ARCHITECTURES``)."""
    k: int = 25
    """L0 target of topk, batchtopk and matryoshka (their k)."""
    relu_l1_coefficient: float = 2.9
    """ReLU's L1 coefficient λ (sets its L0; the default gives L0 ≈ 25 at the other defaults)."""
    jumprelu_l1_coefficient: float = 1.4
    """JumpReLU's L0 coefficient λ (sets its L0; the default gives L0 ≈ 25 at the other
    defaults)."""
    l1_coefficient: float = 5.0
    """λ of any other penalised architecture (e.g. gated)."""
    width: int | None = None
    """Latents per SAE; default n_features (one latent per true feature, as the paper)."""
    tokens: int = 262_144
    """Training rows per SAE."""
    batch_size: int = 2048
    """Rows per training step."""
    lr: float | None = 0.01
    """Adam learning rate of every SAE (0.01 converges in the default 128 steps; None, from
    Python: each architecture's default for the width, ~1e-3 here)."""
    seeds: int = 3
    """Seeds per architecture: each seed draws its own training rows and SAE initialisation."""
    eval_rows: int = 32_768
    """Held-out rows the SAEs are scored on."""
    device: str = "cpu"
    """Where the rows are drawn and the SAEs trained."""
    d: int = 192
    """Width of the synthetic activations."""
    n_features: int = 768
    """True features N (N ≫ d: superposition)."""
    zipf_exponent: float = 0.5
    """Firing probabilities fall with rank as (rank)^(−zipf_exponent)."""
    mean_active: float = 25.0
    """Expected active true features per row (the true L0)."""
    n_parents: int = 32
    """Parents of the hierarchy (the most frequent features; 0: no hierarchy)."""
    children_per_parent: int = 4
    """Children per parent; a child fires only with its parent."""
    independent_children: bool = False
    """Siblings fire independently (default: at most one child of a parent per row)."""
    n_groups: int = 8
    """Groups of correlated features (0: none)."""
    group_size: int = 8
    """Features per correlated group."""
    group_correlation: float = 0.5
    """Chance that a grouped feature follows its group's shared draw."""
    magnitude: str = "folded_normal"
    """Magnitude distribution of an active feature: folded_normal, lognormal or constant."""
    magnitude_mean: float = 1.0
    """Mean magnitude."""
    magnitude_std: float = 0.5
    """Magnitude spread."""
    noise_std: float = 0.0
    """Gaussian noise per coordinate (world units)."""
    directions: str = "random"
    """True directions: random or orthogonal (needs n_features <= d)."""
    world_seed: int = 0
    """Seed of the synthetic world (directions, hierarchy, groups), shared by every seed."""

    # Literal copies of saelab.data.synthetic's MAGNITUDES and DIRECTIONS (a test keeps them
    # equal): importing that module loads torch, and listing the suites must not.
    CHOICES = {
        "magnitude": ("folded_normal", "lognormal", "constant"),
        "directions": ("random", "orthogonal"),
    }

    def __post_init__(self) -> None:
        require(self.architectures, "--architectures needs at least one architecture")
        require(self.k >= 1, f"--k must be >= 1, got {self.k}")
        require(self.tokens >= 1, f"--tokens must be positive, got {self.tokens}")
        require(self.batch_size >= 1, f"--batch-size must be positive, got {self.batch_size}")
        require(self.seeds >= 1, f"--seeds must be >= 1, got {self.seeds}")
        require(self.eval_rows >= 1, f"--eval-rows must be positive, got {self.eval_rows}")
        require(self.width is None or self.width >= 1, "--width must be positive")
        self.world()  # the world's own checks, one line each

    def world(self) -> SyntheticConfig:
        """The :class:`~saelab.data.synthetic.SyntheticConfig` these options describe."""
        from saelab.data.synthetic import SyntheticConfig

        names = {f.name for f in dataclasses.fields(SyntheticConfig)} - {"seed"}
        return SyntheticConfig(**{n: getattr(self, n) for n in names}, seed=self.world_seed)

    def sae_config(self, architecture: str) -> Any:
        """The :class:`~saelab.config.SAEConfig` of one architecture at these options."""
        from saelab.config import SAEConfig
        from saelab.data.synthetic import SYNTHETIC_HOOK

        l1 = {"relu": self.relu_l1_coefficient, "jumprelu": self.jumprelu_l1_coefficient}
        return SAEConfig(
            hook=SYNTHETIC_HOOK,
            architecture=architecture,
            width=self.width or self.n_features,
            k=self.k,
            l1_coefficient=l1.get(architecture, self.l1_coefficient),
            name=architecture,
        )


# ----- matching ---------------------------------------------------------------------------------


def abs_cosines(latents_FD: torch.Tensor, truth_ND: torch.Tensor) -> torch.Tensor:
    """|cos| between every decoder row and every true direction, ``[F, N]`` (float32)."""
    a = latents_FD.float() / latents_FD.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = truth_ND.float() / truth_ND.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).abs()


def match_one_to_one(cos_FN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A one-to-one matching of rows to columns maximising Σ cos: ``(rows, cols, method)``;
    ``method`` is ``hungarian`` (scipy) or ``greedy`` (without scipy: the best remaining pair
    first, in rounds)."""
    import torch

    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return (*_greedy_matching(cos_FN), "greedy")
    rows, cols = linear_sum_assignment(cos_FN.double().cpu().numpy(), maximize=True)
    return torch.as_tensor(rows), torch.as_tensor(cols), "hungarian"


def _greedy_matching(cos_FN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy one-to-one matching: each round every free row proposes its best free column and
    each column takes its best proposer; repeated until rows or columns run out."""
    import torch

    cos = cos_FN.double().clone().cpu()
    F, N = cos.shape
    rows_out, cols_out = [], []
    free_rows = torch.ones(F, dtype=torch.bool)
    free_cols = torch.ones(N, dtype=torch.bool)
    while free_rows.any() and free_cols.any():
        sub = cos[free_rows][:, free_cols]
        r_ids, c_ids = free_rows.nonzero().squeeze(-1), free_cols.nonzero().squeeze(-1)
        best_val, best_c = sub.max(dim=1)
        # Per proposed column, the proposing row with the largest value wins it.
        order = torch.argsort(best_val, descending=True)
        taken = torch.zeros(c_ids.numel(), dtype=torch.bool)
        for i in order.tolist():
            c = int(best_c[i])
            if not taken[c]:
                taken[c] = True
                rows_out.append(int(r_ids[i]))
                cols_out.append(int(c_ids[c]))
        free_rows[torch.tensor(rows_out[-int(taken.sum()) :])] = False
        free_cols[c_ids[taken]] = False
    return torch.tensor(rows_out), torch.tensor(cols_out)


# ----- scoring ----------------------------------------------------------------------------------


def score_against_truth(
    sae: SparseAutoencoder | Any,
    true_directions: torch.Tensor,
    stream: SyntheticActivations,
    n_rows: int = 65_536,
) -> dict[str, float]:
    """Score any SAE (``encode``/``decode`` on raw rows, decoder ``W_dec [F, d]``) against the
    truth on ``n_rows`` rows of ``stream`` (from its batch 0; use a held-out seed). Returns the
    metrics of :data:`SYNTH_METRICS` and ``matching`` (1 hungarian, 0 greedy) — see the module
    docstring for the definitions."""
    import torch

    with torch.no_grad():
        W_dec_FD = sae.W_dec.detach().float()
        truth_ND = true_directions.to(W_dec_FD.device).float()
        cos_FN = abs_cosines(W_dec_FD, truth_ND)
        rows, cols, method = match_one_to_one(cos_FN)
        mcc = float(cos_FN[rows.to(cos_FN.device), cols.to(cos_FN.device)].double().mean())
        best_F = cos_FN.argmax(dim=1)
        F, N = cos_FN.shape
        matched_N = torch.bincount(best_F, minlength=N)
        uniqueness = float((matched_N > 0).sum()) / F
        matched_once = float((matched_N == 1).double().mean())

        counts = {name: torch.zeros(F, dtype=torch.float64) for name in ("tp", "fp", "fn")}
        fired_F = torch.zeros(F, dtype=torch.bool)
        sums = dict.fromkeys(
            ("rows", "l0", "true_l0", "shrink", "shrink_rows", "err", "x2", "proj", "mag"), 0.0
        )
        sum_x = None
        for batch in stream.batches():
            take = min(stream.batch_size, n_rows - int(sums["rows"]))
            if take <= 0:
                break
            x_BD = batch.x_BD[:take].to(W_dec_FD.device)
            feats_BF = sae.encode(x_BD)
            recon_BD = sae.decode(feats_BF)
            fires_BF = feats_BF > 0
            active_BN = batch.active_BN()[:take].to(W_dec_FD.device)
            truth_BF = active_BN[:, best_F]
            counts["tp"] += (fires_BF & truth_BF).sum(0).double().cpu()
            counts["fp"] += (fires_BF & ~truth_BF).sum(0).double().cpu()
            counts["fn"] += (~fires_BF & truth_BF).sum(0).double().cpu()
            fired_F |= fires_BF.any(0).cpu()
            x64, r64 = x_BD.double(), recon_BD.double()
            norms_B = x64.norm(dim=-1)
            ok_B = norms_B > 1e-6
            sums["shrink"] += float((r64.norm(dim=-1)[ok_B] / norms_B[ok_B]).sum())
            sums["shrink_rows"] += float(ok_B.sum())
            sums["err"] += float((x64 - r64).pow(2).sum())
            sums["x2"] += float(x64.pow(2).sum())
            sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
            # Reconstruction along each active true direction vs the true magnitude.
            idx_BK = batch.idx_BK[:take].to(W_dec_FD.device)
            vals_BK = batch.vals_BK[:take].to(W_dec_FD.device).double()
            # One active slot at a time: a [B, K, d] gather would be 1 GB at d = 768.
            for k in range(idx_BK.shape[1]):
                proj_B = (r64 * truth_ND[idx_BK[:, k]].double()).sum(-1)
                sums["proj"] += float((proj_B * (vals_BK[:, k] > 0)).sum())
            sums["mag"] += float(vals_BK.sum())
            sums["l0"] += float(fires_BF.sum())
            sums["true_l0"] += float((vals_BK > 0).sum())
            sums["rows"] += take
        n = sums["rows"]
        tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
        precision_F = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
        recall_F = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
        pr = precision_F + recall_F
        f1_F = torch.where(pr > 0, 2 * precision_F * recall_F / pr.clamp_min(1e-12), pr * 0)
        assert sum_x is not None
        total_var = sums["x2"] - float(sum_x.pow(2).sum()) / n
        return {
            "mcc": mcc,
            "f1": float(f1_F.mean()),
            "precision": float(precision_F.mean()),
            "recall": float(recall_F.mean()),
            "uniqueness": uniqueness,
            "matched_once": matched_once,
            # Rows with no active feature (x = 0) have no ratio; the paper's code skips them.
            "shrinkage": sums["shrink"] / max(sums["shrink_rows"], 1),
            "shrinkage_true_directions": sums["proj"] / max(sums["mag"], 1e-12),
            "explained_variance": 1.0 - sums["err"] / total_var if total_var > 0 else math.nan,
            "l0": sums["l0"] / n,
            "true_l0": sums["true_l0"] / n,
            "frac_dead": float((~fired_F).double().mean()),
            "matching": 1.0 if method == "hungarian" else 0.0,
        }


# ----- the suite --------------------------------------------------------------------------------


def run_synth_bench(
    sae_dirs: list[Path] | None = None,
    opts: SynthBenchConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every architecture of ``opts`` under each seed on synthetic rows and score it:
    ``{"suite": "synth", "saes": {"synth/ARCH/seedS": {"metrics", "info"}}, "world": {...},
    "intervals": {ARCH: {metric: [mean, half_width]}}}`` (``sae_dirs`` is unused: the suite
    trains its own SAEs)."""
    import torch

    from saelab.config import TrainConfig
    from saelab.data.synthetic import SYNTHETIC_HOOK, SyntheticActivations
    from saelab.evaluation.bench.intervals import mean_interval
    from saelab.saes.registry import architecture_class, check_sae_config
    from saelab.training.trainer import Trainer

    opts = opts or SynthBenchConfig()
    world = opts.world()
    sae_cfgs = [opts.sae_config(arch) for arch in opts.architectures]
    for cfg in sae_cfgs:
        check_sae_config(cfg)
    train_cfg = TrainConfig(tokens=opts.tokens, batch_size=opts.batch_size, lr=opts.lr)
    saes_out: dict[str, Any] = {}
    for seed in range(opts.seeds):
        stream = SyntheticActivations(world, opts.batch_size, seed=seed, device=opts.device)
        held_out = SyntheticActivations(
            world,
            min(opts.batch_size, opts.eval_rows),
            seed=seed + EVAL_SEED_OFFSET,
            device=opts.device,
        )
        torch.manual_seed(seed)
        saes = [
            architecture_class(cfg.architecture)(cfg, world.d, seed=seed * 1000 + i).to(opts.device)
            for i, cfg in enumerate(sae_cfgs)
        ]
        trainer = Trainer(saes, train_cfg, None, progress=progress, tensorboard=False)
        trainer.fit(stream)
        for cfg, sae in zip(sae_cfgs, saes, strict=True):
            metrics = score_against_truth(sae, stream.true_directions, held_out, opts.eval_rows)
            key = f"synth/{cfg.architecture}/seed{seed}"
            saes_out[key] = {
                "metrics": metrics,
                "info": {
                    "architecture": cfg.architecture,
                    "hook": SYNTHETIC_HOOK,
                    "d_in": world.d,
                    "d_sae": sae.d_sae,
                    "l0": metrics["l0"],
                    "seed": seed,
                    "group": f"synth/{cfg.architecture}",
                },
            }
            log.info("synth %s: %s", key, {m: round(v, 4) for m, v in metrics.items()})
    intervals = {
        cfg.architecture: {
            m: list(
                mean_interval(
                    [
                        saes_out[f"synth/{cfg.architecture}/seed{s}"]["metrics"][m]
                        for s in range(opts.seeds)
                    ]
                )
            )
            for m in SYNTH_METRICS
        }
        for cfg in sae_cfgs
    }
    return {
        "suite": "synth",
        "saes": saes_out,
        "world": dataclasses.asdict(world),
        "intervals": intervals,
    }


def synth_result_from_bench(doc: dict[str, Any]) -> dict[str, Any]:
    """The synth entries of a ``bench.json`` document in :func:`run_synth_bench`'s shape
    (``saes`` and ``intervals`` per architecture), e.g. to plot them."""
    saes = {k: e for k, e in doc["saes"].items() if "synth" in e.get("suites", ["synth"])}
    saes = {k: e for k, e in saes.items() if str(k).startswith("synth/")}
    intervals: dict[str, dict[str, list[float]]] = {}
    for entry in saes.values():
        arch = entry["info"]["architecture"]
        group = doc["groups"][entry["info"].get("group") or f"synth/{arch}"]
        intervals[arch] = {
            m: [stat["mean"], stat["half_width"]] for m, stat in group["metrics"].items()
        }
    return {"suite": "synth", "saes": saes, "intervals": intervals}


def synth_bench_figure(result: dict[str, Any], metrics: tuple[str, ...] = ("f1", "mcc")) -> Any:
    """Bars of each metric per architecture (mean over seeds) with their 95 % intervals, one
    panel per metric, from a :func:`run_synth_bench` result; the seeds' values as dots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    archs = list(result["intervals"])
    fig = Figure(figsize=(3.2 * len(metrics), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        means = [result["intervals"][a][metric][0] for a in archs]
        halves = [result["intervals"][a][metric][1] for a in archs]
        halves = [h if h is not None and math.isfinite(h) else 0.0 for h in halves]
        ax.bar(range(len(archs)), means, yerr=halves, capsize=4, color="#8fb3d9")
        for j, arch in enumerate(archs):
            values = [
                e["metrics"][metric]
                for e in result["saes"].values()
                if e["info"]["architecture"] == arch
            ]
            ax.plot([j] * len(values), values, "k.", markersize=4)
        ax.set_xticks(range(len(archs)), archs, rotation=30, ha="right")
        ax.set_title(f"{metric} (mean ± 95 % CI)")
        ax.set_ylim(0, 1)
    return fig


def write_synth_bench_png(result: dict[str, Any], path: str | Path) -> Path:
    """:func:`synth_bench_figure` written to ``path`` as a PNG, atomically."""
    from saelab.atomic import write_atomically

    fig = synth_bench_figure(result)
    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


register_suite(
    Suite(
        name="synth",
        help="train SAEs on synthetic activations with known features; MCC, F1, uniqueness, "
        "shrinkage against the truth",
        options=SynthBenchConfig,
        needs_sae_dirs=False,
        run=run_synth_bench,
    )
)
