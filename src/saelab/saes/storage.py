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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from saelab import __version__
from saelab.atomic import write_json, write_safetensors
from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.registry import architecture_class, from_saelens_architecture

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
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise SaelabError(f"{cfg_path} is not valid JSON ({exc}); re-save the SAE") from exc


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a damaged file gives a one-line error."""
    if not path.is_file():
        raise SaelabError(f"{path} is missing; the SAE folder is incomplete")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types, or OSError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SaelabError(
            f"{path} is corrupt or truncated ({reason}); re-save or re-download the SAE"
        ) from exc


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
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise SaelabError(f"{directory / CFG_FILENAME} has no integer {key!r}; re-save the SAE")
    if "saelab" in cfg:
        own = cfg["saelab"]
        arch = own["architecture"]
        known = {f.name for f in dataclasses.fields(SAEConfig)}
        sae_cfg = SAEConfig(**{k: v for k, v in own["sae"].items() if k in known})
        apply_b_dec = bool(cfg["apply_b_dec_to_input"])
    else:
        arch, sae_cfg, apply_b_dec = _sae_config_from_saelens(cfg)
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    d_out = cfg.get("d_out")  # transcoders only
    if d_out is not None and not isinstance(d_out, int):
        raise SaelabError(f"{directory / CFG_FILENAME} has a non-integer 'd_out'; re-save the SAE")
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
    return read_weights(path)["sparsity"] if path.is_file() else None


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
