"""``saelab transfer``: how well each SAE works on the same hook type at other layers.

An SAE trained at ``blocks.6.hook_resid_post`` is evaluated, weights unchanged, on the
activations of ``blocks.{L}.hook_resid_post`` for every requested layer L. Each cell of the
matrix equals :func:`~saelab.evaluation.evaluate.evaluate_sae` of the moved SAE on the same
tokens, so a cell at the SAE's own layer equals its ordinary ``saelab eval`` metrics.

Example:
    >>> result = transfer_saes(["runs/sae/blocks.1.hook_resid_post-topk-x16-k32"], "0-2")
    >>> result["saes"][0]["cells"][1]["fvu"]
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saelab.atomic import write_atomically, write_json
from saelab.errors import MissingPackageError, SaelabError
from saelab.evaluation.evaluate import evaluate_saes
from saelab.models.hookpoints import hook_at_layer, hook_layer_and_suffix, n_layers, resolve_hook
from saelab.models.loading import load_model
from saelab.saes.base import SparseAutoencoder
from saelab.saes.storage import find_sae_dirs, load_sae

log = logging.getLogger(__name__)

TRANSFER_KEYS = ("fvu", "ce_loss_recovered", "delta_ce", "l0")
"""The metrics stored in each cell of ``transfer.json``."""

PLOTTED_KEYS = {"fvu": "FVU", "ce_loss_recovered": "CE loss recovered"}
"""Metric → heatmap title; one PNG ``transfer_{metric}.png`` each."""

TRANSFER_FILENAME = "transfer.json"

_LAYER_ITEM = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def parse_layers(spec: str) -> list[int]:
    """Layers from ``"2-10"`` (inclusive), ``"2,4,6"``, ``"3"`` or a mix (``"0-2,5"``).

    Sorted, without repeats. Raises a one-line :class:`SaelabError` on anything else.
    """
    layers: set[int] = set()
    for item in spec.split(","):
        match = _LAYER_ITEM.fullmatch(item)
        if match is None:
            raise SaelabError(
                f"cannot read layers {spec!r}; write a range 2-10, a list 2,4,6 or one layer 3"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise SaelabError(f"layer range {item.strip()!r} runs backwards; write {last}-{first}")
        layers.update(range(first, last + 1))
    return sorted(layers)


def sae_at_layer(sae: SparseAutoencoder, layer: int) -> SparseAutoencoder:
    """A view of ``sae`` that reads its hook type at ``layer``; the weights are shared, unchanged.

    A transcoder's output hook moves by the same number of layers as its input hook.
    """
    own, _ = hook_layer_and_suffix(sae.cfg.hook)
    changes = {"hook": hook_at_layer(sae.cfg.hook, layer)}
    if sae.cfg.output_hook is not None:
        out_layer, _ = hook_layer_and_suffix(sae.cfg.output_hook)
        changes["output_hook"] = hook_at_layer(sae.cfg.output_hook, out_layer + layer - own)
    # A shallow copy shares the parameter dicts: no weights are copied, and only the copy's cfg
    # attribute is replaced, so the original SAE keeps its own hook.
    moved = copy.copy(sae)
    moved.cfg = dataclasses.replace(sae.cfg, **changes)
    return moved


def check_layers(model, layers: Sequence[int], saes: Sequence[SparseAutoencoder]) -> None:
    """One-line errors for layers the model lacks or hooks it cannot resolve, before any work."""
    count = n_layers(model)
    outside = [layer for layer in layers if not 0 <= layer < count]
    if outside:
        raise SaelabError(
            f"layer(s) {', '.join(map(str, outside))} are outside this model, which has layers "
            f"0-{count - 1}; pass --layers within 0-{count - 1}"
        )
    for sae in saes:
        for layer in layers:
            moved = sae_at_layer(sae, layer)
            for hook in (moved.cfg.hook, moved.cfg.output_hook):
                if hook is not None:
                    resolve_hook(model, hook)


def transfer_matrix(
    saes: Sequence[SparseAutoencoder],
    model,
    tokenizer,
    layers: Sequence[int],
    *,
    labels: Sequence[str] | None = None,
    dataset: str = "default",
    tokens: int = 8192,
    context: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Every SAE evaluated at every layer of ``layers``, as the content of ``transfer.json``.

    ``result["saes"][i]["cells"][j]`` holds :data:`TRANSFER_KEYS` of SAE i at ``layers[j]``;
    ``labels`` (default: the SAEs' hooks) name the rows.
    """
    layers = list(layers)
    labels = list(labels) if labels is not None else [sae.cfg.hook for sae in saes]
    check_layers(model, layers, saes)
    # One evaluate_saes call shares each batch's clean pass (and each layer's ablated pass)
    # among all SAE × layer cells; a cell equals evaluate_sae of that moved SAE alone.
    moved = [sae_at_layer(sae, layer) for sae in saes for layer in layers]
    results = evaluate_saes(
        moved,
        model,
        tokenizer,
        dataset=dataset,
        tokens=tokens,
        context=context,
        progress=progress,
        check_reference=False,  # the clean-CE sanity check is eval's job, not the matrix's
    )
    metrics = iter(m for m, _ in results)
    rows = []
    for sae, label in zip(saes, labels, strict=True):
        cells = [
            {"layer": layer, **{key: float(m[key]) for key in TRANSFER_KEYS}}
            for layer, m in zip(layers, metrics, strict=False)
        ]
        rows.append(
            {
                "label": label,
                "hook": sae.cfg.hook,
                "layer": hook_layer_and_suffix(sae.cfg.hook)[0],
                "cells": cells,
            }
        )
    return {
        "layers": layers,
        "metrics": list(TRANSFER_KEYS),
        "dataset": dataset,
        "tokens": tokens,
        "context": context,
        "saes": rows,
    }


def transfer_saes(
    sae_dirs: Sequence[str | Path],
    layers: str | Sequence[int],
    *,
    model_name: str | None = None,
    dataset: str | None = None,
    tokens: int = 8192,
    context: int | None = None,
    device: str = "cpu",
    out: str | Path = "runs/transfer",
    progress: bool = True,
) -> dict[str, Any]:
    """Load the SAEs and the model once, fill the transfer matrix, write ``out/transfer.json`` and
    one heatmap per :data:`PLOTTED_KEYS` (``out/transfer_{metric}.png``).

    Model, text and context default to those recorded by the first SAE.
    """
    if not sae_dirs:
        raise SaelabError("no SAE folders given; pass one or more SAE_DIR")
    layer_list = parse_layers(layers) if isinstance(layers, str) else sorted(set(layers))
    # Run folders and globs expand as for `saelab eval`; a folder given twice is two rows.
    sae_dirs = [found for spec in sae_dirs for found in find_sae_dirs([spec])]
    saes = [load_sae(d, device=device) for d in sae_dirs]
    for sae in saes:
        hook_layer_and_suffix(sae.cfg.hook)  # fail on raw module paths before loading the model
    meta = saes[0].metadata
    model_name = model_name or str(meta.get("model_name") or "default")
    dataset = dataset or str(meta.get("dataset_path") or "default")
    context = context or int(meta.get("context_size") or 128)
    model, tokenizer = load_model(model_name, device=device)
    result = transfer_matrix(
        saes,
        model,
        tokenizer,
        layer_list,
        labels=[str(d) for d in sae_dirs],
        dataset=dataset,
        tokens=tokens,
        context=context,
        progress=progress,
    )
    result = {"model": model_name, **result}
    out = Path(out)
    write_json(out / TRANSFER_FILENAME, result)
    for metric in PLOTTED_KEYS:
        plot_transfer(result, metric, out / f"transfer_{metric}.png")
    log.info("transfer matrix written to %s", out)
    return result


def _short_labels(result: dict[str, Any]) -> list[str]:
    """Row names: the trained hook, with the folder name when two SAEs share a hook."""
    hooks = [row["hook"] for row in result["saes"]]
    return [
        row["hook"]
        if hooks.count(row["hook"]) == 1
        else f"{row['hook']} ({Path(row['label']).name})"
        for row in result["saes"]
    ]


def plot_transfer(result: dict[str, Any], metric: str, path: str | Path) -> Path:
    """Heatmap of ``metric`` (rows: SAEs, columns: layers), cells annotated, each SAE's own layer
    outlined; written atomically as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingPackageError(
            "heatmaps need matplotlib; install it with: pip install matplotlib"
        ) from exc
    layers = result["layers"]
    values = [[cell[metric] for cell in row["cells"]] for row in result["saes"]]
    labels = _short_labels(result)
    # Room for the longest row label beside the cells, so that nothing is cut off.
    width = 3.0 + 0.8 * len(layers) + 0.08 * max(len(label) for label in labels)
    fig, ax = plt.subplots(figsize=(width, max(2.5, 1.2 + 0.5 * len(labels))))
    try:
        # Low FVU and high CE recovered are both good: a reversed map for FVU keeps good = green.
        cmap = "RdYlGn_r" if metric in ("fvu", "delta_ce") else "RdYlGn"
        image = ax.imshow(values, cmap=cmap, aspect="auto")
        fig.colorbar(image, ax=ax)
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("evaluated at layer")
        ax.set_title(f"{PLOTTED_KEYS.get(metric, metric)} (boxed: trained layer)", fontsize=10)
        for i, row in enumerate(result["saes"]):
            for j, value in enumerate(values[i]):
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=8)
            if row["layer"] in layers:
                j = layers.index(row["layer"])
                ax.add_patch(
                    plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", lw=2.5)
                )
        fig.tight_layout()
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return Path(path)


def format_transfer_table(result: dict[str, Any], metric: str) -> str:
    """A plain-text table of ``metric``: one row per SAE, one column per layer; ``*`` marks the
    SAE's own layer."""
    labels = _short_labels(result)
    width = max(len(label) for label in [*labels, metric])
    header = f"{metric:<{width}}" + "".join(f"  {f'L{layer}':>10}" for layer in result["layers"])
    lines = [header]
    for label, row in zip(labels, result["saes"], strict=True):
        cells = "".join(
            f"  {cell[metric]:>9.4g}{'*' if cell['layer'] == row['layer'] else ' '}"
            for cell in row["cells"]
        )
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)
