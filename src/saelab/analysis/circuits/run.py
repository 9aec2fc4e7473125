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
from saelab.models.loading import load_model
from saelab.saes.base import SparseAutoencoder
from saelab.saes.storage import find_sae_dirs, load_sae

log = logging.getLogger(__name__)

CIRCUIT_FILES = ("circuit.json", "faithfulness.json", "faithfulness.png")
COMPARE_FILES = ("compare.json", "compare.png")


def summarise(metric_N: Tensor) -> dict[str, float]:
    """Mean metric and accuracy (share of prompts with metric > 0: correct over incorrect)."""
    return {"logit_diff": float(metric_N.mean()), "accuracy": float((metric_N > 0).float().mean())}


@dataclass(frozen=True)
class _Experiment:
    """What both experiments share: the SAEs, model and tokenised task they start from, and how
    their result JSON is assembled and written."""

    cfg: CircuitConfig
    model: Any
    model_name: str
    dirs: list[Path]
    saes: list[SparseAutoencoder]
    batch: TaskBatch
    examples: list[str]

    @classmethod
    def load(
        cls, sae_specs: list[str | Path], cfg: CircuitConfig, model_name: str | None, device: str
    ) -> _Experiment:
        """The SAEs, the model (`model_name`, else the one the first SAE was trained on) and the
        task's prompts, tokenised, on `device`."""
        dirs = find_sae_dirs(sae_specs)
        saes = [load_sae(d, device=device) for d in dirs]
        name = model_name or str(saes[0].metadata.get("model_name") or "default")
        model, tokenizer = load_model(name, device=device)
        task = load_task(cfg.task, tokenizer, cfg.n_prompts, cfg.seed)
        if len(task.prompts) < cfg.n_prompts:
            log.info("the task has %d prompts (asked for %d)", len(task.prompts), cfg.n_prompts)
        batch = tokenize_task(task, tokenizer).to(device)
        return cls(cfg, model, name, dirs, saes, batch, list(task.prompts[:3]))

    def result(self, hook: str | None = None, **fields: Any) -> dict[str, Any]:
        """The result: task and model, `hook` where the experiment is at one, the prompts,
        `fields` in their order, and the config."""
        head: dict[str, Any] = {"task": self.cfg.task, "model": self.model_name}
        if hook is not None:
            head["hook"] = hook
        return {
            **head,
            "n_prompts": len(self.batch),
            "example_prompts": self.examples,
            **fields,
            "config": dataclasses.asdict(self.cfg),
        }

    @staticmethod
    def write(out: str | Path, name: str, result: dict[str, Any], extras: dict[str, Any]) -> None:
        """`extras` (PNG bytes, or anything else as JSON), then `result` as `name`, each
        atomically in `out`."""
        out = Path(out)
        # The result JSON goes last, so a folder that has it has every other file too.
        for file, content in [*extras.items(), (name, result)]:
            if isinstance(content, bytes):
                write_atomically(out / file, lambda p, data=content: p.write_bytes(data))
            else:
                write_json(out / file, content)


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
    exp = _Experiment.load(sae_specs, cfg, model_name, device)
    model, saes, batch = exp.model, exp.saes, exp.batch
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
    l0s = l0_on_prompts(spliced, batch).values()
    result = exp.result(
        saes=[
            {"dir": str(d), "hook": s.cfg.hook, "d_sae": s.d_sae, "l0_on_prompts": l0}
            for d, s, l0 in zip(exp.dirs, saes, l0s, strict=True)
        ],
        metrics=metrics,
        top_features=[
            {"hook": hook, "feature": feature, "ie": ie}
            for hook, feature, ie in effects.top_features(cfg.k)
        ],
        error_nodes=[{"hook": h, "ie": ie} for h, ie in effects.error_totals().items()],
        ie_definition="metric change, summed over positions, mean over prompts",
    )
    png = faithfulness_png(curve, f"{cfg.task} on {exp.model_name}", mark_k=cfg.k)
    exp.write(out, "circuit.json", result, {"faithfulness.json": curve, "faithfulness.png": png})
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
    exp = _Experiment.load(sae_specs, cfg, model_name, device)
    model, saes, batch = exp.model, exp.saes, exp.batch
    if len(saes) != 2 or saes[0].cfg.hook != saes[1].cfg.hook:
        hooks = [s.cfg.hook for s in saes]
        raise SaelabError(
            f"--compare needs exactly two SAEs at the same hook, got {len(saes)} at {hooks}"
        )
    entries = []
    for d, sae in zip(exp.dirs, saes, strict=True):
        spliced = SplicedModel(model, [sae])
        entries.append((d, spliced, l0_on_prompts(spliced, batch)[sae.cfg.hook]))
    entries.sort(key=lambda e: -e[2])  # the larger L0 first
    with torch.no_grad():
        clean = summarise(clean_metric(model, batch))
        saes_out, variants = [], []
        for d, spliced, l0 in entries:
            label = f"{d.name} (L0 {l0:.1f})"
            saes_out.append({"label": label, "dir": str(d), "l0_on_prompts": l0})
            variants += _compare_variants(spliced, batch, cfg, label, clean["logit_diff"])
    result = exp.result(
        hook=saes[0].cfg.hook,
        k=cfg.k,
        keep_per=cfg.keep_per,
        clean=clean,
        saes=saes_out,
        variants=variants,
    )
    exp.write(out, "compare.json", result, {"compare.png": compare_png(result)})
    return result


def _compare_variants(
    spliced: SplicedModel, batch: TaskBatch, cfg: CircuitConfig, label: str, clean: float
) -> list[dict[str, Any]]:
    """One SAE's rows of ``compare.json``: the full SAE and its top-k keeping, each with and
    without the error term, against the clean model's and the full SAE's metric."""
    effects = None
    if cfg.rank_by == "attribution":
        with torch.enable_grad():
            effects = node_effects(spliced, batch, cfg.method, ig_steps=cfg.ig_steps)
    runs = {"full": spliced.metric(batch, add_error=False), "full+error": spliced.metric(batch)}
    for add_error in (False, True):
        edits = _topk_edits(spliced, batch, cfg, add_error, effects)
        runs[f"top-{cfg.k}" + ("+error" if add_error else "")] = spliced.metric(batch, edits)
    full = summarise(runs["full"])["logit_diff"]
    rows = []
    for variant, metric_N in runs.items():
        s = summarise(metric_N)
        rows.append(
            {
                "sae": label,
                "variant": variant,
                **s,
                "frac_of_clean": _ratio(s["logit_diff"], clean),
                "frac_of_full_sae": _ratio(s["logit_diff"], full),
            }
        )
    return rows


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
