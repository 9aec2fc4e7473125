"""A steering vector, its metadata, and its folder: ``vector.safetensors`` + ``vector.json``.

The tensor is in model units at one hook: ``[d_model]``, or ``[T, d_model]`` for an ActAdd
vector (one row per prompt position after BOS). An ``sae-clamp`` vector holds the raw decoder row
of the clamped feature; the SAE itself is named in the metadata and loaded with the vector.

Example:
    >>> save_vector(vector, "runs/steer/vector")
    >>> vector = load_vector("runs/steer/vector")
    >>> vector.method, vector.hook, tuple(vector.vector.shape)
    ('caa', 'blocks.6.hook_resid_post', (576,))
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor
from transformers import PreTrainedModel

from saelab import __version__
from saelab.atomic import write_json, write_safetensors
from saelab.errors import SaelabError
from saelab.models.hookpoints import hook_dim
from saelab.saes.base import SparseAutoencoder
from saelab.saes.storage import load_sae, read_weights
from saelab.safetensors_check import check_finite

VECTOR_FILENAME = "vector.safetensors"
META_FILENAME = "vector.json"
FORMAT = "saelab-steering-vector"
"""The ``format`` field of ``vector.json``."""
_LAYER = re.compile(r"blocks\.(\d+)\.")


@dataclass
class SteeringVector:
    """A direction (or one per position) to add to the activations at ``hook``.

    Example:
        >>> v = SteeringVector(torch.randn(576), "blocks.6.hook_resid_post", "mean", "default")
        >>> v.d_model, v.layer, v.per_position   # (576, 6, False)
    """

    vector: Float[Tensor, "*T D"]
    """``[D]``, or ``[T, D]`` for ActAdd (row t is added at position t + 1); model units."""
    hook: str
    """Where it was built and, unless moved, where it is applied."""
    method: str
    """One of :data:`~saelab.analysis.steering.config.STEERING_METHODS`."""
    model: str
    """The model it was built on."""
    source: dict[str, Any] = field(default_factory=dict)
    """What it was built from: files, prompts, token counts, SAE folder and feature, units."""
    sae: SparseAutoencoder | None = None
    """sae-clamp: the SAE whose feature is clamped (not saved; ``source["sae"]`` names it)."""

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[-1])

    @property
    def layer(self) -> int | None:
        """The block index of ``hook``, or None for a module path."""
        match = _LAYER.match(self.hook)
        return int(match.group(1)) if match else None

    @property
    def per_position(self) -> bool:
        """An ActAdd vector: one row per position, added front-aligned."""
        return self.vector.ndim == 2

    @property
    def norm(self) -> float:
        """The L2 norm of the whole tensor (all rows of an ActAdd vector together)."""
        return float(self.vector.double().norm())

    @property
    def is_clamp(self) -> bool:
        return self.method == "sae-clamp"

    def metadata(self) -> dict[str, Any]:
        """The content of ``vector.json``."""
        return {
            "format": FORMAT,
            "saelab_version": __version__,
            "model": self.model,
            "hook": self.hook,
            "method": self.method,
            "norm": self.norm,
            "d_model": self.d_model,
            "layer": self.layer,
            "shape": list(self.vector.shape),
            "source": self.source,
        }


def save_vector(vector: SteeringVector, directory: str | Path) -> Path:
    """Write ``vector`` to ``directory`` (created): the tensor, then ``vector.json`` last, each
    atomically, so a folder with a ``vector.json`` is complete."""
    if vector.is_clamp and not vector.source.get("sae"):
        raise SaelabError(
            "this sae-clamp vector records no SAE folder; build it from a saved SAE folder so "
            "that it can be saved"
        )
    directory = Path(directory)
    write_safetensors(directory / VECTOR_FILENAME, {"vector": vector.vector.float().cpu()})
    write_json(directory / META_FILENAME, vector.metadata())
    return directory


def load_vector(directory: str | Path, device: str = "cpu") -> SteeringVector:
    """A vector saved by :func:`save_vector` (an sae-clamp vector loads its SAE too)."""
    directory = Path(directory).expanduser()
    meta_path = directory / META_FILENAME
    if not meta_path.is_file():
        raise SaelabError(
            f"{directory} is not a saved steering vector (no {META_FILENAME}); pass the folder "
            f"that holds {META_FILENAME} and {VECTOR_FILENAME}, e.g. OUT/vector of saelab steer"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise SaelabError(f"{meta_path} is not valid JSON ({e.msg}); save the vector again") from e
    if not isinstance(meta, dict):
        raise SaelabError(f"{meta_path} is not a saelab steering vector file; save it again")
    missing = [k for k in ("format", "hook", "method", "model", "shape") if k not in meta]
    if meta.get("format") != FORMAT or missing:
        raise SaelabError(f"{meta_path} is not a saelab steering vector file; save it again")
    again = "save the vector again with saelab steer"
    tensors = read_weights(directory / VECTOR_FILENAME, fix=again)
    check_finite(tensors, directory / VECTOR_FILENAME, fix=again)
    if "vector" not in tensors or list(tensors["vector"].shape) != meta["shape"]:
        got = list(tensors["vector"].shape) if "vector" in tensors else "no 'vector' tensor"
        raise SaelabError(
            f"{directory / VECTOR_FILENAME} holds {got} but {META_FILENAME} says shape "
            f"{meta['shape']}; save the vector again"
        )
    source = dict(meta.get("source") or {})
    sae = None
    if meta["method"] == "sae-clamp":
        if not isinstance(source.get("sae"), str):
            raise SaelabError(
                f"{meta_path} names no SAE folder for its sae-clamp vector; save it again"
            )
        sae = load_sae(source["sae"], device=device, expected_d_in=int(meta["shape"][-1]))
    return SteeringVector(
        tensors["vector"].to(device), meta["hook"], meta["method"], meta["model"], source, sae
    )


def check_fits(model: PreTrainedModel, vector: SteeringVector, hook: str | None = None) -> str:
    """The hook the vector goes to (``hook`` or its own), after one-line errors for a hook the
    model lacks or a width that differs from the vector's d_model."""
    hook = hook or vector.hook
    width = hook_dim(model, hook)  # UnknownHookError (one line) for a hook the model lacks
    if width != vector.d_model:
        raise SaelabError(
            f"the steering vector has d_model={vector.d_model} ({vector.method}, built on "
            f"{vector.model} at {vector.hook}) but {hook} of {model_label(model)} has width "
            f"{width}; use a vector built on a model and hook of width {width}"
        )
    return hook


def model_label(model: PreTrainedModel) -> str:
    """A model's name for metadata: where it was loaded from, else its type."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model"))


def decoder_row(sae: SparseAutoencoder, feature: int) -> Float[Tensor, " D"]:
    """Feature ``feature``'s decoder row in model units (what f_i = 1 adds to the output)."""
    if not 0 <= feature < sae.d_sae:
        raise SaelabError(
            f"feature {feature} does not exist: the SAE has features 0-{sae.d_sae - 1}"
        )
    if sae.d_out != sae.d_in:
        raise SaelabError(
            f"the SAE at {sae.cfg.hook} is a transcoder (it writes {sae.cfg.output_hook}); "
            "steer with an SAE that reconstructs its own hook"
        )
    # The saved weights are folded, but an SAE fresh from training still carries its scale.
    return (sae.W_dec[feature] / sae.activation_scale).detach().float()
