"""``saelab eval``: reconstruction, sparsity and spliced-loss metrics of one or many saved SAEs.

One pass over evaluation text computes everything: per token batch ONE clean forward pass
captures every hook any of the SAEs needs; its activations feed each SAE's running
reconstruction sums (METHODS §6.1) and its spliced pass, and one zero-ablated pass per hook
(shared by all SAEs there) gives the ablated loss (§6.2). The spliced and ablated passes run
only from the block the hook's change first reaches (the blocks before compute the same thing
as in the clean pass), stacked into one batch, and the LM head, CE and KL are computed on chunks
of positions (:mod:`.splice`). So N SAEs on H hooks cost one prefix and ``1 + N + H`` suffixes
per batch instead of ``3N`` full passes; models load once per model name.

``metrics.json`` holds exactly :data:`METRIC_KEYS` (other tools read it as a contract); the
further metrics (:data:`EXTRA_KEYS`: cosine similarity, L2 ratio, max decoder cosine, high-
frequency shares, the dead window, ...) and the sanity report (:mod:`.sanity`) go to each SAE's
``eval_info.json`` and, for all SAEs together, to ``eval_summary.json``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.atomic import write_json
from saelab.errors import SaelabError
from saelab.evaluation.sanity import expected_input_norm, reference_ce, sanity_warnings
from saelab.evaluation.splice import (
    SpliceSums,
    clean_outputs,
    entry_captures,
    eval_batches,
    head_losses,
    hook_entries,
    scored_positions,
    variant_outputs,
)
from saelab.models.hookpoints import hook_dim
from saelab.models.loading import load_model
from saelab.outputs import check_output_location
from saelab.saes.base import SparseAutoencoder
from saelab.saes.metrics import ReconstructionStats, frequency_metrics, max_decoder_cos
from saelab.saes.storage import find_sae_dirs, load_sae, read_sae_cfg
from saelab.saes.transcoder import Transcoder
from saelab.signals import held_back

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "l0",
    "mse",
    "fvu",
    "explained_variance",
    "gamma",
    "frac_dead",
    "frac_dense",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_ablated",
    "ce_loss_recovered",
    "delta_ce",
    "kl",
)
"""The keys of ``metrics.json``, in order."""


EXTRA_KEYS = (
    "cos_sim",
    "l2_ratio",
    "max_decoder_cos",
    "freq_over_1_percent",
    "freq_over_10_percent",
    "kl_ablated",
    "dead_window_tokens",
)
"""Metrics beyond :data:`METRIC_KEYS`, in ``eval_info.json`` and ``eval_summary.json``."""

SUMMARY_FILENAME = "eval_summary.json"


@dataclass
class _Tally:
    """One SAE's running sums over an evaluation."""

    sae: SparseAutoencoder
    stats: ReconstructionStats
    sums: SpliceSums = field(default_factory=SpliceSums)
    norm_sum: float = 0.0  # Σ‖x‖ of the SAE's raw input at kept positions

    @property
    def splice_hook(self) -> str:
        """Where the SAE's output replaces the model's activation (a transcoder's output hook)."""
        return self.sae.cfg.output_hook or self.sae.cfg.hook


def _check_widths(sae: SparseAutoencoder, model) -> None:
    hook = sae.cfg.hook
    width = hook_dim(model, hook)
    if width != sae.d_in:
        raise SaelabError(
            f"SAE expects d_in={sae.d_in} but {hook} of this model has width {width}; "
            "evaluate it on the model it was trained on (--model)"
        )
    output_hook = sae.cfg.output_hook
    if output_hook is not None and (out_width := hook_dim(model, output_hook)) != sae.d_out:
        raise SaelabError(
            f"transcoder predicts d_out={sae.d_out} but {output_hook} of this model has width "
            f"{out_width}; evaluate it on the model it was trained on (--model)"
        )


def _reconstruct(
    tally: _Tally, acts: dict[str, torch.Tensor], keep_NP: torch.Tensor
) -> torch.Tensor:
    """The SAE's output ``[N, P, D]`` (model units) at its splice hook, zeros where not kept;
    adds the batch to its reconstruction sums (a transcoder is scored against the true
    activations at its output hook)."""
    sae = tally.sae
    x_in_NPD = acts[sae.cfg.hook]
    x_raw_TD = x_in_NPD[keep_NP].float()
    tally.norm_sum += float(x_raw_TD.norm(dim=-1).sum())
    x_TD = x_raw_TD * sae.activation_scale
    feats = sae.encode_normalised(x_TD)
    if isinstance(sae, Transcoder):
        recon_TD = sae.predict_normalised(x_TD, feats) / sae.output_scale
        target_NPD = acts[sae.cfg.output_hook]
    else:
        recon_TD = sae.decode_feats(feats) / sae.activation_scale
        target_NPD = x_in_NPD
    tally.stats.update(
        target_NPD[keep_NP].float(), recon_TD, feats.l0_per_token(), feats.fired_counts()
    )
    # Only kept positions are replaced; the rest keep the model's own activations.
    recon_NPD = target_NPD.new_zeros(*keep_NP.shape, recon_TD.shape[-1])
    recon_NPD[keep_NP] = recon_TD.to(target_NPD.dtype)
    return recon_NPD


def _model_label(model) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model"))


@torch.no_grad()
def evaluate_saes(
    saes: list[SparseAutoencoder],
    model,
    tokenizer,
    *,
    dataset: str = "default",
    tokens: int = 8192,
    context: int = 128,
    batch_size: int = 16,
    skip_positions: int = 1,
    seed: int = 1,
    progress: bool = True,
    model_name: str | None = None,
    expected_norms: list[float | None] | None = None,
    check_reference: bool = True,
) -> list[tuple[dict[str, float], dict[str, Any]]]:
    """Metrics of every SAE in ``saes`` (any hooks of ``model``) over the same token batches.

    Per batch: one clean pass capturing every needed hook, then from each splice hook on one
    zero-ablated pass and one spliced pass per SAE there. ``expected_norms`` (per SAE, E‖x‖ it
    was trained on) feeds the normalisation check; by default it comes from each SAE's
    activation scale. With ``check_reference`` the model's CE on the default corpus is measured
    (cached) to judge the clean CE. Returns, per SAE, (metrics with exactly
    :data:`METRIC_KEYS`, information with :data:`EXTRA_KEYS`, the sanity report and its
    ``warnings``).

    >>> (metrics, info), = evaluate_saes([sae], model, tokenizer, tokens=4096)
    """
    if not saes:
        raise SaelabError("no SAEs to evaluate; pass at least one SAE")
    device = next(model.parameters()).device
    for sae in saes:
        _check_widths(sae, model)
    tallies = [
        _Tally(sae.to(device).eval(), ReconstructionStats(sae.d_out, sae.d_sae)) for sae in saes
    ]
    hooks = sorted({h for s in saes for h in (s.cfg.hook, s.cfg.output_hook) if h})
    splice_hooks = sorted({t.splice_hook for t in tallies})
    n_batches, batches = eval_batches(
        tokenizer,
        dataset=dataset,
        tokens=tokens,
        context=context,
        batch_size=batch_size,
        seed=seed,
        skip_positions=skip_positions,
        device=device,
    )
    # Each splice hook's variants (its SAEs, then the zeros) run from where its change enters.
    entries = hook_entries(model, splice_hooks)
    captured = sorted(set(hooks) | set(entry_captures(entries)))
    by_hook = {hook: [t for t in tallies if t.splice_hook == hook] for hook in splice_hooks}
    position0_kept = False
    bar = tqdm(total=n_batches, disable=not progress, desc="eval", unit="batch")
    started, seen = time.perf_counter(), 0
    for tokens_NP, keep_NP in batches:
        position0_kept |= bool(keep_NP[:, 0].any())
        scored_NP = scored_positions(keep_NP)
        clean_NPX, acts = clean_outputs(model, tokens_NP, captured)
        outputs: list[torch.Tensor] = []
        for hook in splice_hooks:
            news = [_reconstruct(tally, acts, keep_NP) for tally in by_hook[hook]]
            news.append(torch.zeros_like(acts[hook]))  # zero-ablation: once per hook
            outputs += variant_outputs(model, tokens_NP, hook, entries[hook], keep_NP, acts, news)
            del news
        ce_clean_T, ce, kl = head_losses(model, clean_NPX, outputs, tokens_NP, scored_NP)
        del outputs
        at = 0
        for hook in splice_hooks:
            members = by_hook[hook]
            ablated = at + len(members)
            for i, tally in enumerate(members):
                tally.sums.add_rows(ce_clean_T, ce[at + i], ce[ablated], kl[at + i], kl[ablated])
            at = ablated + 1
        seen += tokens_NP.numel()
        bar.set_postfix(tok_s=f"{seen / (time.perf_counter() - started):.0f}", refresh=False)
        bar.update(1)
    bar.close()
    if tallies[0].stats.n_tokens == 0:
        raise SaelabError(f"no evaluation tokens came from {dataset!r}; pass a larger dataset")
    name = model_name or _model_label(model)
    ref_ce = None
    if check_reference:  # measured once per model and context, then read from the cache
        took = time.perf_counter()
        ref_ce = reference_ce(model, tokenizer, name, context=context)
        log.info("reference CE (once, cached): %.1f s", time.perf_counter() - took)
    clean_ce = tallies[0].sums.compute()["ce_loss_clean"]
    log.info(
        "clean CE of %s on %s at context %d: %.4f nats (on the default text: %s)",
        name,
        dataset,
        context,
        clean_ce,
        "not measured" if ref_ce is None else f"{ref_ce:.4f}",
    )
    results = []
    for i, tally in enumerate(tallies):
        results.append(
            _results_of(
                tally,
                expected_norms[i] if expected_norms is not None else expected_input_norm(tally.sae),
                dataset=dataset,
                context=context,
                ref_ce=ref_ce,
                position0_kept=position0_kept,
            )
        )
    return results


def _results_of(
    tally: _Tally,
    expected_norm: float | None,
    *,
    dataset: str,
    context: int,
    ref_ce: float | None,
    position0_kept: bool,
) -> tuple[dict[str, float], dict[str, Any]]:
    stats, sae = tally.stats, tally.sae
    recon = stats.compute()
    spliced = tally.sums.compute()
    metrics = {key: float(recon[key] if key in recon else spliced[key]) for key in METRIC_KEYS}
    extra = {
        "cos_sim": recon["cos_sim"],
        "l2_ratio": recon["l2_ratio"],
        "max_decoder_cos": max_decoder_cos(sae.W_dec.detach()),
        **frequency_metrics(stats.feature_density()),
        "kl_ablated": spliced["kl_ablated"],
        # frac_dead counts features silent over exactly this many evaluation tokens.
        "dead_window_tokens": stats.n_tokens,
    }
    mean_norm = tally.norm_sum / stats.n_tokens
    warnings = sanity_warnings(
        clean_ce=metrics["ce_loss_clean"],
        ref_ce=ref_ce,
        context=context,
        position0_kept=position0_kept,
        mean_norm=mean_norm,
        expected_norm=expected_norm,
    )
    info = {
        "hook": sae.cfg.hook,
        "output_hook": sae.cfg.output_hook,
        "tokens": stats.n_tokens,
        "context": context,
        "dataset": dataset,
        **extra,
        "reference_ce": ref_ce,
        "mean_input_norm": mean_norm,
        "expected_input_norm": expected_norm,
        "position0_masked": not position0_kept,
        "warnings": warnings,
    }
    return metrics, info


def evaluate_sae(
    sae: SparseAutoencoder, model, tokenizer, **kwargs: Any
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of ``sae`` at its hook; :func:`evaluate_saes` for one SAE (same keyword arguments).

    A transcoder's prediction is spliced in, zero-ablated and scored at its output hook.
    Returns (metrics with exactly :data:`METRIC_KEYS`, extra information).
    """
    return evaluate_saes([sae], model, tokenizer, **kwargs)[0]


def evaluate_sae_dirs(
    specs: list[str | Path],
    *,
    model_name: str | None = None,
    dataset: str | None = None,
    tokens: int = 8192,
    context: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    summary_path: str | Path | None = None,
    write_summary: bool = True,
) -> dict[str, Any]:
    """Evaluate saved SAEs (see :func:`~saelab.saes.storage.find_sae_dirs`), each on its own
    model, text and context unless overridden; SAEs that share those share the forward passes.

    Writes ``metrics.json`` and ``eval_info.json`` into every SAE folder and (``write_summary``)
    ``eval_summary.json`` into ``summary_path`` or the folders' common parent. Returns the
    summary: ``{"path": ..., "saes": [{"sae_dir", "model", "dataset", "context", "metrics",
    "reference_ce", "warnings", ...}, ...]}`` with every metric (:data:`METRIC_KEYS` and
    :data:`EXTRA_KEYS`) under ``metrics``.
    """
    dirs = find_sae_dirs(specs)
    path = Path(summary_path) if summary_path else _common_parent(dirs) / SUMMARY_FILENAME
    path = path / SUMMARY_FILENAME if path.is_dir() else path
    # Every place written to is checked before the first forward pass.
    for sae_dir in dirs:
        check_output_location(sae_dir, what="SAE folder")
    if write_summary:
        check_output_location(path, kind="file", what="--summary")
    groups: dict[tuple[str, str, int], list[tuple[Path, SparseAutoencoder, float | None]]] = {}
    for sae_dir in dirs:
        sae = load_sae(sae_dir, device=device)
        meta = sae.metadata
        key = (
            model_name or str(meta.get("model_name") or "default"),
            dataset or str(meta.get("dataset_path") or "default"),
            context or int(meta.get("context_size") or 128),
        )
        norm = expected_input_norm(sae, read_sae_cfg(sae_dir))
        groups.setdefault(key, []).append((sae_dir, sae, norm))
    models: dict[str, tuple[Any, Any]] = {}
    entries: dict[Path, dict[str, Any]] = {}
    for (name, text, ctx), members in groups.items():
        if name not in models:  # once per distinct model, however many groups use it
            models[name] = load_model(name, device=device)
        model, tokenizer = models[name]
        outputs = evaluate_saes(
            [sae for _, sae, _ in members],
            model,
            tokenizer,
            dataset=text,
            tokens=tokens,
            context=ctx,
            progress=progress,
            model_name=name,
            expected_norms=[norm for _, _, norm in members],
        )
        for (sae_dir, _, _), (metrics, info) in zip(members, outputs, strict=True):
            info["model"] = name
            with held_back():  # the pair is written together: a signal waits for both
                write_json(sae_dir / "metrics.json", metrics)
                write_json(sae_dir / "eval_info.json", info)
            entries[sae_dir] = _summary_entry(sae_dir, metrics, info)
    summary: dict[str, Any] = {"saes": [entries[d] for d in dirs]}
    if write_summary:
        write_json(path, summary)
        summary["path"] = str(path)
    return summary


def _summary_entry(sae_dir: Path, metrics: dict[str, float], info: dict[str, Any]) -> dict:
    extra = {key: info[key] for key in EXTRA_KEYS}
    rest = {k: v for k, v in info.items() if k not in EXTRA_KEYS}
    return {"sae_dir": str(sae_dir), **rest, "metrics": {**metrics, **extra}}


def _common_parent(dirs: list[Path]) -> Path:
    return Path(os.path.commonpath([str(d.resolve().parent) for d in dirs]))


def format_summary_table(summary: dict[str, Any]) -> str:
    """Every metric (:data:`METRIC_KEYS`, then :data:`EXTRA_KEYS`) a row, every SAE a column
    (``#1``, ``#2``, ... named in a legend above, as folder names are long)."""
    entries = summary["saes"]
    keys = (*METRIC_KEYS, *EXTRA_KEYS)
    width = max(len(k) for k in keys)
    lines = [f"#{i} {entry['sae_dir']}" for i, entry in enumerate(entries, 1)]
    lines.append(f"{'':<{width}}" + "".join(f"{f'#{i}':>12}" for i in range(1, len(entries) + 1)))
    for key in keys:
        values = "".join(f"{float(entry['metrics'][key]):>12.5g}" for entry in entries)
        lines.append(f"{key:<{width}}{values}")
    return "\n".join(lines)
