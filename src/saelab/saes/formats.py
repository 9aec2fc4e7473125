"""Other tools' SAE layouts, read and written, so users can bring and take SAEs.

Three layouts, one registry (:data:`FORMATS`), which also drives the ``saelab convert`` choices:

* ``saelens``: saelab's own folders (``cfg.json`` + ``sae_weights.safetensors``), read and written
  by :mod:`saelab.saes.storage`.
* ``sparsify`` (EleutherAI): a folder per hook named after the module path, ``cfg.json`` (``k``,
  ``num_latents`` or ``expansion_factor``, ``d_in``, ...) and ``sae.safetensors`` with
  ``encoder.weight [F, D]``, ``encoder.bias``, ``W_dec [F, D]``, ``b_dec``. Its forward is
  ``z = TopK_k(ReLU((x − b_dec) encoder.weightᵀ + encoder.bias))``, ``x̂ = z W_dec + b_dec``; a
  transcoder (``transcode``) skips the ``− b_dec`` and a ``skip_connection`` adds ``x W_skipᵀ``.
  saelab's TopK ranks first and applies ReLU after: the kept positive values are the same, so the
  dense features and reconstructions are too. Transcoders and skip connections map to saelab's
  ``topk_transcoder`` / ``topk_skip_transcoder``.
* ``dictionary_learning`` (saprmarks): ``config.json`` (``trainer.dict_class``, ``activation_dim``,
  ``dict_size``, ``k``, ``layer``, ``lm_name``, ``submodule_name``) and the state dict of its
  ``dict_class`` as ``ae.safetensors``; :data:`DL_CLASSES` maps each class to an architecture.
  Its own ``ae.pt`` is a pickle, which saelab never loads.

An architecture that is not in :data:`~saelab.saes.registry.ARCHITECTURES` (when this runs) is
refused as "not supported yet".

All weights are in model units. Where a target cannot subtract ``b_dec`` before encoding when the
source does (or must when it does not), the shift is folded into the encoder biases:
``(x − b_dec) W + b = x W + (b − b_dec W)``; the result agrees up to float rounding. A foreign
file written by saelab carries a ``saelab`` section (hook, config, metadata) that the foreign tool
ignores and saelab reads back (in ``config.json`` for dictionary_learning, in the safetensors
header for sparsify), so saelab → X → saelab keeps every name.

Example::

    done = convert_sae("runs/demo/my-sae", "exports/my-sae", to="sparsify")
    loaded = read_sae("exports/my-sae")        # auto-detected; loaded.sae is a TopKSAE
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from saelab import __version__
from saelab.atomic import write_json, write_safetensors
from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.registry import ARCHITECTURES
from saelab.saes.storage import WEIGHTS_FILENAME, load_sae, read_weights, save_sae

log = logging.getLogger(__name__)

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
DL_CONFIG = "config.json"
DL_WEIGHTS = "ae.safetensors"
DL_PICKLE = "ae.pt"
OWN_SECTION = "saelab"
"""Key of saelab's section in a foreign config; sparsify and dictionary_learning ignore it."""


@dataclass
class LoadedSAE:
    """An SAE read from some layout, and what the user should know about the reading."""

    sae: SparseAutoencoder
    format: str
    """The layout it was read from (a key of :data:`FORMATS`)."""
    notes: list[str] = field(default_factory=list)
    """E.g. a module path kept as the hook name, or a dropped optional inference mode."""


@dataclass
class Conversion:
    """What :func:`convert_sae` did."""

    sae: SparseAutoencoder
    source_format: str
    target_format: str
    notes: list[str]


@dataclass(frozen=True)
class SAEFormat:
    """One layout: how to recognise, read and write it."""

    name: str
    files: str
    """The files that make up one SAE, for messages and docs."""
    holds: Callable[[Path], bool]
    """Whether a folder has this layout's weights (the reader checks the rest)."""
    read: Callable[[Path, str | None, str | None], LoadedSAE]
    """``read(folder, hook, output_hook)``; the hooks, when given, replace what the files say."""
    write: Callable[[SparseAutoencoder, Path], list[str]]
    """Writes into an empty folder; returns notes."""


# ----- public API ------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """The layout of the SAE in folder ``path`` (a key of :data:`FORMATS`), from its files."""
    path = _existing_folder(path)
    found = [name for name, fmt in FORMATS.items() if fmt.holds(path)]
    if len(found) > 1:
        raise SaelabError(
            f"{path} holds files of several layouts ({', '.join(found)}); pick one with --from"
        )
    if not found:
        expected = "; ".join(f"{fmt.files} ({name})" for name, fmt in FORMATS.items())
        raise SaelabError(f"no SAE found in {path}: expected {expected}")
    return found[0]


def read_sae(
    path: str | Path,
    fmt: str = "auto",
    *,
    hook: str | None = None,
    output_hook: str | None = None,
) -> LoadedSAE:
    """Read the SAE in folder ``path`` (layout ``fmt`` or detected) in model units.

    ``hook`` / ``output_hook`` (transcoders) name what the files do not, or replace what they say.
    """
    reader = None if fmt == "auto" else _format(fmt)
    path = _existing_folder(path)
    reader = reader or FORMATS[detect_format(path)]
    loaded = reader.read(path, hook, output_hook)
    if output_hook and loaded.sae.cfg.output_hook is None:
        raise SaelabError(
            f"--output-hook is only for transcoders, and {path} holds a "
            f"{loaded.sae.architecture} SAE; drop it"
        )
    for note in loaded.notes:
        log.debug("%s: %s", path, note)
    return loaded


def write_sae(sae: SparseAutoencoder, path: str | Path, fmt: str) -> list[str]:
    """Write ``sae`` to the new (or empty) folder ``path`` in layout ``fmt``; returns notes.

    The files are written into a hidden folder beside ``path`` and renamed onto it, so ``path``
    never holds half an SAE; an existing SAE is never overwritten.
    """
    target = _format(fmt)
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SaelabError(f"{path} already exists and is not empty; pass a new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    stage.mkdir()
    try:
        notes = target.write(sae, stage)
        if path.exists():
            path.rmdir()  # the empty folder the user made for it
        os.replace(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return notes


def convert_sae(
    src: str | Path,
    dst: str | Path,
    *,
    to: str,
    from_: str = "auto",
    hook: str | None = None,
    output_hook: str | None = None,
) -> Conversion:
    """Read the SAE in ``src`` (layout ``from_``, or detected) and write it to ``dst`` as ``to``.

    Example::

        convert_sae("ckpt/layers.6", "saes/l6", to="saelens")   # a sparsify SAE into saelab's
    """
    target = _format(to)
    loaded = read_sae(src, from_, hook=hook, output_hook=output_hook)
    notes = loaded.notes + write_sae(loaded.sae, dst, target.name)
    return Conversion(loaded.sae, loaded.format, target.name, notes)


def _existing_folder(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise SaelabError(f"{path} does not exist; pass the folder that holds the SAE")
    if not path.is_dir():
        raise SaelabError(f"{path} is a file; pass the folder that holds it and its config")
    return path


def _format(name: str) -> SAEFormat:
    if name not in FORMATS:
        raise SaelabError(f"unknown SAE layout {name!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[name]


# ----- shared helpers --------------------------------------------------------------------------


def _read_json(path: Path, layout: str) -> dict[str, Any]:
    if not path.is_file():
        raise SaelabError(f"{path} is missing; a {layout} SAE folder needs it beside its weights")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaelabError(f"{path} is not valid JSON ({exc}); re-export the SAE") from exc
    if not isinstance(cfg, dict):
        raise SaelabError(f"{path} holds a JSON {type(cfg).__name__}, not an object")
    return cfg


def _positive_int(cfg: dict[str, Any], key: str, where: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SaelabError(f"{where} needs a positive integer {key!r}, got {value!r}")
    return value


def _saelab_shapes(d_in: int, d_sae: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor name saelab's architectures use, in the SAELens layout."""
    features = {name: (d_sae,) for name in ("b_enc", "threshold", "b_gate", "r_mag", "b_mag")}
    return {
        **features,
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_out),
        "b_dec": (d_out,),
        "W_skip": (d_out, d_in),
    }


@dataclass(frozen=True)
class _Layout:
    """How one foreign class names saelab's tensors: foreign name → (saelab name, transposed)."""

    tensors: dict[str, tuple[str, bool]]

    def shapes(self, d_in: int, d_sae: int, d_out: int) -> dict[str, tuple[int, ...]]:
        ours = _saelab_shapes(d_in, d_sae, d_out)
        return {
            theirs: ours[name][::-1] if transposed else ours[name]
            for theirs, (name, transposed) in self.tensors.items()
        }

    def to_saelab(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            name: (tensors[theirs].T if transposed else tensors[theirs]).float()
            for theirs, (name, transposed) in self.tensors.items()
        }

    def from_saelab(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            theirs: tensors[name].T if transposed else tensors[name]
            for theirs, (name, transposed) in self.tensors.items()
        }


def _check_tensors(
    tensors: dict[str, Tensor],
    expected: dict[str, tuple[int, ...]],
    where: Path,
    implied_by: str,
) -> None:
    """Every expected tensor present with its shape, and nothing else (it could change the
    forward in a way saelab would silently drop)."""
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise SaelabError(
            f"{where} has no tensor {missing[0]!r} (it holds {', '.join(sorted(tensors))}); "
            "pass --from to name its layout, or re-export it"
        )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise SaelabError(
            f"{where} holds tensors saelab does not know for this layout ({', '.join(extra)}); "
            "it uses a feature saelab cannot convert"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise SaelabError(
                f"{name} in {where} has shape {tuple(tensors[name].shape)} but {implied_by} "
                f"implies {shape}; the weights and the config do not belong together"
            )


def _recentred(tensors: dict[str, Tensor], applied: bool, want_applied: bool) -> dict[str, Tensor]:
    """Weights whose pre-activations are unchanged when ``b_dec`` is (not) subtracted first:
    ``(x − b_dec) W + b = x W + (b − b_dec W)``; the gated magnitude path scales W by exp(r_mag)."""
    if applied == want_applied:
        return tensors
    shift_F = tensors["b_dec"] @ tensors["W_enc"]
    if not want_applied:
        shift_F = -shift_F
    out = dict(tensors)
    for name in ("b_enc", "b_gate"):
        if name in out:
            out[name] = out[name] + shift_F
    if "b_mag" in out:
        out["b_mag"] = out["b_mag"] + out["r_mag"].exp() * shift_F
    return out


def _architecture(name: str, source: Path, what: str) -> type[SparseAutoencoder]:
    if name not in ARCHITECTURES:
        raise SaelabError(
            f"{source} holds {what}, which needs saelab's {name!r} architecture, not supported "
            f"yet; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[name]


def _build_sae(
    arch: str,
    what: str,
    source: Path,
    tensors: dict[str, Tensor],
    *,
    d_in: int,
    d_sae: int,
    apply_b_dec: bool,
    hook: str,
    output_hook: str | None = None,
    settings: dict[str, Any] | None = None,
    own: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> SparseAutoencoder:
    """A saelab SAE of architecture ``arch`` holding model-unit ``tensors`` (saelab names).

    ``settings`` are the config fields the layout stores (``k``, ...). ``own`` is the ``saelab``
    section a saelab-written file carries: its config fills the hyperparameters the layout does
    not store (l1 coefficient, ...)."""
    cls = _architecture(arch, source, what)
    known = {f.name for f in dataclasses.fields(SAEConfig)}
    fields = {key: v for key, v in ((own or {}).get("sae") or {}).items() if key in known}
    fields.update(hook=hook, architecture=arch, output_hook=output_hook, **(settings or {}))
    if isinstance(fields.get("matryoshka_widths"), list):
        fields["matryoshka_widths"] = tuple(fields["matryoshka_widths"])
    stated = fields.get("apply_b_dec_to_input") is not None
    if "apply_b_dec_to_input" in known and (
        stated or apply_b_dec != cls.default_apply_b_dec_to_input
    ):
        fields["apply_b_dec_to_input"] = apply_b_dec  # the layout's answer, after any folding
    try:
        cfg = SAEConfig(**fields)
        if cfg.d_sae(d_in) != d_sae:
            cfg = dataclasses.replace(cfg, width=d_sae)
    except TypeError as exc:
        raise SaelabError(f"{source}: bad saelab section in its config ({exc})") from exc
    kwargs: dict[str, Any] = {"apply_b_dec_to_input": apply_b_dec}
    if output_hook is not None:  # a transcoder: its output width comes from W_dec
        kwargs["d_out"] = tensors["W_dec"].shape[1]
    sae = cls(cfg, d_in, **kwargs)
    sae.load_folded_state_dict_({name: t.float() for name, t in tensors.items()})
    sae.metadata = _without_hooks(metadata or {})
    return sae


def _without_hooks(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata minus its hook names: those live in ``sae.cfg``, and a stale copy (after
    ``--hook``) must not override them when SAELens' ``cfg.json`` is written."""
    return {k: v for k, v in metadata.items() if k not in ("hook_name", "hook_name_out")}


def _own_section(sae: SparseAutoencoder) -> dict[str, Any]:
    """What saelab needs to read its own export back with every name and setting."""
    return {
        "version": __version__,
        "architecture": sae.architecture,
        "hook": sae.cfg.hook,
        "output_hook": sae.cfg.output_hook,
        "sae": dataclasses.asdict(sae.cfg),
        "metadata": _without_hooks(sae.metadata),
    }


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


# ----- saelens (saelab's own layout) -----------------------------------------------------------


def _holds_saelens(path: Path) -> bool:
    return (path / WEIGHTS_FILENAME).is_file()


def _read_saelens(path: Path, hook: str | None, output_hook: str | None) -> LoadedSAE:
    sae = load_sae(path)
    if hook or output_hook:
        sae.cfg = dataclasses.replace(
            sae.cfg, hook=hook or sae.cfg.hook, output_hook=output_hook or sae.cfg.output_hook
        )
    return LoadedSAE(sae, "saelens")


def _write_saelens(sae: SparseAutoencoder, folder: Path) -> list[str]:
    save_sae(sae, folder, metadata=_without_hooks(sae.metadata))
    return []


# ----- sparsify --------------------------------------------------------------------------------

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
_SPARSIFY_LAYOUT = _Layout(
    {
        "encoder.weight": ("W_enc", True),
        "encoder.bias": ("b_enc", False),
        "W_dec": ("W_dec", False),
        "b_dec": ("b_dec", False),
    }
)
_SPARSIFY_SKIP_LAYOUT = _Layout({**_SPARSIFY_LAYOUT.tensors, "W_skip": ("W_skip", False)})
_SPARSIFY_ARCHITECTURES = ("topk", "topk_transcoder", "topk_skip_transcoder")


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
    cfg = {**_SPARSIFY_DEFAULTS, **_read_json(cfg_path, "sparsify")}
    if cfg["activation"] != "topk":
        raise SaelabError(
            f"{cfg_path} uses sparsify's {cfg['activation']!r} activation, not supported yet; "
            "only 'topk' SAEs convert"
        )
    for option in _SPARSIFY_UNSUPPORTED:
        if cfg.get(option):
            raise SaelabError(f"{cfg_path} sets {option!r}, a sparsify option saelab cannot run")
    d_in = _positive_int(cfg, "d_in", cfg_path)
    k = _positive_int(cfg, "k", cfg_path)
    d_out = _positive_int(cfg, "d_out", cfg_path) if cfg.get("d_out") is not None else d_in
    if cfg["num_latents"]:  # sparsify: 0 means d_in · expansion_factor
        d_sae = _positive_int(cfg, "num_latents", cfg_path)
    else:
        d_sae = d_in * _positive_int(cfg, "expansion_factor", cfg_path)
    transcode, skip = bool(cfg["transcode"]), bool(cfg["skip_connection"])
    tensors = read_weights(weights_path)
    if "W_skip" in tensors and not skip:
        raise SaelabError(f"{weights_path} has W_skip but {cfg_path} sets no skip_connection")
    layout = _SPARSIFY_SKIP_LAYOUT if skip else _SPARSIFY_LAYOUT
    dims = f"{SPARSIFY_CFG} (d_in={d_in}, d_sae={d_sae}" + (
        f", d_out={d_out})" if transcode else ")"
    )
    _check_tensors(
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
            weights = _recentred(weights, applied=True, want_applied=False)
            notes.append(
                "folded b_dec into the encoder bias (saelab's skip SAEs do not subtract it "
                "first); outputs agree up to float rounding"
            )
        hook, output_hook = _sparsify_hooks(folder.name, own, hook, output_hook, transcode, notes)
    else:
        arch = "topk"
        hook, _ = _sparsify_hooks(folder.name, own, hook, None, False, notes)
        output_hook = None
    sae = _build_sae(
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
    if arch not in _SPARSIFY_ARCHITECTURES:
        raise SaelabError(
            f"sparsify stores only TopK SAEs and transcoders, not saelab's {arch!r}; "
            "choose --to saelens or dictionary_learning"
        )
    notes: list[str] = []
    tensors = sae.folded_state_dict()
    transcode = arch != "topk"
    skip = "W_skip" in tensors
    if not transcode and not sae.apply_b_dec_to_input:
        tensors = _recentred(tensors, applied=False, want_applied=True)
        notes.append(
            "folded b_dec into encoder.bias (sparsify always subtracts b_dec before encoding); "
            "outputs agree up to float rounding"
        )
    layout = _SPARSIFY_SKIP_LAYOUT if skip else _SPARSIFY_LAYOUT
    # saelab's section rides in the safetensors header: sparsify warns about unknown cfg.json keys.
    header = {OWN_SECTION: json.dumps(_own_section(sae))}
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


# ----- dictionary_learning ---------------------------------------------------------------------


@dataclass(frozen=True)
class _DLClass:
    """One ``dict_class`` of dictionary_learning and the saelab architecture it maps to."""

    trainer_class: str
    architecture: str
    apply_b_dec: bool
    """Whether its encoder subtracts the decoder bias first."""
    layout: _Layout
    buffers: tuple[str, ...] = ()
    """Non-weight entries of its state dict: ``k``, the scalar ``threshold``, ``group_sizes``."""


_DL_LINEAR_TOPK = _Layout(
    {
        "encoder.weight": ("W_enc", True),
        "encoder.bias": ("b_enc", False),
        "decoder.weight": ("W_dec", True),
        "b_dec": ("b_dec", False),
    }
)
_DL_PARAMETERS = _Layout({name: (name, False) for name in ("W_enc", "b_enc", "W_dec", "b_dec")})
DL_CLASSES: dict[str, _DLClass] = {
    # ReLU(encoder(x − bias)), decoder(f) + bias: Towards Monosemanticity.
    "AutoEncoder": _DLClass(
        "StandardTrainer",
        "relu",
        True,
        _Layout(
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
        _Layout(
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
        _Layout({**_DL_PARAMETERS.tensors, "threshold": ("threshold", False)}),
    ),
    # 1[encoder(x̃) + gate_bias > 0] · ReLU(exp(r_mag) encoder(x̃) + mag_bias), x̃ = x − decoder_bias.
    "GatedAutoEncoder": _DLClass(
        "GatedSAETrainer",
        "gated",
        True,
        _Layout(
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
    also = " or sparsify" if sae.architecture in _SPARSIFY_ARCHITECTURES else ""
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
    cfg = _read_json(cfg_path, "dictionary_learning")
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
    d_in = _positive_int(trainer, "activation_dim", cfg_path)
    d_sae = _positive_int(trainer, "dict_size", cfg_path)
    tensors = read_weights(weights_path)
    expected: dict[str, tuple[Any, ...]] = spec.layout.shapes(d_in, d_sae, d_in)
    expected |= {name: () for name in ("k", "threshold") if name in spec.buffers}
    if "group_sizes" in spec.buffers:
        sizes = tensors.get("group_sizes")
        one_dim = sizes is not None and sizes.ndim == 1
        expected["group_sizes"] = tuple(sizes.shape) if one_dim else ("n_groups",)
    dims = f"{DL_CONFIG} (activation_dim={d_in}, dict_size={d_sae})"
    _check_tensors(tensors, expected, weights_path, dims)
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
    sae = _build_sae(
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
        tensors = _recentred(tensors, sae.apply_b_dec_to_input, spec.apply_b_dec)
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
    write_json(folder / DL_CONFIG, {"trainer": trainer, OWN_SECTION: _own_section(sae)})
    notes.append(
        f"dictionary_learning loads it with {dict_class}(...).load_state_dict("
        f"safetensors.torch.load_file('{DL_WEIGHTS}'))"
    )
    return notes


FORMATS: dict[str, SAEFormat] = {
    fmt.name: fmt
    for fmt in (
        SAEFormat(
            "saelens",
            f"cfg.json + {WEIGHTS_FILENAME}",
            _holds_saelens,
            _read_saelens,
            _write_saelens,
        ),
        SAEFormat(
            "sparsify",
            f"{SPARSIFY_CFG} + {SPARSIFY_WEIGHTS} (or a folder per hook)",
            _holds_sparsify,
            _read_sparsify,
            _write_sparsify,
        ),
        SAEFormat(
            "dictionary_learning",
            f"{DL_CONFIG} + {DL_WEIGHTS}",
            _holds_dictionary_learning,
            _read_dictionary_learning,
            _write_dictionary_learning,
        ),
    )
}
"""Every layout saelab reads and writes, by the name ``saelab convert --to/--from`` uses."""
