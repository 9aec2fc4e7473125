"""Check a run before it starts (``saelab validate``): the config, the architecture names and
every hook against the model's modules, built on the ``meta`` device so no weight is read.

Example::

    check = check_run(load_run_config("run.toml"))
    check.widths  # {'blocks.6.hook_resid_post': 576}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from saelab.config import RunConfig, require
from saelab.errors import SaelabError
from saelab.models.hookpoints import hook_dim, model_family, n_layers
from saelab.models.loading import DEFAULT_MODEL, default_gguf_path, gguf_cache_dir
from saelab.saes.registry import check_run_saes


@dataclass(frozen=True)
class RunCheck:
    """What :func:`check_run` found: the hooks' widths (None when not checked against a model)
    and notes on what it could not check."""

    cfg: RunConfig
    model: str
    """The model as read: its type and size, or why it was not read."""
    widths: dict[str, int] | None
    notes: list[str] = field(default_factory=list)


def check_run(cfg: RunConfig) -> RunCheck:
    """One-line :class:`~saelab.errors.SaelabError` for the first problem of ``cfg`` that shows
    before training (config checks happen as ``cfg`` is built): an unknown architecture, a
    missing activation cache, a hook the model lacks (the message lists the valid ones)."""
    check_run_saes(cfg.saes)
    if cfg.data.activations is not None:
        folder = Path(cfg.data.activations)
        require(folder.is_dir(), f"data.activations: no activation cache at {folder}")
        note = "training reads the activation cache; its hooks are checked when the run starts"
        return RunCheck(cfg, f"(not read: activations from {folder})", None, [note])
    model = model_skeleton(cfg.model.name)
    notes = []
    if any(s.layers is not None for s in cfg.saes):  # replacement sets: their members' hooks
        from saelab.saes.replacement import expand_layered_saes

        members = expand_layered_saes(cfg, n_layers(model))
        notes.append(f"sae.layers expands to {len(members.saes)} SAE(s) trained from one pass")
        cfg = members
    widths = {hook: hook_dim(model, hook) for hook in cfg.hooks}  # unknown hook: one line
    family = model_family(model)
    shape = f"{n_layers(model)} layers" if family is not None else "unknown family: module paths"
    about = f"{cfg.model.name} ({model.config.model_type}, {shape}; config only, no weights read)"
    return RunCheck(cfg, about, widths, notes)


def model_skeleton(name: str) -> PreTrainedModel:
    """The causal LM ``name`` (as :func:`~saelab.models.loading.load_model` takes it) built from
    its config on the ``meta`` device: every module and shape, no weights."""
    config = model_config(name)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as err:
        reason = " ".join(str(err).split())[:300]
        raise SaelabError(
            f"model '{name}' is not a causal LM transformers knows ({reason})"
        ) from err


def model_config(name: str) -> PretrainedConfig:
    """The HF config of model ``name``: from the model folder or hub, or a GGUF file's metadata
    (the default model: its dequantised copy when cached, else the GGUF header; never the
    weights)."""
    try:
        if name == DEFAULT_MODEL or name.endswith(".gguf"):
            gguf = default_gguf_path() if name == DEFAULT_MODEL else Path(name).expanduser()
            require(gguf.is_file(), f"no GGUF file at '{name}'; check the path")
            cached = gguf_cache_dir(gguf)
            if cached.is_dir():
                return AutoConfig.from_pretrained(cached)
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        local = Path(name).expanduser()
        return AutoConfig.from_pretrained(str(local) if local.is_dir() else name)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise SaelabError(
            f"could not read the config of model '{name}' ({reason}); pass 'default', a .gguf "
            "file, a local model directory or a Hugging Face hub id"
        ) from err
