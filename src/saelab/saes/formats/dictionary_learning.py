"""``dictionary_learning`` (saprmarks): ``config.json`` and the state dict of a ``dict_class``.

``config.json`` holds ``trainer.dict_class``, ``activation_dim``, ``dict_size``, ``k``, ``layer``,
``lm_name`` and ``submodule_name``; ``ae.safetensors`` the state dict of its ``dict_class``, which
:data:`DL_CLASSES` maps to a saelab architecture. Its own ``ae.pt`` is a pickle, which saelab never
loads. saelab's own section sits in ``config.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.atomic import write_json, write_safetensors
from saelab.errors import SaelabError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.formats.common import (
    OWN_SECTION,
    LoadedSAE,
    SAEFormat,
    TensorLayout,
    build_sae,
    check_tensors,
    own_section,
    positive_int,
    read_json_object,
    recentred,
)
from saelab.saes.formats.sparsify import SPARSIFY_ARCHITECTURES
from saelab.saes.storage import read_weights
from saelab.safetensors_check import NUMBER_DTYPES, check_finite

DL_CONFIG = "config.json"
DL_WEIGHTS = "ae.safetensors"
DL_PICKLE = "ae.pt"


@dataclass(frozen=True)
class _DLClass:
    """One ``dict_class`` of dictionary_learning and the saelab architecture it maps to."""

    trainer_class: str
    architecture: str
    apply_b_dec: bool
    """Whether its encoder subtracts the decoder bias first."""
    layout: TensorLayout
    buffers: tuple[str, ...] = ()
    """Non-weight entries of its state dict: ``k``, the scalar ``threshold``, ``group_sizes``."""


_DL_LINEAR_TOPK = TensorLayout(
    {
        "encoder.weight": ("W_enc", True),
        "encoder.bias": ("b_enc", False),
        "decoder.weight": ("W_dec", True),
        "b_dec": ("b_dec", False),
    }
)
_DL_PARAMETERS = TensorLayout(
    {name: (name, False) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
)
DL_CLASSES: dict[str, _DLClass] = {
    # ReLU(encoder(x − bias)), decoder(f) + bias: Towards Monosemanticity.
    "AutoEncoder": _DLClass(
        "StandardTrainer",
        "relu",
        True,
        TensorLayout(
            {
                "encoder.weight": ("W_enc", True),
                "encoder.bias": ("b_enc", False),
                "decoder.weight": ("W_dec", True),
                "bias": ("b_dec", False),
            }
        ),
    ),
    # ReLU(encoder(x)), decoder(f) with its bias: the April-2024 update, like saelab's relu.
    "AutoEncoderNew": _DLClass(
        "StandardTrainerAprilUpdate",
        "relu",
        False,
        TensorLayout(
            {
                "encoder.weight": ("W_enc", True),
                "encoder.bias": ("b_enc", False),
                "decoder.weight": ("W_dec", True),
                "decoder.bias": ("b_dec", False),
            }
        ),
    ),
    # TopK_k(ReLU(encoder(x − b_dec))); `threshold` only serves encode(use_threshold=True).
    "AutoEncoderTopK": _DLClass("TopKTrainer", "topk", True, _DL_LINEAR_TOPK, ("k", "threshold")),
    # Inference keeps ReLU(encoder(x − b_dec)) above one learnt threshold, as saelab's batchtopk.
    "BatchTopKSAE": _DLClass(
        "BatchTopKTrainer", "batchtopk", True, _DL_LINEAR_TOPK, ("k", "threshold")
    ),
    # BatchTopK's inference; `group_sizes` are the nested groups (all active by default).
    "MatryoshkaBatchTopKSAE": _DLClass(
        "MatryoshkaBatchTopKTrainer",
        "matryoshka",
        True,
        _DL_PARAMETERS,
        ("k", "threshold", "group_sizes"),
    ),
    # ReLU(z · 1[z > θ]) with z = x W_enc + b_enc (its apply_b_dec_to_input is False, unsaved).
    "JumpReluAutoEncoder": _DLClass(
        "JumpReluTrainer",
        "jumprelu",
        False,
        TensorLayout({**_DL_PARAMETERS.tensors, "threshold": ("threshold", False)}),
    ),
    # 1[encoder(x̃) + gate_bias > 0] · ReLU(exp(r_mag) encoder(x̃) + mag_bias), x̃ = x − decoder_bias.
    "GatedAutoEncoder": _DLClass(
        "GatedSAETrainer",
        "gated",
        True,
        TensorLayout(
            {
                "encoder.weight": ("W_enc", True),
                "gate_bias": ("b_gate", False),
                "r_mag": ("r_mag", False),
                "mag_bias": ("b_mag", False),
                "decoder.weight": ("W_dec", True),
                "decoder_bias": ("b_dec", False),
            }
        ),
    ),
}
"""The dictionary_learning classes saelab reads and writes, by their ``dict_class`` name."""

_DL_SUBMODULE = re.compile(r"(resid_post|resid_pre|mlp_out|attn_out)_layer_(\d+)")
"""dictionary_learning's usual ``submodule_name``, e.g. ``resid_post_layer_3``."""


def _dl_class_for(sae: SparseAutoencoder) -> str:
    """The dictionary_learning class that runs ``sae``'s forward."""
    if sae.architecture == "relu":
        # Both exist, so no bias needs folding: exact in both directions.
        return "AutoEncoder" if sae.apply_b_dec_to_input else "AutoEncoderNew"
    for name, spec in DL_CLASSES.items():
        if spec.architecture == sae.architecture:
            return name
    also = " or sparsify" if sae.architecture in SPARSIFY_ARCHITECTURES else ""
    raise SaelabError(
        f"dictionary_learning has no class for saelab's {sae.architecture!r} SAEs; "
        f"choose --to saelens{also}"
    )


def _holds_dictionary_learning(path: Path) -> bool:
    return (path / DL_WEIGHTS).is_file() or (path / DL_PICKLE).is_file()


def _read_dictionary_learning(path: Path, hook: str | None, output_hook: str | None) -> LoadedSAE:
    weights_path, cfg_path = path / DL_WEIGHTS, path / DL_CONFIG
    if not weights_path.is_file() and (path / DL_PICKLE).is_file():
        pickle = path / DL_PICKLE
        raise SaelabError(
            f"{pickle} is a pickle, which saelab never loads; convert it yourself with "
            f'python -c "import torch, safetensors.torch as st; st.save_file({{k: v.contiguous() '
            f"for k, v in torch.load('{pickle}', weights_only=True).items()}}, "
            f"'{weights_path}')\" and run again"
        )
    if not weights_path.is_file():
        raise SaelabError(
            f"{weights_path} is missing; the dictionary_learning folder is incomplete"
        )
    cfg = read_json_object(cfg_path, "dictionary_learning")
    trainer = cfg.get("trainer")
    if not isinstance(trainer, dict):
        raise SaelabError(
            f"{cfg_path} has no 'trainer' section; it is not a dictionary_learning config"
        )
    dict_class = trainer.get("dict_class")
    if dict_class not in DL_CLASSES:
        raise SaelabError(
            f"{cfg_path} names dict_class {dict_class!r}, not supported yet; supported: "
            f"{', '.join(DL_CLASSES)}"
        )
    spec = DL_CLASSES[dict_class]
    d_in = positive_int(trainer, "activation_dim", cfg_path)
    d_sae = positive_int(trainer, "dict_size", cfg_path)
    # Its state dicts hold integer buffers (k, group_sizes) beside the float weights.
    fix = "re-export the SAE with dictionary_learning or saelab"
    tensors = read_weights(weights_path, dtypes=NUMBER_DTYPES, fix=fix)
    check_finite(tensors, weights_path, fix=fix)
    expected: dict[str, tuple[Any, ...]] = spec.layout.shapes(d_in, d_sae, d_in)
    expected |= {name: () for name in ("k", "threshold") if name in spec.buffers}
    if "group_sizes" in spec.buffers:
        sizes = tensors.get("group_sizes")
        one_dim = sizes is not None and sizes.ndim == 1
        expected["group_sizes"] = tuple(sizes.shape) if one_dim else ("n_groups",)
    dims = f"{DL_CONFIG} (activation_dim={d_in}, dict_size={d_sae})"
    check_tensors(tensors, expected, weights_path, dims)
    weights = spec.layout.to_saelab(tensors)
    notes: list[str] = []
    settings = _dl_buffers(tensors, spec, dict_class, trainer, weights, notes, cfg_path)
    if "threshold" in weights:
        # ReLU(z · 1[z > θ]) = z · 1[z > max(θ, 0)]: saelab's thresholds are ≥ 0.
        weights["threshold"] = weights["threshold"].clamp_min(0)

    own = cfg.get(OWN_SECTION) if isinstance(cfg.get(OWN_SECTION), dict) else {}
    hook = hook or own.get("hook") or _dl_hook(trainer, notes)
    metadata = own.get("metadata")
    if metadata is None:
        metadata = {"model_name": trainer["lm_name"]} if trainer.get("lm_name") else {}
    sae = build_sae(
        spec.architecture,
        f"a dictionary_learning {dict_class}",
        path,
        weights,
        d_in=d_in,
        d_sae=d_sae,
        apply_b_dec=spec.apply_b_dec,
        hook=hook,
        settings=settings,
        own=own,
        metadata=metadata,
    )
    return LoadedSAE(sae, "dictionary_learning", notes)


def _dl_buffers(
    tensors: dict[str, Tensor],
    spec: _DLClass,
    dict_class: str,
    trainer: dict[str, Any],
    weights: dict[str, Tensor],
    notes: list[str],
    cfg_path: Path,
) -> dict[str, Any]:
    """Config settings from the scalar buffers (``k``, nested group sizes); a shared threshold
    goes into ``weights`` as saelab's per-feature ``threshold``."""
    settings: dict[str, Any] = {}
    if "k" in spec.buffers:
        settings["k"] = k = int(tensors["k"].item())
        if isinstance(trainer.get("k"), int) and trainer["k"] != k:
            raise SaelabError(
                f"{cfg_path} says k={trainer['k']} but {DL_WEIGHTS} holds k={k}; "
                "the weights and the config do not belong together"
            )
    if "group_sizes" in spec.buffers:
        sizes = [int(n) for n in tensors["group_sizes"].tolist()]
        d_sae = weights["W_dec"].shape[0]
        if min(sizes) < 1 or sum(sizes) != d_sae:
            raise SaelabError(
                f"group_sizes {sizes} in {DL_WEIGHTS} must be positive and sum to dict_size={d_sae}"
            )
        settings["matryoshka_widths"] = tuple(torch.tensor(sizes).cumsum(0).tolist())
    if "threshold" in spec.buffers:
        threshold = float(tensors["threshold"].item())
        if spec.architecture == "topk":
            if threshold >= 0:
                notes.append(
                    f"dropped {dict_class}'s optional threshold {threshold:.4g} (used only by "
                    "encode(use_threshold=True)); saelab runs its default top-k encode"
                )
        else:
            if threshold < 0:
                notes.append(
                    f"{dict_class}'s threshold was never learnt (it is {threshold:g}), so its "
                    "forward keeps every positive activation: saelab's threshold 0 does the same"
                )
            weights["threshold"] = torch.full((weights["W_dec"].shape[0],), threshold)
    return settings


def _dl_hook(trainer: dict[str, Any], notes: list[str]) -> str:
    """saelab's hook name from ``submodule_name`` (``resid_post_layer_3`` →
    ``blocks.3.hook_resid_post``); any other name is kept raw."""
    submodule, layer = trainer.get("submodule_name"), trainer.get("layer")
    if isinstance(submodule, str) and submodule:
        match = _DL_SUBMODULE.fullmatch(submodule)
        if match:
            return f"blocks.{match.group(2)}.hook_{match.group(1)}"
        if submodule.startswith("blocks."):
            return submodule
        notes.append(
            f"kept dictionary_learning's submodule_name '{submodule}' as the hook name; "
            "pass --hook with saelab's name for it (see: saelab hooks MODEL)"
        )
        return submodule
    where = f" (trainer.layer={layer})" if layer is not None else ""
    notes.append(
        f"{DL_CONFIG} names no submodule{where}, so the SAE has no hook name; pass --hook, "
        "e.g. --hook blocks.N.hook_resid_post"
    )
    return ""


def _dl_location(hook: str) -> tuple[int | None, str]:
    """``(layer, submodule_name)`` as dictionary_learning's scripts name them."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_post|resid_pre|mlp_out|attn_out)", hook)
    if match:
        return int(match.group(1)), f"{match.group(2)}_layer_{match.group(1)}"
    match = re.match(r"blocks\.(\d+)\.", hook)
    return (int(match.group(1)) if match else None), hook


def _write_dictionary_learning(sae: SparseAutoencoder, folder: Path) -> list[str]:
    dict_class = _dl_class_for(sae)
    spec = DL_CLASSES[dict_class]
    notes: list[str] = []
    tensors = sae.folded_state_dict()
    if sae.apply_b_dec_to_input != spec.apply_b_dec:
        tensors = recentred(tensors, sae.apply_b_dec_to_input, spec.apply_b_dec)
        notes.append(
            f"folded b_dec into the encoder bias ({dict_class} "
            f"{'always' if spec.apply_b_dec else 'never'} subtracts it before encoding); "
            "outputs agree up to float rounding"
        )
    state = spec.layout.from_saelab(tensors)
    trainer: dict[str, Any] = {
        "trainer_class": spec.trainer_class,
        "dict_class": dict_class,
        "activation_dim": sae.d_in,
        "dict_size": sae.d_sae,
    }
    if "k" in spec.buffers:
        trainer["k"] = k = min(sae.cfg.k, sae.d_sae)
        state["k"] = torch.tensor(k, dtype=torch.int32)  # dictionary_learning's dtype
    if "group_sizes" in spec.buffers:
        ends = sae.cfg.matryoshka_widths_for(sae.d_sae)
        trainer["group_sizes"] = sizes = [b - a for a, b in zip((0, *ends), ends, strict=False)]
        state["group_sizes"] = torch.tensor(sizes)
    if "threshold" in spec.buffers:
        # One shared θ (batchtopk's); −1 marks AutoEncoderTopK's as "not learnt".
        shared = float(tensors["threshold"][0]) if "threshold" in tensors else -1.0
        state["threshold"] = torch.tensor(shared, dtype=torch.float32)
    write_safetensors(folder / DL_WEIGHTS, state)
    layer, submodule = _dl_location(sae.cfg.hook)
    trainer |= {
        "layer": layer,
        "lm_name": sae.metadata.get("model_name"),
        "submodule_name": submodule,
    }
    write_json(folder / DL_CONFIG, {"trainer": trainer, OWN_SECTION: own_section(sae)})
    notes.append(
        f"dictionary_learning loads it with {dict_class}(...).load_state_dict("
        f"safetensors.torch.load_file('{DL_WEIGHTS}'))"
    )
    return notes


FORMAT = SAEFormat(
    "dictionary_learning",
    f"{DL_CONFIG} + {DL_WEIGHTS}",
    _holds_dictionary_learning,
    _read_dictionary_learning,
    _write_dictionary_learning,
)
