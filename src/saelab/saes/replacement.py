"""Replacement sets: transcoders that replace every MLP of a layer range, as one folder.

A replacement set is what an attribution graph is built on: at each covered layer ``L`` features
read the MLP's input (``input_hook`` at ``L``, by default ``blocks.L.ln2.hook_normalized``) and
their decoders write the MLP's output (``output_hook``, ``blocks.L.hook_mlp_out``). Two kinds:

| kind | members | features read at ``L`` write to |
| --- | --- | --- |
| ``per_layer`` | one transcoder per layer (any transcoder architecture) | layer ``L`` only |
| ``cross_layer`` | one cross-layer transcoder (:mod:`saelab.saes.clt`) | each covered ``≥ L`` |

On disk: ``replacement.json`` (the manifest, :data:`MANIFEST_FILENAME`) plus one folder per
member in the usual SAE layout (``cfg.json`` + ``sae_weights.safetensors``, loadable by
:func:`~saelab.saes.storage.load_sae`)::

    {"format": "saelab-replacement", "version": 1, "kind": "per_layer", "model": "default",
     "n_layers": 30, "layers": [0, 1, ...], "input_hook": "blocks.{layer}.ln2.hook_normalized",
     "output_hook": "blocks.{layer}.hook_mlp_out",
     "members": [{"layer": 0, "folder": "blocks.0.ln2.hook_normalized-topk_transcoder-x8-k32"}]}

Every tensor the :class:`Replacement` interface returns is in model units (saved weights have the
activation scales folded in) and float32 unless the set was converted with :meth:`Replacement.to`.

The run side: an ``[[sae]]`` table with ``layers`` (``"all"`` or a list) is expanded by
:func:`expand_layered_saes` into one member per layer (or one CLT), trained from one pass; the
run then writes the manifest with :func:`write_layered_manifests`.

Example::

    rep = load_replacement("runs/replacement-30")        # a set folder, or a run holding one set
    W_enc, b_enc = rep.encoder(3)                        # [d_in, F], [F]
    acts = {L: rep.encode(L, x_in[L]) for L in rep.layers}
    y = rep.reconstruct(acts, x_in)                      # {L: predicted hook_mlp_out}
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from saelab.atomic import write_json
from saelab.config import RunConfig, SAEConfig, require
from saelab.errors import SaelabError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.jumprelu import threshold_acts

if TYPE_CHECKING:
    from saelab.saes.clt import CrossLayerTranscoder

MANIFEST_FILENAME = "replacement.json"
FORMAT = "saelab-replacement"
VERSION = 1
KINDS = ("per_layer", "cross_layer")
DEFAULT_INPUT_HOOK = "blocks.{layer}.ln2.hook_normalized"
"""A layered transcoder's input hook when the ``[[sae]]`` table names no output hook."""
DEFAULT_OUTPUT_HOOK = "blocks.{layer}.hook_mlp_out"
"""... and its output hook."""
SET_PREFIX = "replacement"
"""A replacement set's default folder name starts with this (then architecture, width,
setting, as SAE folder names): ``replacement-topk_transcoder-x8-k32``."""

_BLOCK = re.compile(r"^blocks\.(\d+|\{layer\})\.")


# ----- the interface -------------------------------------------------------------------------


class Replacement:
    """A set of transcoders replacing the MLPs of :attr:`layers` (see the module docstring).

    Subclasses implement the per-layer pieces; :meth:`encode` and :meth:`reconstruct` are
    shared and follow from them.
    """

    kind: str
    model: str
    n_layers: int
    layers: list[int]
    folder: Path | None = None
    """Where the set was loaded from (None when built in memory)."""

    def __init__(
        self,
        *,
        model: str,
        n_layers: int,
        layers: Sequence[int],
        input_hook: str,
        output_hook: str,
    ) -> None:
        self.model = model
        self.n_layers = int(n_layers)
        self.layers = sorted(int(layer) for layer in layers)
        self.input_hook_template = input_hook
        self.output_hook_template = output_hook

    # ----- hooks and widths ---------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise SaelabError(
                f"layer {layer} is not covered by this replacement set (layers {self.layers})"
            )

    def input_hook(self, layer: int) -> str:
        """The hook the features read at ``layer`` (the MLP's input)."""
        return self.input_hook_template.format(layer=layer)

    def output_hook(self, layer: int) -> str:
        """The hook the replacement predicts at ``layer`` (the MLP's output)."""
        return self.output_hook_template.format(layer=layer)

    def d_sae(self, layer: int) -> int:
        """Number of features read at ``layer``."""
        return self.encoder(layer)[1].shape[0]

    @property
    def d_in(self) -> int:
        """Width of the input hooks."""
        return self.encoder(self.layers[0])[0].shape[0]

    @property
    def d_out(self) -> int:
        """Width of the output hooks."""
        return self.b_dec(self.layers[0]).shape[0]

    # ----- what a kind defines ------------------------------------------------------------

    def encoder(self, layer: int) -> tuple[Float[Tensor, "D F"], Float[Tensor, " F"]]:
        """``(W_enc [d_in, F], b_enc [F])`` of the features read at ``layer``, model units:
        ``pre_act = x_in @ W_enc + b_enc``."""
        raise NotImplementedError

    def activation(self, layer: int, pre_act: Float[Tensor, "... F"]) -> Float[Tensor, "... F"]:
        """The nonlinearity of ``layer``'s features (TopK, JumpReLU or ReLU) on pre-activations;
        differentiable where the nonlinearity is (TopK: through the kept values)."""
        raise NotImplementedError

    def decoder(self, src: int, dst: int) -> Float[Tensor, "F O"] | None:
        """``[F_src, d_out]``: what features read at ``src`` write to layer ``dst``'s MLP
        output; None when they write nothing there (per-layer: ``dst != src``; any kind:
        ``dst < src``)."""
        raise NotImplementedError

    def b_dec(self, dst: int) -> Float[Tensor, " O"]:
        """``[d_out]``: the constant term of ``dst``'s predicted MLP output."""
        raise NotImplementedError

    def skip(self, layer: int) -> Float[Tensor, "O D"] | None:
        """``W_skip [d_out, d_in]`` of ``layer`` (skip transcoders), or None."""
        raise NotImplementedError

    def to(
        self, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> Replacement:
        """This set with every tensor converted (in place; returns ``self``)."""
        raise NotImplementedError

    def members(self) -> list[tuple[int, SparseAutoencoder]]:
        """``(layer, saved SAE)`` of each member folder, in layer order."""
        raise NotImplementedError

    # ----- shared --------------------------------------------------------------------------

    def encode(self, layer: int, x_in: Float[Tensor, "... D"]) -> Float[Tensor, "... F"]:
        """Features at ``layer`` of raw MLP inputs: ``activation(x_in W_enc + b_enc)``."""
        W_enc, b_enc = self.encoder(layer)
        return self.activation(layer, x_in.to(W_enc.dtype) @ W_enc + b_enc)

    def reconstruct(
        self, acts: dict[int, Tensor], inputs: dict[int, Tensor]
    ) -> dict[int, Float[Tensor, "... O"]]:
        """Predicted MLP outputs at every covered layer from the features' activations
        (``acts[layer] [..., F]``) and the MLP inputs (only read for skip terms)::

            y[dst] = b_dec(dst) + Σ_{src ≤ dst} acts[src] @ decoder(src, dst)
                     + inputs[dst] @ skip(dst)ᵀ
        """
        out: dict[int, Tensor] = {}
        for dst in self.layers:
            y = self.b_dec(dst)
            for src in self.layers:
                if src > dst:
                    break
                W = self.decoder(src, dst)
                if W is not None:
                    y = y + acts[src].to(W.dtype) @ W
            W_skip = self.skip(dst)
            if W_skip is not None:
                y = y + inputs[dst].to(W_skip.dtype) @ W_skip.T
            out[dst] = y
        return out

    def check_model(self, model) -> None:
        """One-line error unless every covered layer's hooks exist in ``model`` with this set's
        widths (and the model has :attr:`n_layers` layers)."""
        from saelab.models.hookpoints import hook_dim
        from saelab.models.hookpoints import n_layers as model_layers

        where = f" ({self.folder})" if self.folder is not None else ""
        layers = model_layers(model)
        require(
            layers == self.n_layers,
            f"the replacement set{where} was trained on a model with {self.n_layers} layers but "
            f"this model has {layers}; use a set trained on this model (it says model "
            f"{self.model!r})",
        )
        for layer in self.layers:
            for hook, want in (
                (self.input_hook(layer), self.encoder(layer)[0].shape[0]),
                (self.output_hook(layer), self.b_dec(layer).shape[0]),
            ):
                have = hook_dim(model, hook)  # an unknown hook: one line listing the valid ones
                require(
                    have == want,
                    f"the replacement set{where} expects width {want} at {hook} but the model "
                    f"gives {have}; use a set trained on this model (it says model "
                    f"{self.model!r})",
                )

    def manifest(self) -> dict[str, Any]:
        """The manifest this set would be saved with (members as loaded)."""
        folders = getattr(self, "_folders", {})
        return manifest_dict(
            kind=self.kind,
            model=self.model,
            n_layers=self.n_layers,
            layers=self.layers,
            input_hook=self.input_hook_template,
            output_hook=self.output_hook_template,
            members=[(layer, folders.get(layer, "")) for layer, _ in self.members()],
        )


def _activation_of(sae: SparseAutoencoder, pre: Tensor, k: int | None = None) -> Tensor:
    """The nonlinearity of a saved SAE on raw pre-activations ``[..., F]``."""
    from saelab.saes.topk import TopKSAE

    if isinstance(sae, TopKSAE):
        return topk_activation(pre, min(k or sae.cfg.k, pre.shape[-1]))
    threshold = getattr(sae, "threshold", None)
    if threshold is not None:
        return threshold_acts(pre, threshold)
    return torch.relu(pre)


def topk_activation(pre: Float[Tensor, "... F"], k: int) -> Float[Tensor, "... F"]:
    """``ReLU(TopK_k(pre))`` as a dense tensor: the ``k`` largest pre-activations of each row,
    ReLU'd, zeros elsewhere (differentiable through the kept values)."""
    top, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, top.relu())


class PerLayerReplacement(Replacement):
    """One transcoder per covered layer (``kind = "per_layer"``)."""

    kind = "per_layer"

    def __init__(
        self,
        transcoders: dict[int, SparseAutoencoder],
        *,
        model: str,
        n_layers: int,
        input_hook: str = DEFAULT_INPUT_HOOK,
        output_hook: str = DEFAULT_OUTPUT_HOOK,
    ) -> None:
        super().__init__(
            model=model,
            n_layers=n_layers,
            layers=list(transcoders),
            input_hook=input_hook,
            output_hook=output_hook,
        )
        self.transcoders = {layer: transcoders[layer] for layer in self.layers}
        self._tensors: dict[int, dict[str, Tensor]] = {}
        for layer, tc in self.transcoders.items():
            tensors = tc.folded_state_dict()
            self._tensors[layer] = tensors

    def _get(self, layer: int) -> dict[str, Tensor]:
        self._check_layer(layer)
        return self._tensors[layer]

    def encoder(self, layer: int) -> tuple[Tensor, Tensor]:
        t = self._get(layer)
        return t["W_enc"], t["b_enc"]

    def activation(self, layer: int, pre_act: Tensor) -> Tensor:
        self._check_layer(layer)
        tc = self.transcoders[layer]
        threshold = self._tensors[layer].get("threshold")
        if threshold is not None:
            return threshold_acts(pre_act, threshold)
        return _activation_of(tc, pre_act)

    def decoder(self, src: int, dst: int) -> Tensor | None:
        t = self._get(src)
        return t["W_dec"] if dst == src else None

    def b_dec(self, dst: int) -> Tensor:
        return self._get(dst)["b_dec"]

    def skip(self, layer: int) -> Tensor | None:
        return self._get(layer).get("W_skip")

    def to(self, dtype=None, device=None) -> PerLayerReplacement:
        for layer, tensors in self._tensors.items():
            self._tensors[layer] = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
        return self

    def members(self) -> list[tuple[int, SparseAutoencoder]]:
        return list(self.transcoders.items())


class CrossLayerReplacement(Replacement):
    """One cross-layer transcoder covering a layer range (``kind = "cross_layer"``)."""

    kind = "cross_layer"

    def __init__(
        self,
        clt: CrossLayerTranscoder,
        *,
        model: str,
        n_layers: int,
        input_hook: str = DEFAULT_INPUT_HOOK,
        output_hook: str = DEFAULT_OUTPUT_HOOK,
    ) -> None:
        super().__init__(
            model=model,
            n_layers=n_layers,
            layers=clt.layers,
            input_hook=input_hook,
            output_hook=output_hook,
        )
        self.clt = clt
        self._tensors = clt.model_unit_blocks()

    def _local(self, layer: int) -> int:
        self._check_layer(layer)
        return self.layers.index(layer)

    def encoder(self, layer: int) -> tuple[Tensor, Tensor]:
        i = self._local(layer)
        return self._tensors["W_enc"][i], self._tensors["b_enc"][i]

    def activation(self, layer: int, pre_act: Tensor) -> Tensor:
        i = self._local(layer)
        threshold = self._tensors.get("threshold")
        if threshold is not None:
            return threshold_acts(pre_act, threshold[i])
        return topk_activation(pre_act, min(self.clt.cfg.k, pre_act.shape[-1]))

    def decoder(self, src: int, dst: int) -> Tensor | None:
        i, j = self._local(src), self._local(dst)
        if j < i:
            return None
        return self._tensors[f"W_dec_{i}"][:, j - i]

    def b_dec(self, dst: int) -> Tensor:
        return self._tensors["b_dec"][self._local(dst)]

    def skip(self, layer: int) -> Tensor | None:
        self._check_layer(layer)
        return None

    def to(self, dtype=None, device=None) -> CrossLayerReplacement:
        self._tensors = {k: v.to(device=device, dtype=dtype) for k, v in self._tensors.items()}
        return self

    def members(self) -> list[tuple[int, SparseAutoencoder]]:
        return [(self.layers[0], self.clt)]


# ----- the manifest ----------------------------------------------------------------------------


def manifest_dict(
    *,
    kind: str,
    model: str,
    n_layers: int,
    layers: Sequence[int],
    input_hook: str,
    output_hook: str,
    members: Sequence[tuple[int, str]],
) -> dict[str, Any]:
    """The content of ``replacement.json``."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "model": model,
        "n_layers": int(n_layers),
        "layers": sorted(int(layer) for layer in layers),
        "input_hook": input_hook,
        "output_hook": output_hook,
        "members": [{"layer": int(layer), "folder": str(folder)} for layer, folder in members],
    }


def write_replacement_manifest(
    folder: str | Path,
    *,
    kind: str,
    model: str,
    n_layers: int,
    layers: Sequence[int],
    input_hook: str,
    output_hook: str,
    members: Sequence[tuple[int, str]],
) -> Path:
    """Write ``folder/replacement.json`` atomically (the member folders are written first:
    a folder with a manifest is a complete set). ``members`` are ``(layer, sub-folder name)``."""
    manifest = manifest_dict(
        kind=kind,
        model=model,
        n_layers=n_layers,
        layers=layers,
        input_hook=input_hook,
        output_hook=output_hook,
        members=members,
    )
    _check_manifest(manifest, Path(folder) / MANIFEST_FILENAME)
    return write_json(Path(folder) / MANIFEST_FILENAME, manifest)


def is_replacement_dir(path: str | Path) -> bool:
    """Whether ``path`` is a replacement set folder (it holds ``replacement.json``)."""
    return (Path(path) / MANIFEST_FILENAME).is_file()


def holds_replacement(path: str | Path) -> bool:
    """Whether ``path`` is a replacement set or a folder with one directly inside it."""
    path = Path(path)
    if is_replacement_dir(path):
        return True
    return path.is_dir() and any(p.is_dir() and is_replacement_dir(p) for p in path.iterdir())


def find_replacement_dir(path: str | Path) -> Path:
    """``path`` if it is a replacement set, else the one set directly inside it (a run folder
    that trained one layered ``[[sae]]``); one-line error when there is none or several."""
    path = Path(path)
    if is_replacement_dir(path):
        return path
    if not path.is_dir():
        raise SaelabError(
            f"no replacement set at {path}: it is not a folder; pass the folder that holds "
            f"{MANIFEST_FILENAME}"
        )
    inside = sorted(p for p in path.iterdir() if p.is_dir() and is_replacement_dir(p))
    if len(inside) == 1:
        return inside[0]
    if not inside:
        raise SaelabError(
            f"no replacement set at {path}: no {MANIFEST_FILENAME} in it or in a folder directly "
            "below it; train one with `saelab train --arch topk_transcoder --set sae.layers=all`"
        )
    names = ", ".join(p.name for p in inside)
    raise SaelabError(f"{path} holds several replacement sets ({names}); pass one of them")


def _check_manifest(manifest: Any, where: Path) -> None:
    def bad(what: str) -> SaelabError:
        return SaelabError(f"{where} {what}; re-save the replacement set")

    if not isinstance(manifest, dict):
        raise bad(f"holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise bad(f"has format {manifest.get('format')!r}, not {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise bad(f"has version {manifest.get('version')!r}; this saelab reads version {VERSION}")
    if manifest.get("kind") not in KINDS:
        raise bad(f"has kind {manifest.get('kind')!r}, not one of {', '.join(KINDS)}")
    if not isinstance(manifest.get("model"), str):
        raise bad("has no model name (a string)")
    n = manifest.get("n_layers")
    if not _is_int(n) or n < 1:
        raise bad(f"has n_layers {n!r}, not a positive integer")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers or not all(_is_int(x) for x in layers):
        raise bad("has no list of layers (integers)")
    if len(set(layers)) != len(layers):
        dup = sorted({x for x in layers if layers.count(x) > 1})
        raise bad(f"lists layer {dup[0]} twice")
    if layers != sorted(layers):
        raise bad("has layers out of order")
    if not all(0 <= x < n for x in layers):
        raise bad(f"has layers outside [0, {n}) for a model of {n} layers")
    for key in ("input_hook", "output_hook"):
        hook = manifest.get(key)
        if not isinstance(hook, str) or "{layer}" not in hook:
            raise bad(f"has {key} {hook!r}, not a hook name with {{layer}} in it")
    members = manifest.get("members")
    if not isinstance(members, list) or not members:
        raise bad("has no members")
    for m in members:
        ok = isinstance(m, dict) and _is_int(m.get("layer")) and isinstance(m.get("folder"), str)
        if not ok:
            raise bad(f"has a member {json.dumps(m)[:60]} without an integer layer and a folder")
        name = m["folder"]
        if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
            raise bad(f"names member folder {name!r}; members must be folders inside the set")
    member_layers = [m["layer"] for m in members]
    if len(set(member_layers)) != len(member_layers):
        dup = sorted({x for x in member_layers if member_layers.count(x) > 1})
        raise bad(f"has two members for layer {dup[0]}")
    if manifest["kind"] == "per_layer":
        missing = sorted(set(layers) - set(member_layers))
        extra = sorted(set(member_layers) - set(layers))
        if missing:
            raise bad(f"has no member for layer {missing[0]}")
        if extra:
            raise bad(f"has a member for layer {extra[0]}, which is not in its layers")
    elif member_layers != [layers[0]]:
        raise bad("(cross_layer) must have one member, at its first layer")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The checked manifest of a set folder (one-line errors for a missing or garbled one)."""
    path = Path(folder) / MANIFEST_FILENAME
    if not path.is_file():
        raise SaelabError(
            f"{folder} is not a replacement set (no {MANIFEST_FILENAME}); pass the folder "
            "`saelab train --set sae.layers=...` wrote"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaelabError(f"{path} is not valid JSON ({exc}); re-save the replacement set") from exc
    _check_manifest(manifest, path)
    return manifest


def load_replacement(path: str | Path, *, device: str = "cpu") -> Replacement:
    """The replacement set at ``path`` (a set folder, or a run folder holding exactly one).

    Checks the manifest's fields, that every member folder exists and loads, that layers are
    unique and that each member reads and writes the manifest's hooks with equal widths;
    every problem is a one-line :class:`~saelab.errors.SaelabError`.
    """
    from saelab.saes.storage import CFG_FILENAME, load_sae

    folder = find_replacement_dir(path)
    manifest = read_manifest(folder)
    where = folder / MANIFEST_FILENAME
    loaded: dict[int, SparseAutoencoder] = {}
    for m in manifest["members"]:
        member_dir = folder / m["folder"]
        if not (member_dir / CFG_FILENAME).is_file():
            raise SaelabError(
                f"{where} names member folder {m['folder']!r} (layer {m['layer']}) but "
                f"{member_dir} holds no saved SAE; restore it or retrain the set"
            )
        loaded[m["layer"]] = load_sae(member_dir, device=device)
    common = {
        "model": manifest["model"],
        "n_layers": manifest["n_layers"],
        "input_hook": manifest["input_hook"],
        "output_hook": manifest["output_hook"],
    }
    if manifest["kind"] == "cross_layer":
        from saelab.saes.clt import CrossLayerTranscoder

        (clt,) = loaded.values()
        if not isinstance(clt, CrossLayerTranscoder):
            raise SaelabError(
                f"{where} is a cross_layer set but its member is a {clt.architecture}; "
                "re-save the replacement set"
            )
        if clt.layers != manifest["layers"]:
            raise SaelabError(
                f"{where} lists layers {manifest['layers']} but its cross-layer transcoder covers "
                f"{clt.layers}; re-save the replacement set"
            )
        _check_member_hooks(clt, clt.layers[0], manifest, where)
        rep: Replacement = CrossLayerReplacement(clt, **common)
    else:
        widths = set()
        for layer, tc in loaded.items():
            if not tc.is_transcoder:
                raise SaelabError(
                    f"{where}: the member of layer {layer} is a {tc.architecture} autoencoder, "
                    "not a transcoder; a replacement set holds transcoders"
                )
            _check_member_hooks(tc, layer, manifest, where)
            widths.add((tc.d_in, tc.d_out))
        if len(widths) > 1:
            raise SaelabError(
                f"{where}: members have different input/output widths {sorted(widths)}; "
                "a set's members must come from one model"
            )
        rep = PerLayerReplacement(loaded, **common)
    rep.folder = folder
    rep._folders = {m["layer"]: m["folder"] for m in manifest["members"]}  # type: ignore[attr-defined]
    return rep


def _check_member_hooks(
    sae: SparseAutoencoder, layer: int, manifest: dict[str, Any], where: Path
) -> None:
    want_in = manifest["input_hook"].format(layer=layer)
    want_out = manifest["output_hook"].format(layer=layer)
    if sae.cfg.hook != want_in or sae.cfg.output_hook != want_out:
        raise SaelabError(
            f"{where}: the member of layer {layer} maps {sae.cfg.hook} -> {sae.cfg.output_hook}, "
            f"not {want_in} -> {want_out}; re-save the replacement set"
        )


# ----- the run side: layered [[sae]] tables ------------------------------------------------------


def layered_transcoder_classes() -> list[str]:
    """Architectures that accept ``sae.layers``: every transcoder and the cross-layer ones."""
    from saelab.saes.registry import ARCHITECTURES

    return sorted(name for name, cls in ARCHITECTURES.items() if cls.is_transcoder)


def hook_template(hook: str) -> str:
    """``blocks.6.ln2.hook_normalized`` → ``blocks.{layer}.ln2.hook_normalized`` (a name with
    ``{layer}`` already is one); one-line error for a name without a ``blocks.N.`` layer."""
    if "{layer}" in hook:
        return hook
    match = _BLOCK.match(hook)
    if match is None:
        raise SaelabError(
            f"sae.layers needs hooks with a layer index (blocks.N.<hook> or blocks.{{layer}}."
            f"<hook>); {hook!r} has none"
        )
    return "blocks.{layer}." + hook[match.end() :]


def layered_hooks(cfg: SAEConfig) -> tuple[str, str]:
    """The (input, output) hook templates of a layered ``[[sae]]``: the MLP's input and output
    (:data:`DEFAULT_INPUT_HOOK` → :data:`DEFAULT_OUTPUT_HOOK`) when it names no output hook,
    else its hooks with the layer number replaced by ``{layer}``."""
    if cfg.output_hook is None:
        return DEFAULT_INPUT_HOOK, DEFAULT_OUTPUT_HOOK
    return hook_template(cfg.hook), hook_template(cfg.output_hook)


def resolve_layers(cfg: SAEConfig, n_layers: int) -> list[int]:
    """The layers of a layered ``[[sae]]`` for a model of ``n_layers`` layers; one-line errors
    for layers outside ``[0, n_layers)``."""
    layers = cfg.layers
    if layers == "all":
        return list(range(n_layers))
    assert isinstance(layers, tuple)
    bad = [x for x in layers if not 0 <= x < n_layers]
    require(
        not bad,
        f"sae.layers has layer {bad[0] if bad else ''} but the model has {n_layers} layers "
        f"(0 to {n_layers - 1}); use layers in that range or `all`",
    )
    return sorted(layers)


def set_folder_name(cfg: SAEConfig) -> str:
    """A layered ``[[sae]]``'s set folder: ``cfg.name``, else
    ``replacement-ARCH-WIDTH-SETTING`` (``replacement-topk_transcoder-x8-k32``)."""
    from saelab.saes.registry import architecture_class

    if cfg.name:
        return cfg.name
    setting = architecture_class(cfg.architecture).folder_setting(cfg)
    width = f"w{cfg.width}" if cfg.width else f"x{cfg.expansion}"
    return f"{SET_PREFIX}-{cfg.architecture}-{width}-{setting}"


def member_configs(cfg: SAEConfig, n_layers: int) -> list[tuple[int, SAEConfig]]:
    """``(layer, SAEConfig)`` of each member a layered ``[[sae]]`` trains: per-layer
    transcoders at ``hook``/``output_hook`` of each layer, or one cross-layer transcoder over
    the range, each named ``SET/MEMBER`` so it is saved inside the set folder."""
    from saelab.saes.registry import architecture_class, sae_folder_name

    cls = architecture_class(cfg.architecture)
    layers = resolve_layers(cfg, n_layers)
    hook_in, hook_out = layered_hooks(cfg)
    set_name = set_folder_name(cfg)
    if getattr(cls, "is_cross_layer", False):
        member = dataclasses.replace(
            cfg,
            hook=hook_in.format(layer=layers[0]),
            output_hook=hook_out.format(layer=layers[0]),
            layers=tuple(layers),
            name=None,
        )
        folder = f"{cls.architecture}-L{layers[0]}-{layers[-1]}-{_width(cfg)}"
        folder += f"-{cls.folder_setting(cfg)}"
        return [(layers[0], dataclasses.replace(member, name=f"{set_name}/{folder}"))]
    out = []
    for layer in layers:
        member = dataclasses.replace(
            cfg,
            hook=hook_in.format(layer=layer),
            output_hook=hook_out.format(layer=layer),
            layers=None,
            name=None,
        )
        named = dataclasses.replace(member, name=f"{set_name}/{sae_folder_name(member)}")
        out.append((layer, named))
    return out


def _width(cfg: SAEConfig) -> str:
    return f"w{cfg.width}" if cfg.width else f"x{cfg.expansion}"


def has_layered_saes(cfg: RunConfig) -> bool:
    return any(s.layers is not None for s in cfg.saes)


def check_layered_sae(cfg: SAEConfig) -> None:
    """The checks of a layered ``[[sae]]`` that need no model: a transcoder architecture,
    hooks with a layer index, and the member's own checks (at layer 0)."""
    from saelab.saes.registry import architecture_class

    cls = architecture_class(cfg.architecture)
    require(
        cls.is_transcoder,
        f"sae.layers is only for transcoder architectures, not {cfg.architecture!r}; use one "
        f"of {', '.join(layered_transcoder_classes())} or drop sae.layers",
    )
    hook_in, hook_out = layered_hooks(cfg)
    probe = dataclasses.replace(
        cfg,
        hook=hook_in.format(layer=0),
        output_hook=hook_out.format(layer=0),
        layers=None if not getattr(cls, "is_cross_layer", False) else (0,),
    )
    cls.check_config(probe)


BUFFER_BUDGET_BYTES = 1 << 30
"""What the shuffle buffer of a run with ``sae.layers`` may hold: 1 GiB. The buffer holds
``data.buffer_size`` rows of every hook (``Σ_hooks d × 4`` bytes a row: 138 KB for 60 hooks of
SmolLM2's width 576), so a larger ``buffer_size`` is lowered to fit (a warning says so)."""


def buffer_rows_that_fit(row_bytes: int, batch_size: int, budget: int = BUFFER_BUDGET_BYTES) -> int:
    """Shuffle-buffer rows that fit ``budget`` bytes at ``row_bytes`` a row, at least one batch."""
    return max(batch_size, budget // max(row_bytes, 1))


def expand_layered_saes(cfg: RunConfig, n_layers: int) -> RunConfig:
    """``cfg`` with every layered ``[[sae]]`` replaced by its members (:func:`member_configs`);
    other tables unchanged. The saved ``config.toml`` keeps the layered table: this is what the
    run trains."""
    if not has_layered_saes(cfg):
        return cfg
    saes: list[SAEConfig] = []
    for sae in cfg.saes:
        if sae.layers is None:
            saes.append(sae)
        else:
            check_layered_sae(sae)
            saes += [member for _, member in member_configs(sae, n_layers)]
    return dataclasses.replace(cfg, saes=tuple(saes))


def fit_buffer(cfg: RunConfig, widths: dict[str, int]) -> tuple[RunConfig, str | None]:
    """``cfg`` (a run with ``sae.layers``, expanded) with ``data.buffer_size`` lowered so the
    buffer of all hooks fits :data:`BUFFER_BUDGET_BYTES`, and the warning to log."""
    row_bytes = 4 * sum(widths.get(h, 0) for h in dict.fromkeys(widths))
    rows = buffer_rows_that_fit(row_bytes, cfg.train.batch_size)
    if cfg.data.buffer_size <= rows:
        return cfg, None
    rows = max(cfg.train.batch_size, rows)
    note = (
        f"data.buffer_size lowered from {cfg.data.buffer_size:,} to {rows:,} rows: "
        f"{len(widths)} hooks at {row_bytes:,} bytes a row would need "
        f"{cfg.data.buffer_size * row_bytes / 2**30:.1f} GiB (budget "
        f"{BUFFER_BUDGET_BYTES / 2**30:.0f} GiB); set it explicitly lower to silence this"
    )
    data = dataclasses.replace(cfg.data, buffer_size=rows)
    return dataclasses.replace(cfg, data=data), note


def write_layered_manifests(cfg: RunConfig, out_dir: str | Path, n_layers: int) -> list[Path]:
    """After a run: write ``replacement.json`` in each layered ``[[sae]]``'s set folder
    (``cfg`` is the run's config as the user wrote it, before expansion)."""
    written = []
    for sae in cfg.saes:
        if sae.layers is None:
            continue
        cls_members = member_configs(sae, n_layers)
        set_name = set_folder_name(sae)
        hook_in, hook_out = layered_hooks(sae)
        from saelab.saes.registry import architecture_class

        cross = getattr(architecture_class(sae.architecture), "is_cross_layer", False)
        written.append(
            write_replacement_manifest(
                Path(out_dir) / set_name,
                kind="cross_layer" if cross else "per_layer",
                model=cfg.model.name,
                n_layers=n_layers,
                layers=resolve_layers(sae, n_layers),
                input_hook=hook_in,
                output_hook=hook_out,
                members=[(layer, m.name.split("/", 1)[1]) for layer, m in cls_members],
            )
        )
    return written


def decoder_floats(layers: int, d_sae: int, d_out: int, cross_layer: bool) -> int:
    """Decoder parameters of a set of ``layers`` layers with ``d_sae`` features each:
    ``layers·F·d`` per-layer, ``Σ_L F·d·(n − L) = F·d·n(n+1)/2`` cross-layer."""
    if not cross_layer:
        return layers * d_sae * d_out
    return d_sae * d_out * layers * (layers + 1) // 2


__all__ = [
    "MANIFEST_FILENAME",
    "CrossLayerReplacement",
    "PerLayerReplacement",
    "Replacement",
    "expand_layered_saes",
    "find_replacement_dir",
    "is_replacement_dir",
    "load_replacement",
    "read_manifest",
    "topk_activation",
    "write_replacement_manifest",
]
