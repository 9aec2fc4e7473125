"""Replacement sets built directly from random transcoders, for the graph tests.

Weights are random (no training) but not degenerate: encoder biases are shifted so that a few
features fire per token, decoder biases are nonzero, so every bias path of the frozen model is
exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from saelab.config import SAEConfig
from saelab.saes.clt import TopKCrossLayerTranscoder
from saelab.saes.replacement import (
    DEFAULT_INPUT_HOOK,
    DEFAULT_OUTPUT_HOOK,
    CrossLayerReplacement,
    PerLayerReplacement,
    Replacement,
    write_replacement_manifest,
)
from saelab.saes.storage import save_sae
from saelab.saes.transcoder import TopKSkipTranscoder, TopKTranscoder

K = 4
EXPANSION = 2


def _perturb(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 0.1 if name.startswith("b_") else 0.02
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def tiny_transcoders(
    model: PreTrainedModel, layers=None, *, skip: bool = False, seed: int = 0
) -> dict[int, TopKTranscoder]:
    """One random TopK (skip) transcoder per layer of ``model``'s MLPs."""
    d = model.config.hidden_size
    layers = range(model.config.num_hidden_layers) if layers is None else layers
    cls = TopKSkipTranscoder if skip else TopKTranscoder
    arch = "topk_skip_transcoder" if skip else "topk_transcoder"
    out = {}
    for layer in layers:
        cfg = SAEConfig(
            architecture=arch,
            hook=DEFAULT_INPUT_HOOK.format(layer=layer),
            output_hook=DEFAULT_OUTPUT_HOOK.format(layer=layer),
            k=K,
            expansion=EXPANSION,
        )
        tc = cls(cfg, d_in=d, d_out=d, seed=seed + layer)
        _perturb(tc, seed + 100 + layer)
        out[layer] = tc
    return out


def tiny_replacement(
    model: PreTrainedModel,
    kind: str = "per_layer",
    *,
    layers=None,
    skip: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Replacement:
    """A replacement set of ``model`` (every layer unless ``layers``) in ``dtype``."""
    n = model.config.num_hidden_layers
    if kind == "per_layer":
        rep = PerLayerReplacement(
            tiny_transcoders(model, layers, skip=skip, seed=seed), model="tiny", n_layers=n
        )
        return rep.to(dtype)
    layers = tuple(range(n) if layers is None else layers)
    cfg = SAEConfig(
        architecture="topk_clt",
        hook=DEFAULT_INPUT_HOOK.format(layer=layers[0]),
        output_hook=DEFAULT_OUTPUT_HOOK.format(layer=layers[0]),
        layers=layers,
        width=len(layers) * EXPANSION * model.config.hidden_size,
        k=K,
    )
    clt = TopKCrossLayerTranscoder(cfg, d_in=model.config.hidden_size, seed=seed)
    _perturb(clt, seed + 7)
    return CrossLayerReplacement(clt, model="tiny", n_layers=n).to(dtype)


def save_tiny_set(model: PreTrainedModel, folder: Path, model_name: str, layers=None) -> Path:
    """A per-layer set of random transcoders saved as a replacement-set folder."""
    tcs = tiny_transcoders(model, layers)
    members = []
    for layer, tc in tcs.items():
        name = f"layer{layer}"
        save_sae(tc, folder / name)
        members.append((layer, name))
    write_replacement_manifest(
        folder,
        kind="per_layer",
        model=model_name,
        n_layers=model.config.num_hidden_layers,
        layers=sorted(tcs),
        input_hook=DEFAULT_INPUT_HOOK,
        output_hook=DEFAULT_OUTPUT_HOOK,
        members=members,
    )
    return folder
