"""``sparsify`` (EleutherAI): a folder per hook named after the module path.

``cfg.json`` (``k``, ``num_latents`` or ``expansion_factor``, ``d_in``, ...) and
``sae.safetensors`` with ``encoder.weight [F, D]``, ``encoder.bias``, ``W_dec [F, D]``,
``b_dec``. Its forward is ``z = TopK_k(ReLU((x − b_dec) encoder.weightᵀ + encoder.bias))``,
``x̂ = z W_dec + b_dec``; a transcoder (``transcode``) skips the ``− b_dec`` and a
``skip_connection`` adds ``x W_skipᵀ``. saelab's TopK ranks first and applies ReLU after: the kept
positive values are the same, so the dense features and reconstructions are too. Transcoders and
skip connections map to saelab's ``topk_transcoder`` / ``topk_skip_transcoder``. saelab's own
section rides in the safetensors header (sparsify warns about unknown ``cfg.json`` keys).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

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
from saelab.saes.storage import read_weights
from saelab.safetensors_check import check_finite

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"

_SPARSIFY_DEFAULTS: dict[str, Any] = {
    "activation": "topk",
    "expansion_factor": 32,
    "num_latents": 0,
    "k": 32,
    "transcode": False,
    "skip_connection": False,
}
"""``SparseCoderConfig`` defaults, for configs that omit a field."""
_SPARSIFY_UNSUPPORTED = ("embed_skip", "gram_lookup", "post_encoder_scale")
"""Options of sparsify variants that change the forward pass; saelab refuses them."""
_SPARSIFY_LAYOUT = TensorLayout(
    {
        "encoder.weight": ("W_enc", True),
        "encoder.bias": ("b_enc", False),
        "W_dec": ("W_dec", False),
        "b_dec": ("b_dec", False),
    }
)
_SPARSIFY_SKIP_LAYOUT = TensorLayout({**_SPARSIFY_LAYOUT.tensors, "W_skip": ("W_skip", False)})
SPARSIFY_ARCHITECTURES = ("topk", "topk_transcoder", "topk_skip_transcoder")


def _holds_sparsify(path: Path) -> bool:
    return (path / SPARSIFY_WEIGHTS).is_file() or bool(_sparsify_hook_folders(path))


def _sparsify_hook_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / SPARSIFY_WEIGHTS).is_file())


def _sparsify_folder(path: Path) -> Path:
    """The one hook folder: ``path`` itself, or its only subfolder holding an SAE."""
    if (path / SPARSIFY_WEIGHTS).is_file() or (path / SPARSIFY_CFG).is_file():
        return path
    folders = _sparsify_hook_folders(path)
    if len(folders) == 1:
        return folders[0]
    if not folders:
        raise SaelabError(
            f"no sparsify SAE in {path}: expected {SPARSIFY_CFG} + {SPARSIFY_WEIGHTS}, "
            "or one folder per hook holding them"
        )
    names = ", ".join(p.name for p in folders[:4]) + (", ..." if len(folders) > 4 else "")
    raise SaelabError(
        f"{path} holds sparsify SAEs for {len(folders)} hooks ({names}); "
        f"convert one folder at a time, e.g. {folders[0]}"
    )


def _read_sparsify(path: Path, hook: str | None, output_hook: str | None) -> LoadedSAE:
    folder = _sparsify_folder(path)
    cfg_path, weights_path = folder / SPARSIFY_CFG, folder / SPARSIFY_WEIGHTS
    if not weights_path.is_file():
        raise SaelabError(f"{weights_path} is missing; the sparsify SAE folder is incomplete")
    cfg = {**_SPARSIFY_DEFAULTS, **read_json_object(cfg_path, "sparsify")}
    if cfg["activation"] != "topk":
        raise SaelabError(
            f"{cfg_path} uses sparsify's {cfg['activation']!r} activation, not supported yet; "
            "only 'topk' SAEs convert"
        )
    for option in _SPARSIFY_UNSUPPORTED:
        if cfg.get(option):
            raise SaelabError(f"{cfg_path} sets {option!r}, a sparsify option saelab cannot run")
    d_in = positive_int(cfg, "d_in", cfg_path)
    k = positive_int(cfg, "k", cfg_path)
    d_out = positive_int(cfg, "d_out", cfg_path) if cfg.get("d_out") is not None else d_in
    if cfg["num_latents"]:  # sparsify: 0 means d_in · expansion_factor
        d_sae = positive_int(cfg, "num_latents", cfg_path)
    else:
        d_sae = d_in * positive_int(cfg, "expansion_factor", cfg_path)
    transcode, skip = bool(cfg["transcode"]), bool(cfg["skip_connection"])
    tensors = read_weights(weights_path, fix="re-export the SAE with sparsify or saelab")
    check_finite(tensors, weights_path, fix="re-export the SAE with sparsify or saelab")
    if "W_skip" in tensors and not skip:
        raise SaelabError(f"{weights_path} has W_skip but {cfg_path} sets no skip_connection")
    layout = _SPARSIFY_SKIP_LAYOUT if skip else _SPARSIFY_LAYOUT
    dims = f"{SPARSIFY_CFG} (d_in={d_in}, d_sae={d_sae}" + (
        f", d_out={d_out})" if transcode else ")"
    )
    check_tensors(
        tensors, layout.shapes(d_in, d_sae, d_out if transcode else d_in), weights_path, dims
    )
    weights = layout.to_saelab(tensors)

    own = _header_section(weights_path)
    notes: list[str] = []
    what = "a sparsify TopK SAE"
    if skip or transcode:
        # An SAE with a skip connection is a transcoder from its hook to the same hook.
        arch = "topk_skip_transcoder" if skip else "topk_transcoder"
        what = f"a sparsify {'transcoder' if transcode else 'SAE'}{' with W_skip' if skip else ''}"
        if not transcode:
            weights = recentred(weights, applied=True, want_applied=False)
            notes.append(
                "folded b_dec into the encoder bias (saelab's skip SAEs do not subtract it "
                "first); outputs agree up to float rounding"
            )
        hook, output_hook = _sparsify_hooks(folder.name, own, hook, output_hook, transcode, notes)
    else:
        arch = "topk"
        hook, _ = _sparsify_hooks(folder.name, own, hook, None, False, notes)
        output_hook = None
    sae = build_sae(
        arch,
        what,
        folder,
        weights,
        d_in=d_in,
        d_sae=d_sae,
        apply_b_dec=not (skip or transcode),
        hook=hook,
        output_hook=output_hook,
        settings={"k": k},
        own=own,
        metadata=own.get("metadata"),
    )
    return LoadedSAE(sae, "sparsify", notes)


def _header_section(path: Path) -> dict[str, Any]:
    """saelab's section from a safetensors header (read after the tensors, so the file is sound)."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        text = (handle.metadata() or {}).get(OWN_SECTION)
    try:
        section = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise SaelabError(f"{path} has a damaged saelab header ({exc}); re-export it") from exc
    return section if isinstance(section, dict) else {}


def _sparsify_hooks(
    module: str,
    own: dict[str, Any],
    hook: str | None,
    output_hook: str | None,
    transcode: bool,
    notes: list[str],
) -> tuple[str, str]:
    """Input and output hook names: given, from saelab's section, or mapped from the folder name
    (the module path); a path that names different hooks in different families is kept raw."""
    hook = hook or own.get("hook")
    output_hook = output_hook or own.get("output_hook")
    if hook and (output_hook or not transcode):
        return hook, output_hook or hook
    mapped_out = _hook_for_module(module, "output")
    mapped_in = _hook_for_module(module, "input") if transcode else mapped_out
    output_hook = output_hook or mapped_out
    hook = hook or mapped_in
    if hook and output_hook:
        notes.append(
            f"sparsify module '{module}' is hook {hook}"
            + (f" → {output_hook}" if transcode else "")
        )
        return hook, output_hook
    flags = "--hook and --output-hook" if transcode else "--hook"
    notes.append(
        f"kept the sparsify module path '{module}' as the hook name: saelab cannot tell which "
        f"hook it is for every model family; pass {flags} with saelab's names "
        "(see: saelab hooks MODEL)"
    )
    return hook or module, output_hook or module


def _write_sparsify(sae: SparseAutoencoder, folder: Path) -> list[str]:
    arch = sae.architecture
    if arch not in SPARSIFY_ARCHITECTURES:
        raise SaelabError(
            f"sparsify stores only TopK SAEs and transcoders, not saelab's {arch!r}; "
            "choose --to saelens or dictionary_learning"
        )
    notes: list[str] = []
    tensors = sae.folded_state_dict()
    transcode = arch != "topk"
    skip = "W_skip" in tensors
    if not transcode and not sae.apply_b_dec_to_input:
        tensors = recentred(tensors, applied=False, want_applied=True)
        notes.append(
            "folded b_dec into encoder.bias (sparsify always subtracts b_dec before encoding); "
            "outputs agree up to float rounding"
        )
    layout = _SPARSIFY_SKIP_LAYOUT if skip else _SPARSIFY_LAYOUT
    # saelab's section rides in the safetensors header: sparsify warns about unknown cfg.json keys.
    header = {OWN_SECTION: json.dumps(own_section(sae))}
    write_safetensors(folder / SPARSIFY_WEIGHTS, layout.from_saelab(tensors), metadata=header)
    d_in, d_sae = sae.d_in, sae.d_sae
    norms_F = tensors["W_dec"].norm(dim=-1)
    cfg: dict[str, Any] = {
        "activation": "topk",
        "expansion_factor": max(1, d_sae // d_in),
        "normalize_decoder": bool(torch.allclose(norms_F, torch.ones_like(norms_F), atol=1e-4)),
        "num_latents": d_sae,
        "k": min(sae.cfg.k, d_sae),
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": d_in,
    }
    if sae.d_out != d_in:
        cfg["d_out"] = sae.d_out
    write_json(folder / SPARSIFY_CFG, cfg)
    return notes


def _hook_for_module(path: str, where: str) -> str | None:
    """The hook name of module ``path``'s input or output when every model family that has such
    a module agrees on it (``layers.6`` → ``blocks.6.hook_resid_post``); else None.

    sparsify names modules from the base model (``layers.6``, GPT-2's ``h.6``); the full path
    from the ``*ForCausalLM`` model (``model.layers.6``) is accepted too.
    """
    from saelab.models.hookpoints import FAMILIES  # here: hook tables import transformers

    answers: set[str | None] = set()
    for family in FAMILIES:
        for prefix in {family.blocks, family.blocks.partition(".")[2]}:
            match = re.fullmatch(rf"{re.escape(prefix)}\.(\d+)(?:\.(.+))?", path)
            if match is None:
                continue
            module = match.group(2) or ""
            suffixes = [s for s, site in family.sites.items() if site == (module, where)]
            answers.add(f"blocks.{match.group(1)}.{suffixes[0]}" if len(suffixes) == 1 else None)
    return answers.pop() if len(answers) == 1 else None


FORMAT = SAEFormat(
    "sparsify",
    f"{SPARSIFY_CFG} + {SPARSIFY_WEIGHTS} (or a folder per hook)",
    _holds_sparsify,
    _read_sparsify,
    _write_sparsify,
)
