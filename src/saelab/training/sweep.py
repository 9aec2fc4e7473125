"""``saelab sweep``: many SAEs from one pass over the activations, then one table to compare them.

Training is :func:`~saelab.training.run.fit_run`: every ``[[sae]]`` table (any mix of
architectures, widths, k, λ and hooks) is fed from the same batches, so the model runs once (or
not at all, with an activation cache). Afterwards each SAE runs over ``eval_tokens`` activations
drawn from the same stream *after* the training tokens, so never trained on (with a cache read
for more than one epoch they may have been), and its ``l0``, ``fvu``, ``gamma`` and
``frac_dead`` (METHODS §6.1, §6.3; ``frac_dead`` = never fired on those tokens) go into
``OUT/summary.json`` with the wall time. Metrics are computed in model units, as ``saelab eval``
does.

Under torchrun a sweep is split like a run (:mod:`saelab.training.distributed`): in ``sae`` mode
each process trains and measures its own SAEs on the same batches, in ``ddp`` mode every process
measures every SAE on its share of each held-out batch and the sums are reduced; rank 0 writes the
summary.

Example::

    summary = sweep_run(load_run_config("sweep.toml"), "runs/sweep", eval_tokens=16_384)
    print(format_summary_table(summary))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab import __version__
from saelab.atomic import write_json
from saelab.config import RunConfig
from saelab.errors import SaelabError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.metrics import ReconstructionStats
from saelab.saes.registry import sae_folder_name
from saelab.training.distributed import Distributed, distributed_session
from saelab.training.interruptions import interruptions_reported
from saelab.training.run import fit_run, run_config_for
from saelab.training.trainer import _inputs

log = logging.getLogger(__name__)

SUMMARY_FILENAME = "summary.json"
SUMMARY_METRICS = ("l0", "fvu", "gamma", "frac_dead")
"""The columns of the sweep table, per SAE, on held-out activations."""


def _target_hook(sae: SparseAutoencoder) -> str:
    """The hook an SAE reconstructs: its own, or a transcoder's output hook."""
    return sae.cfg.output_hook or sae.cfg.hook


@torch.no_grad()
def held_out_metrics(
    saes: list[SparseAutoencoder],
    stream: Any,
    tokens: int,
    *,
    progress: bool = True,
    dist: Distributed | None = None,
) -> list[dict[str, float]]:
    """Reconstruction metrics of each SAE over the next ``tokens`` rows of ``stream``.

    ``stream`` yields normalised ``{hook: [batch, d_in]}``; targets (the SAE's own hook, or a
    transcoder's output hook) and reconstructions are divided by the target hook's scale, so
    ``mse`` is in model units (the other metrics do not depend on the unit). A data-parallel
    process (``dist``) holds rows ``rank·b …`` of each global batch; ``tokens`` counts global
    rows and the sums are reduced over the processes, as one process would have measured them.
    """
    dist = dist or Distributed()
    rank, world = dist.data_rank, dist.data_world
    scales = getattr(stream, "scales", None) or {}
    stats = [ReconstructionStats(sae.d_out, sae.d_sae) for sae in saes]
    for sae in saes:
        sae.eval()
    batches = iter(stream)
    seen = 0
    bar = tqdm(total=tokens, disable=not progress, unit="tok", unit_scale=True, desc="held-out")
    while seen < tokens:
        batch = next(batches, None)
        if batch is None:
            raise SaelabError(
                f"the activation stream ran out after {seen:,} held-out tokens of {tokens:,}; "
                "use a larger dataset or fewer --eval-tokens"
            )
        rows = next(iter(batch.values())).shape[0]
        take_all = min(tokens - seen, rows * world)
        # This process's rows of the first take_all of the global batch.
        take = min(max(take_all - rank * rows, 0), rows)
        for sae, stat in zip(saes, stats, strict=True) if take else ():
            # A cross-layer transcoder reads and predicts several hooks, each with its scale.
            targets = getattr(sae, "output_hooks", None) or [_target_hook(sae)]
            scale = torch.cat(
                [batch[h].new_full((batch[h].shape[-1],), scales.get(h, 1.0)) for h in targets]
            )
            x_BD = _inputs(sae, batch)[:take]
            feats = sae.encode_normalised(x_BD)
            recon_BO = sae.predict_normalised(x_BD, feats)
            y_BO = torch.cat([batch[h][:take] for h in targets], -1)
            stat.update(y_BO / scale, recon_BO / scale, feats.l0_per_token(), feats.fired_counts())
        seen += take_all
        bar.update(take_all)
    bar.close()
    return [dist.reduce_stats_(stat).compute() for stat in stats]


def with_seeds(cfg: RunConfig, seeds: int) -> RunConfig:
    """``cfg`` with every ``[[sae]]`` repeated ``seeds`` times, copy ``j`` with its own seed
    ``cfg.seed + j`` (and folder ``...-seed{cfg.seed + j}``); ``seeds = 1`` leaves ``cfg`` as it
    is. All copies train from the same batches, so the model still runs once."""
    if seeds < 1:
        raise SaelabError(f"--seeds must be positive, got {seeds}")
    if seeds == 1:
        return cfg
    seeded = [s for s in cfg.saes if s.seed is not None]
    if seeded:
        raise SaelabError(
            f"an [[sae]] of the run already has seed = {seeded[0].seed}; remove `seed` from the "
            "file to train it under --seeds, or drop --seeds"
        )
    copies = tuple(
        dataclasses.replace(sae, seed=cfg.seed + j) for sae in cfg.saes for j in range(seeds)
    )
    return dataclasses.replace(cfg, saes=copies)


def sweep_run(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    eval_tokens: int = 16_384,
    seeds: int = 1,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every SAE of ``cfg`` in one pass (each under ``seeds`` seeds: :func:`with_seeds`),
    measure each on held-out activations, and write ``OUT/summary.json``; returns the summary.
    Under torchrun every process calls this and gets the whole summary."""
    if eval_tokens < 1:
        raise SaelabError(f"--eval-tokens must be positive, got {eval_tokens}")
    out_dir = Path(out_dir)
    if not resume:  # a resumed sweep reads its saved config, which holds the seeded copies
        cfg = with_seeds(cfg, seeds)
    cfg = run_config_for(cfg, out_dir, resume)
    with distributed_session(cfg.train.distributed, cfg.model.device) as dist:
        return _sweep(cfg, out_dir, eval_tokens, resume, progress, dist)


def _sweep(
    cfg: RunConfig,
    out_dir: Path,
    eval_tokens: int,
    resume: bool,
    progress: bool,
    dist: Distributed,
) -> dict[str, Any]:
    started = time.perf_counter()
    # The stream serves whole batches, so the held-out part takes whole batches too.
    eval_rows = math.ceil(eval_tokens / cfg.train.batch_size) * cfg.train.batch_size
    run = fit_run(cfg, out_dir, resume=resume, progress=progress, extra_tokens=eval_rows, dist=dist)
    trained = time.perf_counter()
    # Resuming re-trains from the last checkpoint (the SAEs' weights alone do not hold the
    # stream position the held-out tokens start at).
    with interruptions_reported(out_dir, "interrupted while measuring the SAEs on held-out data"):
        metrics = held_out_metrics(
            run.saes, run.stream, eval_tokens, progress=progress and dist.is_main, dist=dist
        )
    done = time.perf_counter()
    rows = []
    for i, sae, values in zip(run.sae_ids or range(len(run.saes)), run.saes, metrics, strict=True):
        folder = sae_folder_name(sae.cfg)
        rows.append(
            (
                i,
                {
                    "folder": folder,
                    "hook": sae.cfg.hook,
                    "architecture": sae.architecture,
                    "seed": sae.cfg.seed,
                    "output_hook": sae.cfg.output_hook,
                    "d_in": sae.d_in,
                    "d_sae": sae.d_sae,
                    **{key: values[key] for key in SUMMARY_METRICS},
                    "mse": values["mse"],
                    "explained_variance": values["explained_variance"],
                    "frac_dense": values["frac_dense"],
                    "training": run.results.get(folder, {}),
                },
            )
        )
    rows = dist.gather_in_order(rows)
    summary = {
        "saelab_version": __version__,
        "model": run.metadata.get("model_name"),
        "activations": run.metadata.get("activation_cache"),
        "train_tokens": run.cfg.train.steps * run.cfg.train.batch_size,
        "eval_tokens": eval_tokens,
        "wall_time_s": done - started,
        "train_time_s": trained - started,
        "eval_time_s": done - trained,
        "saes": rows,
    }
    if dist.is_main:
        write_json(out_dir / SUMMARY_FILENAME, summary)
    log.info("sweep of %d SAE(s) took %.1f s; summary in %s", len(rows), done - started, out_dir)
    return summary


def format_summary_table(summary: dict[str, Any]) -> str:
    """The sweep as a text table: one row per SAE, the :data:`SUMMARY_METRICS` as columns."""
    names = [row["folder"] for row in summary["saes"]]
    width = max(len("sae"), *(len(n) for n in names))
    header = f"{'sae':<{width}}  " + "  ".join(f"{m:>10}" for m in SUMMARY_METRICS)
    lines = [header, "-" * len(header)]
    for row in summary["saes"]:
        cells = "  ".join(f"{row[m]:>10.4g}" for m in SUMMARY_METRICS)
        lines.append(f"{row['folder']:<{width}}  {cells}")
    lines.append(
        f"{len(names)} SAE(s), {summary['train_tokens']:,} training and "
        f"{summary['eval_tokens']:,} held-out tokens, {summary['wall_time_s']:.1f} s"
    )
    return "\n".join(lines)
