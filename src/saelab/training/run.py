"""A training run from a :class:`~saelab.config.RunConfig`: model, text, stream, SAEs, trainer.

This is the one place that wires the parts together for ``saelab train``; each part stays
usable alone. The run folder gets ``config.toml`` (what the user asked for), ``resolved.json``
(what it resolved to: widths, learning rates, activation scales), one folder per SAE, the JSONL
log, TensorBoard events and checkpoints.

Under torchrun (:mod:`saelab.training.distributed`) :func:`train_run` joins the job and every
process builds its part: in ``ddp`` mode its own model and its share of the text (or its slice of
the cache's batches), in ``sae`` mode its own SAEs fed by rank 0's broadcast batches (or by the
cache). Rank 0 writes ``config.toml`` and ``resolved.json``.
"""

from __future__ import annotations

import logging
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab import __version__
from saelab.atomic import write_json, write_text
from saelab.config import DataConfig, ModelConfig, RunConfig, dump_run_config, load_run_config
from saelab.data.activations import ActivationStream, special_token_ids
from saelab.data.cache import ActivationCacheStream
from saelab.data.text import TokenBatches
from saelab.errors import SaelabError
from saelab.models.hookpoints import hook_dim
from saelab.models.loading import load_model
from saelab.outputs import check_output_location
from saelab.saes.base import SparseAutoencoder
from saelab.saes.registry import architecture_class, check_run_saes, sae_folder_name
from saelab.training.distributed import BroadcastStream, Distributed, distributed_session
from saelab.training.interruptions import interruptions_reported
from saelab.training.trainer import Trainer

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.toml"
RESOLVED_FILENAME = "resolved.json"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_saes(
    cfg: RunConfig,
    d_in_by_hook: dict[str, int],
    indices: list[int] | None = None,
    device: str | None = None,
) -> list[SparseAutoencoder]:
    """The SAEs of ``cfg`` (only those at ``indices``, default all) on ``device`` (default
    ``model.device``); SAE ``i`` is seeded with ``seed + i`` wherever it is built (or with its
    own ``sae.seed``, as ``saelab sweep --seeds`` sets)."""
    saes = []
    for i in range(len(cfg.saes)) if indices is None else indices:
        sae_cfg = cfg.saes[i]
        cls = architecture_class(sae_cfg.architecture)
        # A transcoder's output width is its output hook's; other SAEs reconstruct their input.
        out = sae_cfg.output_hook
        widths = {} if out is None else {"d_out": d_in_by_hook[out]}
        seed = cfg.seed + i if sae_cfg.seed is None else sae_cfg.seed
        sae = cls(sae_cfg, d_in_by_hook[sae_cfg.hook], seed=seed, **widths)
        saes.append(sae.to(device or cfg.model.device))
    return saes


def model_activation_stream(
    cfg: RunConfig, model, tokenizer, dist: Distributed | None = None
) -> ActivationStream:
    """The activation stream a run with ``cfg`` trains on: its text, hooks, batches, buffer.

    A data-parallel process (``dist``) gets every N-th packed sequence, 1/N of the batch, of the
    buffer and of the norm-estimate rows, and a scale from the norm sums of all N processes.
    """
    dist = dist or Distributed()
    world, rank = dist.data_world, dist.data_rank
    tokens = TokenBatches(
        cfg.data.dataset,
        tokenizer,
        context=cfg.data.context,
        batch_size=cfg.data.model_batch_size,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
    )
    return ActivationStream(
        model,
        tokens,
        cfg.hooks,
        batch_size=cfg.train.batch_size // world,
        buffer_size=math.ceil(cfg.data.buffer_size / world),
        skip_positions=cfg.data.skip_positions,
        special_ids=special_token_ids(tokenizer),
        norm_estimate_tokens=math.ceil(cfg.data.norm_estimate_tokens / world),
        seed=cfg.seed + rank,
        sum_over_ranks=dist.sum_over_data_ranks if world > 1 else None,
    )


def _model_source(
    cfg: RunConfig, dist: Distributed, device: str
) -> tuple[Any, dict[str, int], dict[str, Any]]:
    """(stream, d_in per hook, SAE metadata) from running the language model: on every process
    (``ddp``, each on its share of the text) or on rank 0 only (``sae``, batches broadcast)."""
    metadata = {
        "model_name": cfg.model.name,
        "context_size": cfg.data.context,
        "dataset_path": cfg.data.dataset,
        "seqpos_slice": [cfg.data.skip_positions, None],
    }

    def load() -> tuple[ActivationStream, dict[str, int]]:
        model, tokenizer = load_model(cfg.model.name, device=device, dtype=_DTYPES[cfg.model.dtype])
        d_in_by_hook = {hook: hook_dim(model, hook) for hook in cfg.hooks}
        return model_activation_stream(cfg, model, tokenizer, dist), d_in_by_hook

    if not dist.sae_parallel:
        stream, d_in_by_hook = load()
        return stream, d_in_by_hook, metadata
    source: list[ActivationStream] = []

    def load_on_main() -> dict[str, int]:
        stream, d_in_by_hook = load()
        source.append(stream)
        return d_in_by_hook

    d_in_by_hook = dist.on_main(load_on_main)
    stream = BroadcastStream(source[0] if source else None, dist, d_in_by_hook, device)
    return stream, d_in_by_hook, metadata


def _cache_source(
    cfg: RunConfig, cache_dir: str, extra_tokens: int, dist: Distributed, device: str
) -> tuple[ActivationCacheStream, dict[str, int], dict[str, Any]]:
    """(stream, d_in per hook, SAE metadata) from an activation cache; the model is not loaded.

    The cache decides the model, text, context and scales; a config that names others is
    warned about, since the saved SAEs record the cache's (that is where ``eval`` looks).
    """
    stream = ActivationCacheStream(
        cache_dir,
        cfg.hooks,
        batch_size=cfg.train.batch_size,
        buffer_size=cfg.data.buffer_size,
        seed=cfg.seed,
        epochs=cfg.data.activation_epochs,
        device=device,
        rank=dist.data_rank,
        world_size=dist.data_world,
    )
    what = "training and held-out evaluation need" if extra_tokens else "training needs"
    stream.check_tokens(cfg.train.steps * cfg.train.batch_size + extra_tokens, what)
    index = stream.index
    for field, asked, default, cached in (
        ("model.name", cfg.model.name, ModelConfig().name, index.model),
        ("data.dataset", cfg.data.dataset, DataConfig().dataset, index.dataset),
        ("data.context", cfg.data.context, DataConfig().context, index.context),
    ):
        if asked not in (default, cached):
            log.warning("%s=%r is ignored: the activation cache has %r", field, asked, cached)
    metadata = {
        **index.metadata(),
        "activation_cache": str(Path(cache_dir).resolve()),
    }
    return stream, stream.d_in, metadata


@dataclass
class FinishedRun:
    """What :func:`fit_run` leaves: the results, the trained SAEs and the stream, positioned
    after the training tokens (a sweep draws its held-out activations from there)."""

    cfg: RunConfig
    results: dict[str, dict[str, float]]
    saes: list[SparseAutoencoder]
    stream: Any
    metadata: dict[str, Any]
    """Where the activations came from (model name, text, context), as saved with the SAEs."""
    sae_ids: list[int] | None = None
    """Indices in ``cfg.saes`` of ``saes`` (this process's own in ``sae`` mode; default all)."""
    dist: Distributed | None = None
    """The torchrun job the run belongs to (None: a lone process)."""


def train_run(
    cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train every SAE of ``cfg`` from one pass over the model; returns per-SAE results.

    With ``resume``, the saved ``config.toml`` of ``out_dir`` is used and training continues
    from its latest checkpoint. Under torchrun every process calls this and gets all results.
    """
    cfg = run_config_for(cfg, out_dir, resume)
    with distributed_session(cfg.train.distributed, cfg.model.device) as dist:
        return fit_run(cfg, out_dir, resume=resume, progress=progress, dist=dist).results


def run_config_for(cfg: RunConfig, out_dir: str | Path, resume: bool) -> RunConfig:
    """The config a run into ``out_dir`` uses: ``cfg``, or the saved one when resuming; refuses
    to overwrite a finished run."""
    out_dir = Path(out_dir)
    check_run_saes(cfg.saes)  # architecture-dependent checks, before any long work
    if resume:
        saved = out_dir / CONFIG_FILENAME
        if not saved.is_file():
            raise SaelabError(f"nothing to resume: {saved} does not exist")
        saved_cfg = load_run_config(saved)
        check_run_saes(saved_cfg.saes)
        return saved_cfg
    finished = any(out_dir.glob("*/cfg.json")) or any(out_dir.glob("*/replacement.json"))
    if (out_dir / CONFIG_FILENAME).exists() and finished:
        raise SaelabError(
            f"{out_dir} already holds a finished run; pass --resume to continue it or "
            "choose another --out"
        )
    return cfg


CHECKPOINTS_HELD = 3
"""Checkpoints on disk at once: the kept ones (2) and the one being written."""


def run_output_bytes(saes: list[SparseAutoencoder], train: Any) -> int:
    """Roughly what a run writes: each SAE's weights, and with checkpoints every
    :data:`CHECKPOINTS_HELD` of them holding the weights and two Adam moments each."""
    weights = sum(p.numel() * p.element_size() for sae in saes for p in sae.parameters())
    return weights * (1 + (3 * CHECKPOINTS_HELD if train.checkpoint_every_tokens else 0))


def expand_run(cfg: RunConfig) -> tuple[RunConfig, int | None]:
    """``cfg`` with each ``[[sae]]`` that has ``layers`` expanded into its members (one
    transcoder per layer, or one cross-layer transcoder) and, for such a run, the shuffle buffer
    lowered to fit :data:`~saelab.saes.replacement.BUFFER_BUDGET_BYTES`; and the model's layer
    count (None for a run without ``layers``). The model is read from its config only."""
    from saelab.models.hookpoints import n_layers
    from saelab.saes.replacement import expand_layered_saes, fit_buffer, has_layered_saes
    from saelab.training.validate import model_skeleton

    if not has_layered_saes(cfg):
        return cfg, None
    skeleton = model_skeleton(cfg.model.name)
    layers = n_layers(skeleton)
    expanded = expand_layered_saes(cfg, layers)
    check_run_saes(expanded.saes)
    expanded, note = fit_buffer(expanded, {h: hook_dim(skeleton, h) for h in expanded.hooks})
    if note:
        log.warning(note)
    return expanded, layers


def fit_run(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    extra_tokens: int = 0,
    dist: Distributed | None = None,
) -> FinishedRun:
    """:func:`train_run`, keeping the SAEs and the stream. ``extra_tokens`` is what the caller
    will draw from the stream afterwards (checked up front when it comes from a cache). With
    ``dist`` (a torchrun job) the SAEs are this process's (all, or its own in ``sae`` mode)."""
    out_dir = Path(out_dir)
    cfg = run_config_for(cfg, out_dir, resume)
    asked = cfg  # what config.toml keeps; a layered [[sae]] trains its expanded members
    cfg, model_layers = expand_run(cfg)
    dist = dist or Distributed()
    dist.check(cfg)
    device = dist.device_for(cfg.model.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SaelabError("--device cuda was asked for but no CUDA device is available")
    torch.manual_seed(cfg.seed)
    # The trainer says where it stopped itself; before it, "nothing to resume" or how far the
    # last checkpoint is (a resumed run interrupted while loading still has it).
    with interruptions_reported(out_dir, "interrupted before training started"):
        if cfg.data.activations is not None:
            stream, d_in_by_hook, metadata = _cache_source(
                cfg, cfg.data.activations, extra_tokens, dist, device
            )
        else:
            stream, d_in_by_hook, metadata = _model_source(cfg, dist, device)
            if isinstance(stream, ActivationStream):  # refills show their own bar
                stream.progress = progress and dist.is_main
        owned = dist.owned(len(cfg.saes))
        saes = build_saes(cfg, d_in_by_hook, owned, device)
        if dist.is_main:  # before the first step; the space is what the run will write
            check_output_location(out_dir, need_bytes=run_output_bytes(saes, cfg.train))
        trainer = Trainer(
            saes, cfg.train, out_dir, progress=progress, metadata=metadata, dist=dist, sae_ids=owned
        )
        if dist.is_main:
            write_text(out_dir / CONFIG_FILENAME, dump_run_config(asked))
        if resume and not trainer.resume(stream):
            log.warning("no checkpoint in %s; starting from the beginning", out_dir)
    results = trainer.fit(stream)
    resolved_saes = dist.gather_in_order(
        [
            (
                i,
                {
                    "folder": sae_folder_name(s.cfg),
                    "d_in": s.d_in,
                    "d_sae": s.d_sae,
                    "lr": st.base_lr,
                    "steps": cfg.train.steps,
                },
            )
            for i, s, st in zip(owned, saes, trainer.states, strict=True)
        ]
    )
    if dist.is_main and model_layers is not None:
        from saelab.saes.replacement import write_layered_manifests

        write_layered_manifests(asked, out_dir, model_layers)
    if dist.is_main:
        write_json(
            out_dir / RESOLVED_FILENAME,
            {
                "saelab_version": __version__,
                "torch_version": torch.__version__,
                "python": platform.python_version(),
                "activations": metadata.get("activation_cache"),
                "processes": dist.world_size if dist.active else 1,
                "distributed": dist.mode if dist.active else None,
                "hooks": {
                    h: {"d_in": d, "activation_scale": stream.scales.get(h)}
                    for h, d in d_in_by_hook.items()
                },
                "saes": resolved_saes,
                "results": results,
            },
        )
    return FinishedRun(cfg, results, saes, stream, metadata, owned, dist)
