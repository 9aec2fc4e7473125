"""``saelab eval SET_DIR``: a replacement set measured member by member and all at once.

Per batch of text, three forward passes of the model:

* **clean**, capturing every covered layer's MLP input and output: each member's reconstruction
  metrics (``fvu``, ``mse``, ``explained_variance``, ``l0``) from the clean inputs, as
  ``saelab eval`` scores one transcoder;
* **spliced, all at once**: at every covered layer the MLP output is replaced by the
  replacement's prediction from *that pass's* MLP inputs (so each layer sees the errors of the
  layers before it, and a cross-layer transcoder's features read earlier spliced layers);
* **ablated**: every covered MLP output zero at once.

Replacement happens at the kept positions only (not position 0, not special tokens), CE and KL
are averaged over them, as for one SAE (:mod:`saelab.evaluation.splice`):
``ce_loss_recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)``, with the ablation
of all covered MLPs as the baseline: a much larger damage than one layer's, so compare
``delta_ce`` and ``kl`` across sets as well.

Writes ``SET_DIR/replacement_metrics.json`` and ``SET_DIR/replacement_fvu.png``.

Example::

    result = evaluate_replacement_dir("runs/replacement-30", tokens=4096)
    result["all_at_once"]["ce_loss_recovered"], result["mean_fvu"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.atomic import write_json
from saelab.errors import SaelabError
from saelab.evaluation.splice import (
    SpliceSums,
    clean_pass,
    eval_batches,
)
from saelab.models.intervene import patch
from saelab.models.loading import load_model
from saelab.outputs import check_output_location
from saelab.saes.metrics import ReconstructionStats
from saelab.saes.replacement import Replacement, find_replacement_dir, load_replacement

METRICS_FILENAME = "replacement_metrics.json"
PLOT_FILENAME = "replacement_fvu.png"
MEMBER_KEYS = ("fvu", "mse", "explained_variance", "l0")
"""Per-member metrics (each layer's output hook), as ``saelab eval`` reports for one SAE."""


def _spliced_patches(rep: Replacement, keep_NP: torch.Tensor, zero: bool = False) -> dict:
    """Patch functions for one pass: each input hook records its activations (and the
    features read there), each output hook is replaced by the prediction from them."""
    inputs: dict[int, torch.Tensor] = {}
    acts: dict[int, torch.Tensor] = {}
    fns: dict[str, Any] = {}

    def read(layer: int):
        def fn(x_NPD: torch.Tensor) -> torch.Tensor:
            inputs[layer] = x_NPD
            acts[layer] = rep.encode(layer, x_NPD.float())
            return x_NPD

        return fn

    def write(dst: int):
        def fn(y_NPD: torch.Tensor) -> torch.Tensor:
            if zero:
                new = torch.zeros_like(y_NPD)
            else:
                new = rep.b_dec(dst).expand_as(y_NPD).clone()
                for src in rep.layers:
                    if src > dst:
                        break
                    W = rep.decoder(src, dst)
                    if W is not None:
                        new = new + acts[src] @ W
                W_skip = rep.skip(dst)
                if W_skip is not None:
                    new = new + inputs[dst].float() @ W_skip.T
            return torch.where(keep_NP[..., None], new.to(y_NPD.dtype), y_NPD)

        return fn

    for layer in rep.layers:
        if not zero:
            fns[rep.input_hook(layer)] = read(layer)
        fns[rep.output_hook(layer)] = write(layer)
    return fns


@torch.no_grad()
def evaluate_replacement(
    rep: Replacement,
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
) -> dict[str, Any]:
    """Per-member reconstruction metrics and the CE / KL of the model with every member spliced
    at once (see the module docstring). ``rep`` is checked against ``model`` first."""
    rep.check_model(model)
    device = next(model.parameters()).device
    rep.to(device=device)
    hooks = [h for layer in rep.layers for h in (rep.input_hook(layer), rep.output_hook(layer))]
    stats = {layer: ReconstructionStats(rep.d_out, rep.d_sae(layer)) for layer in rep.layers}
    sums = SpliceSums()
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
    bar = tqdm(total=n_batches, disable=not progress, desc="eval replacement", unit="batch")
    for tokens_NP, keep_NP in batches:
        clean_NPV, clean = clean_pass(model, tokens_NP, hooks)
        x_in = {layer: clean[rep.input_hook(layer)][keep_NP].float() for layer in rep.layers}
        feats = {layer: rep.encode(layer, x) for layer, x in x_in.items()}
        predicted = rep.reconstruct(feats, x_in)
        for layer in rep.layers:
            target_TD = clean[rep.output_hook(layer)][keep_NP].float()
            fired_TF = feats[layer] > 0
            stats[layer].update(target_TD, predicted[layer], fired_TF.sum(-1), fired_TF.sum(0))
        with patch(model, _spliced_patches(rep, keep_NP)):
            spliced_NPV = model(tokens_NP, use_cache=False).logits
        with patch(model, _spliced_patches(rep, keep_NP, zero=True)):
            ablated_NPV = model(tokens_NP, use_cache=False).logits
        sums.add_passes(keep_NP, tokens_NP, clean_NPV, spliced_NPV, ablated_NPV)
        bar.update(1)
    bar.close()
    if sums.n_positions == 0:
        raise SaelabError(f"no evaluation tokens came from {dataset!r}; pass a larger dataset")
    members = {}
    for layer, stat in stats.items():
        values = stat.compute()
        members[str(layer)] = {key: float(values[key]) for key in MEMBER_KEYS}
    fvus = [m["fvu"] for m in members.values()]
    return {
        "kind": rep.kind,
        "model": rep.model,
        "layers": rep.layers,
        "dataset": dataset,
        "context": context,
        "tokens": sums.n_positions,
        "members": members,
        "mean_fvu": sum(fvus) / len(fvus),
        "min_fvu": min(fvus),
        "max_fvu": max(fvus),
        "all_at_once": sums.compute(),
    }


def evaluate_replacement_dir(
    path: str | Path,
    *,
    model_name: str | None = None,
    dataset: str | None = None,
    tokens: int = 8192,
    context: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Load the set at ``path`` (a set folder or a run folder holding one), evaluate it on its
    model, text and context unless overridden, write ``replacement_metrics.json`` and the FVU
    plot into the set folder; returns the result (with ``path``)."""
    folder = find_replacement_dir(path)
    check_output_location(folder, what="replacement set folder")
    rep = load_replacement(folder, device=device)
    meta = rep.members()[0][1].metadata
    name = model_name or rep.model
    text = dataset or str(meta.get("dataset_path") or "default")
    ctx = context or int(meta.get("context_size") or 128)
    model, tokenizer = load_model(name, device=device)
    result = evaluate_replacement(
        rep, model, tokenizer, dataset=text, tokens=tokens, context=ctx, progress=progress
    )
    result["model"] = name
    write_json(folder / METRICS_FILENAME, result)
    _plot_fvu(result, folder / PLOT_FILENAME)
    result["path"] = str(folder / METRICS_FILENAME)
    return result


def _plot_fvu(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    from saelab.atomic import write_atomically
    from saelab.evaluation.plots import _png

    layers = [int(k) for k in result["members"]]
    fvus = [result["members"][str(k)]["fvu"] for k in layers]
    fig = Figure(figsize=(max(4, 0.25 * len(layers) + 2), 3))
    ax = fig.subplots()
    ax.bar(layers, fvus, color="#4c72b0")
    ax.set_xlabel("layer")
    ax.set_ylabel("FVU (MLP output)")
    at_once = result["all_at_once"]
    ax.set_title(
        f"mean FVU {result['mean_fvu']:.3f}; all spliced: CE {at_once['ce_loss_spliced']:.3f} "
        f"vs {at_once['ce_loss_clean']:.3f} clean, recovered {at_once['ce_loss_recovered']:.3f}",
        fontsize=8,
    )
    fig.tight_layout()
    png = _png(fig)
    write_atomically(path, lambda tmp: Path(tmp).write_bytes(png))


def format_replacement_table(result: dict[str, Any]) -> str:
    """One row per member and the all-at-once line."""
    lines = [f"{'layer':>5}  " + "  ".join(f"{k:>18}" for k in MEMBER_KEYS)]
    for layer, values in result["members"].items():
        lines.append(f"{layer:>5}  " + "  ".join(f"{values[k]:>18.4g}" for k in MEMBER_KEYS))
    a = result["all_at_once"]
    lines.append(
        f"mean FVU {result['mean_fvu']:.4f} (range {result['min_fvu']:.4f} to "
        f"{result['max_fvu']:.4f}) over {len(result['members'])} layer(s)"
    )
    lines.append(
        f"all {len(result['members'])} spliced at once: CE clean {a['ce_loss_clean']:.4f}, "
        f"spliced {a['ce_loss_spliced']:.4f}, all MLPs ablated {a['ce_loss_ablated']:.4f}, "
        f"recovered {a['ce_loss_recovered']:.4f}, KL {a['kl']:.4f} "
        f"({result['tokens']:,} positions)"
    )
    return "\n".join(lines)
