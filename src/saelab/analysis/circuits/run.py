"""``saelab circuit``: feature attributions, top-k keeping and faithfulness on a task.

:func:`run_circuit` splices every SAE in (one per hook), attributes the task metric to features
and error nodes, keeps the top-k features per prompt, and measures the faithfulness curve; it
writes ``circuit.json``, ``faithfulness.json`` and ``faithfulness.png``.

:func:`run_compare` is the experiment of METHODS §9.3: two SAEs at one hook, the one with the
larger L0 keeping only its top-k features per prompt versus the one whose L0 is about k, on the
task metric (mean logit difference and accuracy), each with and without its error term; it
writes ``compare.json`` and ``compare.png``.

Example:
    >>> result = run_circuit(["runs/demo/blocks.6.hook_resid_post-topk-x16-k32"], CircuitConfig())
    >>> print(format_circuit_report(result))
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.analysis.circuits.attribution import NodeEffects, node_effects
from saelab.analysis.circuits.config import CircuitConfig
from saelab.analysis.circuits.faithfulness import faithfulness_curve
from saelab.analysis.circuits.keep import keep_topk_edit
from saelab.analysis.circuits.plots import compare_png, faithfulness_png
from saelab.analysis.circuits.spliced import SiteEdit, SplicedModel
from saelab.analysis.circuits.tasks import TaskBatch, clean_metric, load_task, tokenize_task
from saelab.atomic import write_atomically, write_json
from saelab.errors import SaelabError
from saelab.evaluation.evaluate import resolve_sae_dirs
from saelab.models.loading import load_model
from saelab.saes.base import SparseAutoencoder
from saelab.saes.storage import load_sae

log = logging.getLogger(__name__)

CIRCUIT_FILES = ("circuit.json", "faithfulness.json", "faithfulness.png")
COMPARE_FILES = ("compare.json", "compare.png")


def summarise(metric_N: Tensor) -> dict[str, float]:
    """Mean metric and accuracy (share of prompts with metric > 0: correct over incorrect)."""
    return {"logit_diff": float(metric_N.mean()), "accuracy": float((metric_N > 0).float().mean())}


@dataclass(frozen=True)
class _Loaded:
    """What both experiments start from."""

    model: Any
    model_name: str
    dirs: list[Path]
    saes: list[SparseAutoencoder]
    batch: TaskBatch
    examples: list[str]


def _load(
    sae_specs: list[str | Path], cfg: CircuitConfig, model_name: str | None, device: str
) -> _Loaded:
    dirs = resolve_sae_dirs(sae_specs)
    saes = [load_sae(d, device=device) for d in dirs]
    name = model_name or str(saes[0].metadata.get("model_name") or "default")
    model, tokenizer = load_model(name, device=device)
    task = load_task(cfg.task, tokenizer, cfg.n_prompts, cfg.seed)
    if len(task.prompts) < cfg.n_prompts:
        log.info("the task has %d prompts (asked for %d)", len(task.prompts), cfg.n_prompts)
    batch = tokenize_task(task, tokenizer).to(device)
    return _Loaded(model, name, dirs, saes, batch, list(task.prompts[:3]))


def _topk_edits(
    spliced: SplicedModel,
    batch: TaskBatch,
    cfg: CircuitConfig,
    add_error: bool,
    effects: NodeEffects | None = None,
) -> dict[str, SiteEdit]:
    splice_NP = spliced.splice_mask(batch.mask_NP)
    edits = {}
    for hook in spliced.hooks:
        scores = None
        if cfg.rank_by == "attribution":
            if effects is None:
                raise SaelabError("ranking by attribution needs node effects; compute them first")
            scores = effects.features[hook].abs()
        edits[hook] = keep_topk_edit(
            cfg.k, splice_NP, per=cfg.keep_per, scores_NPF=scores, add_error=add_error
        )
    return edits


def l0_on_prompts(spliced: SplicedModel, batch: TaskBatch) -> dict[str, float]:
    """Mean number of active features per spliced token, per site, on the task's prompts."""
    values = spliced.site_values(batch.tokens_NP, batch.mask_NP)
    splice_NP = spliced.splice_mask(batch.mask_NP)
    return {
        h: float((v.feats_NPF[splice_NP] > 0).sum(-1).float().mean()) for h, v in values.items()
    }


def run_circuit(
    sae_specs: list[str | Path],
    cfg: CircuitConfig,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    out: str | Path = "runs/circuit",
    progress: bool = True,
) -> dict[str, Any]:
    """Attributions, top-k metrics and the faithfulness curve of SAEs at distinct hooks."""
    loaded = _load(sae_specs, cfg, model_name, device)
    model, saes, batch = loaded.model, loaded.saes, loaded.batch
    spliced = SplicedModel(model, saes)
    log.info("attributing the metric of %d prompts by %s", len(batch), cfg.method)
    effects = node_effects(spliced, batch, cfg.method, ig_steps=cfg.ig_steps, progress=progress)

    def topk(add_error: bool) -> dict[str, SiteEdit]:
        return _topk_edits(spliced, batch, cfg, add_error, effects)

    with torch.no_grad():
        metrics = {
            "clean": summarise(clean_metric(model, batch)),
            "sae": summarise(spliced.metric(batch, add_error=False)),
            "sae+error": summarise(spliced.metric(batch)),
            "top-k": summarise(spliced.metric(batch, topk(False))),
            "top-k+error": summarise(spliced.metric(batch, topk(True))),
        }
    curve = faithfulness_curve(
        spliced,
        batch,
        effects,
        ablation=cfg.ablation,
        ablate_errors=cfg.ablate_errors,
        progress=progress,
    )
    result = {
        "task": cfg.task,
        "model": loaded.model_name,
        "n_prompts": len(batch),
        "example_prompts": loaded.examples,
        "saes": [
            {"dir": str(d), "hook": s.cfg.hook, "d_sae": s.d_sae, "l0_on_prompts": l0}
            for d, s, l0 in zip(
                loaded.dirs, saes, l0_on_prompts(spliced, batch).values(), strict=True
            )
        ],
        "metrics": metrics,
        "top_features": [
            {"hook": hook, "feature": feature, "ie": ie}
            for hook, feature, ie in effects.top_features(cfg.k)
        ],
        "error_nodes": [{"hook": h, "ie": ie} for h, ie in effects.error_totals().items()],
        "ie_definition": "metric change, summed over positions, mean over prompts",
        "config": dataclasses.asdict(cfg),
    }
    out = Path(out)
    write_json(out / "faithfulness.json", curve)
    png = faithfulness_png(curve, f"{cfg.task} on {loaded.model_name}", mark_k=cfg.k)
    write_atomically(out / "faithfulness.png", lambda p: p.write_bytes(png))
    write_json(out / "circuit.json", result)
    result["faithfulness"] = curve
    return result


def run_compare(
    sae_specs: list[str | Path],
    cfg: CircuitConfig,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    out: str | Path = "runs/circuit",
    progress: bool = True,
) -> dict[str, Any]:
    """Two SAEs at one hook: top-k keeping of the larger-L0 one versus the one with L0 ≈ k."""
    loaded = _load(sae_specs, cfg, model_name, device)
    model, saes, batch = loaded.model, loaded.saes, loaded.batch
    if len(saes) != 2 or saes[0].cfg.hook != saes[1].cfg.hook:
        hooks = [s.cfg.hook for s in saes]
        raise SaelabError(
            f"--compare needs exactly two SAEs at the same hook, got {len(saes)} at {hooks}"
        )
    entries = []
    for d, sae in zip(loaded.dirs, saes, strict=True):
        spliced = SplicedModel(model, [sae])
        entries.append((d, sae, spliced, l0_on_prompts(spliced, batch)[sae.cfg.hook]))
    entries.sort(key=lambda e: -e[3])  # the larger L0 first
    with torch.no_grad():
        clean = summarise(clean_metric(model, batch))
        saes_out, variants = [], []
        for d, _, spliced, l0 in entries:
            label = f"{d.name} (L0 {l0:.1f})"
            saes_out.append({"label": label, "dir": str(d), "l0_on_prompts": l0})
            effects = None
            if cfg.rank_by == "attribution":
                with torch.enable_grad():
                    effects = node_effects(spliced, batch, cfg.method, ig_steps=cfg.ig_steps)
            runs = {
                "full": spliced.metric(batch, add_error=False),
                "full+error": spliced.metric(batch),
            }
            for add_error in (False, True):
                edits = _topk_edits(spliced, batch, cfg, add_error, effects)
                variant = f"top-{cfg.k}" + ("+error" if add_error else "")
                runs[variant] = spliced.metric(batch, edits)
            full = summarise(runs["full"])["logit_diff"]
            for variant, metric_N in runs.items():
                s = summarise(metric_N)
                variants.append(
                    {
                        "sae": label,
                        "variant": variant,
                        **s,
                        "frac_of_clean": _ratio(s["logit_diff"], clean["logit_diff"]),
                        "frac_of_full_sae": _ratio(s["logit_diff"], full),
                    }
                )
    result = {
        "task": cfg.task,
        "model": loaded.model_name,
        "hook": saes[0].cfg.hook,
        "n_prompts": len(batch),
        "example_prompts": loaded.examples,
        "k": cfg.k,
        "keep_per": cfg.keep_per,
        "clean": clean,
        "saes": saes_out,
        "variants": variants,
        "config": dataclasses.asdict(cfg),
    }
    out = Path(out)
    png = compare_png(result)
    write_atomically(out / "compare.png", lambda p: p.write_bytes(png))
    write_json(out / "compare.json", result)
    return result


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


# ---------------------------------------------------------------- text


def format_circuit_report(result: dict[str, Any]) -> str:
    """The metric table, the top features with their IE, error nodes, and the curve's points."""
    cfg = result["config"]
    lines = [
        f"task {result['task']} on {result['model']}: {result['n_prompts']} prompts; "
        f"top-k: k={cfg['k']} per {cfg['keep_per']} by {cfg['rank_by']}",
        "",
        f"{'metric':<14}{'logit_diff':>12}{'accuracy':>10}",
    ]
    for label, m in result["metrics"].items():
        lines.append(f"{label:<14}{m['logit_diff']:>12.4f}{m['accuracy']:>10.3f}")
    lines += [
        "",
        f"top {len(result['top_features'])} features by |IE| ({cfg['method']}; "
        f"IE = {result['ie_definition']})",
        f"{'rank':>4}  {'hook':<28}{'feature':>8}{'IE':>12}",
    ]
    for rank, row in enumerate(result["top_features"], start=1):
        lines.append(f"{rank:>4}  {row['hook']:<28}{row['feature']:>8}{row['ie']:>12.4f}")
    for row in result["error_nodes"]:
        lines.append(f"{'err':>4}  {row['hook']:<28}{'(error)':>8}{row['ie']:>12.4f}")
    curve = result.get("faithfulness")
    if curve:
        points = ", ".join(
            f"{n}: {f:.3f}" for n, f in zip(curve["n_features"], curve["faithfulness"], strict=True)
        )
        lines += ["", f"faithfulness ({curve['ablation']}-ablated) by features kept: {points}"]
    return "\n".join(lines)


def format_compare_report(result: dict[str, Any]) -> str:
    """One row per SAE and variant: mean logit difference, accuracy, share of clean."""
    clean = result["clean"]
    lines = [
        f"task {result['task']} on {result['model']} at {result['hook']}: "
        f"{result['n_prompts']} prompts; top-{result['k']} per {result['keep_per']}",
        "",
        f"{'sae':<52}{'variant':<16}{'logit_diff':>11}{'accuracy':>10}{'of clean':>10}",
        f"{'clean model':<52}{'':<16}{clean['logit_diff']:>11.4f}{clean['accuracy']:>10.3f}"
        f"{1.0:>10.3f}",
    ]
    for v in result["variants"]:
        share = "n/a" if v["frac_of_clean"] is None else f"{v['frac_of_clean']:.3f}"
        lines.append(
            f"{v['sae']:<52}{v['variant']:<16}{v['logit_diff']:>11.4f}{v['accuracy']:>10.3f}"
            f"{share:>10}"
        )
    return "\n".join(lines)
