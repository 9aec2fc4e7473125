"""Saved SAEs: a directory in the SAELens layout, read and written by saelab and SAELens alike.

``cfg.json`` (SAELens v6 fields plus a ``saelab`` section), ``sae_weights.safetensors``
(``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``; model units, the
activation scale folded in) and ``sparsity.safetensors`` (log10 feature density). Every file is
written to a temp name and renamed; weights are only ever read from safetensors.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import typing
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch

from saelab import __version__
from saelab.atomic import write_json, write_safetensors
from saelab.config import SAEConfig, type_name, value_fits
from saelab.errors import SaelabError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.registry import architecture_class, from_saelens_architecture
from saelab.safetensors_check import FLOAT_DTYPES, check_finite, read_tensors

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""SAELens reads configs of this version or newer without its pre-6 conversions."""


def sae_cfg_dict(sae: SparseAutoencoder, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """``cfg.json`` content: what SAELens' ``SAE.load_from_disk`` needs, and saelab's own."""
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "hook_name": sae.cfg.hook,
        "hook_head_index": None,
        "prepend_bos": True,
        "exclude_special_tokens": True,
    }
    if sae.cfg.output_hook is not None:  # a transcoder: SAELens reads its output hook here
        meta["hook_name_out"] = sae.cfg.output_hook
    meta.update(metadata or {})
    cfg: dict[str, Any] = {
        "architecture": sae.saelens_architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        "saelab": {
            "version": __version__,
            "architecture": sae.architecture,
            "sae": dataclasses.asdict(sae.cfg),
            "activation_scale_folded": float(sae.activation_scale),
        },
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.cfg.k
        cfg["rescale_acts_by_decoder_norm"] = False
    if sae.cfg.output_hook is not None:  # SAELens' TranscoderConfig field
        cfg["d_out"] = sae.d_out
        cfg["saelab"]["output_scale_folded"] = float(sae.output_scale)
    return cfg


def save_sae(
    sae: SparseAutoencoder,
    directory: str | Path,
    *,
    log10_density: torch.Tensor | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` to ``directory`` in model units (the activation scale folded in)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS_FILENAME, sae.folded_state_dict())
    if log10_density is not None:
        write_safetensors(directory / SPARSITY_FILENAME, {"sparsity": log10_density.float()})
    # cfg.json last: a directory with a cfg.json is a complete SAE.
    write_json(directory / CFG_FILENAME, sae_cfg_dict(sae, metadata))
    return directory


def read_sae_cfg(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    cfg_path = directory / CFG_FILENAME
    if not cfg_path.is_file():
        raise SaelabError(
            f"{directory} is not a saved SAE (no {CFG_FILENAME}); pass the folder that "
            f"holds {CFG_FILENAME} and {WEIGHTS_FILENAME}"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaelabError(f"{cfg_path} is not valid JSON ({exc}); re-save the SAE") from exc
    if not isinstance(cfg, dict):
        raise SaelabError(
            f"{cfg_path} holds a JSON {type(cfg).__name__}, not an object; re-save the SAE"
        )
    return cfg


RESAVE = "re-save or re-download the SAE"
"""The end of every message about a damaged weights file."""


def read_weights(
    path: Path, *, dtypes: Collection[str] = FLOAT_DTYPES, fix: str = RESAVE
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, its header checked first
    (:mod:`saelab.safetensors_check`): a damaged or hostile file, or a dtype outside ``dtypes``,
    gives a one-line error ending in ``fix``."""
    if not path.is_file():
        raise SaelabError(f"{path} is missing; the SAE folder is incomplete")
    return read_tensors(path, fix=fix, dtypes=dtypes)


_CFG_TYPES: dict[str, type] = {
    "architecture": str,
    "hook_name": str,
    "hook_point": str,
    "hook_name_out": str,
    "activation_fn_str": str,
    "activation_fn_kwargs": dict,
    "normalize_activations": str,
    "apply_b_dec_to_input": bool,
    "rescale_acts_by_decoder_norm": bool,
    "metadata": dict,
    "saelab": dict,
}
"""cfg.json fields saelab reads, and their JSON types (each may also be null)."""


def _check_cfg_types(cfg: dict[str, Any], cfg_path: Path) -> None:
    """One-line errors naming the first cfg.json field saelab reads whose value has the wrong
    type, before any of them is used."""

    def wrong(field: str, value: Any, want: str) -> SaelabError:
        shown = json.dumps(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return SaelabError(
            f"{cfg_path} has {field} = {shown}, not {want}; correct it or re-save the SAE"
        )

    for key in ("d_in", "d_sae"):
        if not _positive_int(cfg.get(key)):
            raise wrong(key, cfg.get(key), "a positive integer")
    for key in ("d_out", "k"):
        if cfg.get(key) is not None and not _positive_int(cfg[key]):
            raise wrong(key, cfg[key], "a positive integer")
    for key, kind in _CFG_TYPES.items():
        if cfg.get(key) is not None and not isinstance(cfg[key], kind):
            raise wrong(key, cfg[key], f"a JSON {_JSON_NAMES[kind]}")
    for key in ("hook_name", "hook_name_out"):
        value = (cfg.get("metadata") or {}).get(key)
        if value is not None and not isinstance(value, str):
            raise wrong(f"metadata.{key}", value, "a JSON string")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if k is not None and not _positive_int(k):
        raise wrong("activation_fn_kwargs.k", k, "a positive integer")
    own = cfg.get("saelab")
    if own is None:
        return
    if not isinstance(own.get("architecture"), str):
        raise wrong("saelab.architecture", own.get("architecture"), "an architecture name")
    if not isinstance(own.get("sae"), dict):
        raise wrong("saelab.sae", own.get("sae"), "a JSON object of SAE settings")
    hints = typing.get_type_hints(SAEConfig)
    for key, value in own["sae"].items():
        if key in hints and not value_fits(value, hints[key]):
            raise wrong(f"saelab.sae.{key}", value, f"of type {type_name(hints[key])}")


_JSON_NAMES = {str: "string", dict: "object", bool: "boolean (true or false)"}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _sae_config_from_saelens(cfg: dict[str, Any]) -> tuple[str, SAEConfig, bool]:
    """(saelab architecture, SAEConfig, apply_b_dec_to_input) from a SAELens cfg.json."""
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point") or ""
    architecture = cfg.get("architecture")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if architecture is None:  # SAELens < 6 wrote the activation function instead
        architecture = "topk" if cfg.get("activation_fn_str") == "topk" else "standard"
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in ("none", "expected_average_only_in", None):
        raise SaelabError(
            f"normalize_activations={normalize!r} (a per-token normalisation) is not supported; "
            "only SAEs with 'none' or a folded 'expected_average_only_in' scale load"
        )
    cls = from_saelens_architecture(architecture)
    fields: dict[str, Any] = {"hook": hook, "architecture": cls.architecture, "width": cfg["d_sae"]}
    if k is not None:
        fields["k"] = int(k)
    if cls.is_transcoder:
        # SAELens splices a transcoder without hook_name_out at its input hook.
        fields["output_hook"] = meta.get("hook_name_out") or cfg.get("hook_name_out") or hook
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", cls.default_apply_b_dec_to_input))
    return cls.architecture, SAEConfig(**fields), apply_b_dec


def load_sae(
    directory: str | Path, *, device: str = "cpu", expected_d_in: int | None = None
) -> SparseAutoencoder:
    """Load an SAE saved by saelab or SAELens. Weights come back in model units.

    ``expected_d_in`` (the width of the activations it will see) is checked against the file.
    """
    directory = Path(directory)
    cfg = read_sae_cfg(directory)
    cfg_path = directory / CFG_FILENAME
    _check_cfg_types(cfg, cfg_path)
    try:
        if "saelab" in cfg:
            own = cfg["saelab"]
            arch = architecture_class(own["architecture"]).architecture
            known = {f.name for f in dataclasses.fields(SAEConfig)}
            sae_cfg = SAEConfig(**{k: v for k, v in own["sae"].items() if k in known})
            default = architecture_class(arch).default_apply_b_dec_to_input
            apply_b_dec = bool(cfg.get("apply_b_dec_to_input", default))
        else:
            arch, sae_cfg, apply_b_dec = _sae_config_from_saelens(cfg)
    except SaelabError as exc:  # a value SAEConfig refuses (k = -3): say which file holds it
        raise SaelabError(f"{cfg_path}: {exc}") from exc
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    d_out = cfg.get("d_out")  # transcoders only
    if expected_d_in is not None and expected_d_in != d_in:
        raise SaelabError(
            f"SAE {directory} expects d_in={d_in} (cfg.json) but the activations have width "
            f"{expected_d_in}; use an SAE trained on this model and hook"
        )
    if sae_cfg.d_sae(d_in) != d_sae:
        sae_cfg = dataclasses.replace(sae_cfg, width=d_sae)
    tensors = read_weights(directory / WEIGHTS_FILENAME)
    expected = architecture_class(arch).saved_tensor_shapes(d_in, d_sae, d_out)
    for name, shape in expected.items():
        if name not in tensors:
            raise SaelabError(f"{directory / WEIGHTS_FILENAME} has no tensor {name!r}")
        if tuple(tensors[name].shape) != shape:
            raise SaelabError(
                f"{name} in {directory / WEIGHTS_FILENAME} has shape {tuple(tensors[name].shape)}"
                f" but cfg.json (d_in={d_in}, d_sae={d_sae}"
                f"{'' if d_out is None else f', d_out={d_out}'}) implies {shape}"
            )
    tensors = {k: tensors[k].float() for k in expected}
    check_finite(tensors, directory / WEIGHTS_FILENAME, fix=RESAVE)
    if cfg.get("rescale_acts_by_decoder_norm"):
        tensors = _fold_decoder_norms(tensors)
    widths = {} if d_out is None else {"d_out": d_out}
    sae = architecture_class(arch)(sae_cfg, d_in, apply_b_dec_to_input=apply_b_dec, **widths)
    sae.load_folded_state_dict_(tensors)
    sae.metadata = dict(cfg.get("metadata") or {})
    return sae.to(device)


def _fold_decoder_norms(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens' ``rescale_acts_by_decoder_norm`` made explicit: scale features by ‖d_i‖."""
    norms_F = tensors["W_dec"].norm(dim=-1)
    return {
        **tensors,  # an architecture's other tensors are unaffected
        "W_enc": tensors["W_enc"] * norms_F,
        "b_enc": tensors["b_enc"] * norms_F,
        "W_dec": tensors["W_dec"] / norms_F[:, None].clamp_min(1e-12),
        "b_dec": tensors["b_dec"],
    }


def load_log10_density(directory: str | Path) -> torch.Tensor | None:
    path = Path(directory) / SPARSITY_FILENAME
    if not path.is_file():
        return None
    tensors = read_weights(path)
    if "sparsity" not in tensors:
        raise SaelabError(f"{path} has no 'sparsity' tensor; {RESAVE}")
    return tensors["sparsity"]


_GLOB_CHARS = ("*", "?", "[")


def find_sae_dirs(specs: Iterable[str | Path]) -> list[Path]:
    """Saved SAE folders named by ``specs``, in order, each once (compared resolved).

    A spec is an SAE folder (it holds ``cfg.json``), a run or sweep folder (every folder below it
    that holds one, at any depth), or a glob pattern of either (expanded here, so quoted ones
    work too); ``~`` is expanded. Paths come back as spelled. Example::

        find_sae_dirs(["runs/demo"])      # [Path('runs/demo/blocks.6.hook_resid_post-topk-...')]
    """
    found: list[Path] = []
    for spec in specs:
        text = os.path.expanduser(str(spec))
        if Path(text).is_dir():
            candidates, from_glob = [Path(text)], False
        elif any(c in text for c in _GLOB_CHARS):
            candidates, from_glob = [Path(p) for p in sorted(glob.glob(text))], True
        else:
            raise SaelabError(
                f"{spec} is not a folder; pass SAE folders, a run folder or a glob pattern"
            )
        matched = [sae_dir for candidate in candidates for sae_dir in _sae_dirs_in(candidate)]
        if not matched:
            what = "nothing that matches it" if from_glob else "no folder in it"
            raise SaelabError(
                f"no SAE folders in {spec}: {what} holds a {CFG_FILENAME}; pass saved SAE "
                "folders, a run folder or a glob pattern"
            )
        found += matched
    unique: dict[Path, Path] = {}
    for sae_dir in found:
        unique.setdefault(sae_dir.resolve(), sae_dir)
    return list(unique.values())


def _sae_dirs_in(folder: Path, top: bool = True) -> list[Path]:
    """``folder`` if it is a saved SAE, else the saved SAEs below it (not inside one another;
    linked folders below the top count only as SAEs, so a link loop ends)."""
    if (folder / CFG_FILENAME).is_file():
        return [folder]
    if not folder.is_dir() or (folder.is_symlink() and not top):
        return []
    return [found for sub in sorted(folder.iterdir()) for found in _sae_dirs_in(sub, top=False)]
