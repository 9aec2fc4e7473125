"""What every layout shares: the reading result, the layout record, and the tensor helpers.

All weights are in model units. Where a target cannot subtract ``b_dec`` before encoding when the
source does (or must when it does not), the shift is folded into the encoder biases
(:func:`recentred`): ``(x − b_dec) W + b = x W + (b − b_dec W)``; the result agrees up to float
rounding. A foreign file written by saelab carries a ``saelab`` section (:func:`own_section`:
hook, config, metadata) that the foreign tool ignores and saelab reads back, so
saelab → X → saelab keeps every name.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from saelab import __version__
from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.registry import ARCHITECTURES

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


def read_json_object(path: Path, layout: str) -> dict[str, Any]:
    if not path.is_file():
        raise SaelabError(f"{path} is missing; a {layout} SAE folder needs it beside its weights")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaelabError(f"{path} is not valid JSON ({exc}); re-export the SAE") from exc
    if not isinstance(cfg, dict):
        raise SaelabError(f"{path} holds a JSON {type(cfg).__name__}, not an object")
    return cfg


def positive_int(cfg: dict[str, Any], key: str, where: Path) -> int:
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
class TensorLayout:
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


def check_tensors(
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


def recentred(tensors: dict[str, Tensor], applied: bool, want_applied: bool) -> dict[str, Tensor]:
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


def build_sae(
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
    sae.metadata = without_hooks(metadata or {})
    return sae


def without_hooks(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata minus its hook names: those live in ``sae.cfg``, and a stale copy (after
    ``--hook``) must not override them when SAELens' ``cfg.json`` is written."""
    return {k: v for k, v in metadata.items() if k not in ("hook_name", "hook_name_out")}


def own_section(sae: SparseAutoencoder) -> dict[str, Any]:
    """What saelab needs to read its own export back with every name and setting."""
    return {
        "version": __version__,
        "architecture": sae.architecture,
        "hook": sae.cfg.hook,
        "output_hook": sae.cfg.output_hook,
        "sae": dataclasses.asdict(sae.cfg),
        "metadata": without_hooks(sae.metadata),
    }
