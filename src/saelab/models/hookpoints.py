"""TransformerLens-style hook names (`blocks.6.hook_resid_post`) mapped to Hugging Face modules.

Model knowledge is data: `HOOKS` says what each hook is and how wide, `FAMILIES` says where each
family keeps it. Resolving, listing and the unknown-hook message all read these two tables, so
they cannot drift apart. Any name from `model.named_modules()` also works (its output is
captured), which covers families without a table.

Example:
    >>> point = resolve_hook(model, "blocks.6.hook_resid_post")
    >>> point.module_path, point.where
    ('model.layers.6', 'output')
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from saelab.errors import SaelabError, UnknownHookError

Where = Literal["input", "output"]
Width = Literal["d_model", "d_mlp", "d_attn"]


@dataclass(frozen=True)
class HookPoint:
    """Where one hook's activation `[batch, pos, d]` lives in a model."""

    name: str
    """The name the user gave: a hook name such as `blocks.6.hook_resid_post`, or a module path."""
    module_path: str
    """The module in `model.named_modules()` that carries the activation."""
    where: Where
    """`"input"`: the module's first positional input; `"output"`: its output (or output[0])."""
    layer: int | None
    """The block index, or None for a module path outside the blocks (or of an unknown family)."""


@dataclass(frozen=True)
class HookKind:
    """One hook suffix, the same in every family."""

    width: Width
    """Which model width the activation has."""
    doc: str
    """What the activation is, for `saelab hooks`."""


# Suffix after `blocks.{L}.` -> what it is, in the order the forward pass computes them.
HOOKS: dict[str, HookKind] = {
    "hook_resid_pre": HookKind("d_model", "residual stream entering the block"),
    "attn.hook_z": HookKind("d_attn", "attention values of all heads, before the output proj"),
    "hook_attn_out": HookKind("d_model", "what attention adds to the residual stream"),
    "ln2.hook_normalized": HookKind("d_model", "output of the pre-MLP norm = the MLP's input"),
    "mlp.hook_post": HookKind("d_mlp", "MLP hidden activation, before the down projection"),
    "hook_mlp_out": HookKind("d_model", "what the MLP adds to the residual stream"),
    "hook_resid_post": HookKind("d_model", "residual stream leaving the block"),
}


@dataclass(frozen=True)
class Family:
    """Where one model family keeps each hook, as module paths relative to a block."""

    name: str
    """Shown to users in messages."""
    model_types: tuple[str, ...]
    """The `config.model_type` values that use this layout."""
    blocks: str
    """Path of the `ModuleList` of decoder blocks in the `*ForCausalLM` model."""
    sites: Mapping[str, tuple[str, Where]]
    """Hook suffix -> (module path inside the block, "" for the block itself; input or output)."""


_LLAMA_SITES: dict[str, tuple[str, Where]] = {
    "hook_resid_pre": ("", "input"),
    "attn.hook_z": ("self_attn.o_proj", "input"),
    "hook_attn_out": ("self_attn", "output"),
    "ln2.hook_normalized": ("post_attention_layernorm", "output"),
    "mlp.hook_post": ("mlp.down_proj", "input"),
    "hook_mlp_out": ("mlp", "output"),
    "hook_resid_post": ("", "output"),
}

FAMILIES: tuple[Family, ...] = (
    Family(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        {
            "hook_resid_pre": ("", "input"),
            "attn.hook_z": ("attn.c_proj", "input"),
            "hook_attn_out": ("attn", "output"),
            "ln2.hook_normalized": ("ln_2", "output"),
            "mlp.hook_post": ("mlp.c_proj", "input"),
            "hook_mlp_out": ("mlp", "output"),
            "hook_resid_post": ("", "output"),
        },
    ),
    Family(
        # Pythia's parallel residual (attention and MLP both read the block input) changes no
        # module: resid_post = resid_pre + attn_out + mlp_out holds either way.
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        {
            "hook_resid_pre": ("", "input"),
            "attn.hook_z": ("attention.dense", "input"),
            "hook_attn_out": ("attention", "output"),
            "ln2.hook_normalized": ("post_attention_layernorm", "output"),
            "mlp.hook_post": ("mlp.dense_4h_to_h", "input"),
            "hook_mlp_out": ("mlp", "output"),
            "hook_resid_post": ("", "output"),
        },
    ),
    Family("llama", ("llama", "mistral", "qwen2"), "model.layers", _LLAMA_SITES),
    Family("gemma", ("gemma",), "model.layers", _LLAMA_SITES),
    Family(
        # Gemma2 normalises each sublayer's output before adding it to the residual stream, so
        # attn_out / mlp_out are the post-norms' outputs: what the residual stream receives.
        "gemma2",
        ("gemma2",),
        "model.layers",
        {
            **_LLAMA_SITES,
            "hook_attn_out": ("post_attention_layernorm", "output"),
            "ln2.hook_normalized": ("pre_feedforward_layernorm", "output"),
            "hook_mlp_out": ("post_feedforward_layernorm", "output"),
        },
    ),
)

_BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
_HOOK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


def split_hook_name(name: str) -> tuple[int, str] | None:
    """(layer, suffix) of a hook name: `blocks.6.hook_resid_post` → (6, "hook_resid_post");
    None for anything else (a module path, an unknown suffix)."""
    match = _HOOK_NAME.fullmatch(name or "")
    if match is None or match.group(2) not in HOOKS:
        return None
    return int(match.group(1)), match.group(2)


def hook_layer_and_suffix(name: str) -> tuple[int, str]:
    """(layer, suffix) of a hook name, as :func:`split_hook_name`; a name without a layer index
    (a module path) has no counterpart at other layers and raises a one-line `SaelabError`."""
    parts = split_hook_name(name)
    if parts is None:
        raise SaelabError(
            f"hook {name!r} has no layer index, so it has no counterpart at other layers; "
            "use a blocks.{L}.<hook> name (see: saelab hooks MODEL)"
        )
    return parts


def hook_at_layer(name: str, layer: int) -> str:
    """The hook of the same type as `name` at `layer`: (`blocks.6.hook_resid_post`, 2) →
    `blocks.2.hook_resid_post`."""
    _, suffix = hook_layer_and_suffix(name)
    return f"blocks.{layer}.{suffix}"


def model_family(model: PreTrainedModel) -> Family | None:
    """The hook table for `model`, or None when saelab has none for its `config.model_type`."""
    return _BY_MODEL_TYPE.get(getattr(model.config, "model_type", ""))


def _blocks_path(model: nn.Module, family: Family) -> str | None:
    """Path of the decoder blocks; also finds them in a bare base model (`LlamaModel`)."""
    modules = dict(model.named_modules())
    for path in (family.blocks, family.blocks.partition(".")[2]):
        if isinstance(modules.get(path), nn.ModuleList):
            return path
    return None


def n_layers(model: PreTrainedModel) -> int:
    """Number of decoder blocks of a model whose family saelab knows."""
    family = model_family(model)
    blocks = _blocks_path(model, family) if family else None
    if blocks is None:
        raise SaelabError(
            f"saelab has no hook table for {_model_type(model)} models; "
            "use module paths from model.named_modules() (see: saelab hooks MODEL)"
        )
    return len(model.get_submodule(blocks))


def list_hooks(model: PreTrainedModel) -> list[str]:
    """Every hook name of `model`, block by block in forward order ([] for an unknown family)."""
    if model_family(model) is None:
        return []
    return [f"blocks.{layer}.{suffix}" for layer in range(n_layers(model)) for suffix in HOOKS]


def resolve_hook(model: PreTrainedModel, name: str) -> HookPoint:
    """The module and side that carry hook `name` (a hook name or a module path) in `model`.

    Raises `UnknownHookError` (one line, listing the valid names) when neither matches.
    """
    return _resolve(model, name)[0]


def _resolve(model: PreTrainedModel, name: str) -> tuple[HookPoint, HookKind | None]:
    """The hook point, and its kind when `name` is a hook name rather than a module path."""
    family = model_family(model)
    blocks = _blocks_path(model, family) if family else None
    parts = split_hook_name(name)
    if family and blocks and parts is not None:
        layer, suffix = parts
        if layer < len(model.get_submodule(blocks)):
            module, where = family.sites[suffix]
            path = f"{blocks}.{layer}" + (f".{module}" if module else "")
            return HookPoint(name, path, where, layer), HOOKS[suffix]
    if name and name in dict(model.named_modules()):
        return HookPoint(name, name, "output", _layer_of_path(name, blocks)), None
    raise UnknownHookError(_unknown_hook_message(model, name, blocks))


def hook_layer(model: PreTrainedModel, name: str) -> int | None:
    """The block index of hook `name`, or None for a module path outside the blocks."""
    return resolve_hook(model, name).layer


def decoder_blocks(model: PreTrainedModel) -> nn.ModuleList | None:
    """The `ModuleList` of decoder blocks, in forward order; None for a family without a table."""
    family = model_family(model)
    blocks = _blocks_path(model, family) if family else None
    return None if blocks is None else model.get_submodule(blocks)


def residual_entry(model: PreTrainedModel, name: str) -> tuple[int, bool]:
    """Where a change at hook `name` enters the stack of blocks: (the first block it reaches,
    whether the activation there IS the residual stream entering that block).

    `blocks.L.hook_resid_pre` → (L, True); `blocks.L.hook_resid_post` (or the block's own path)
    → (L + 1, True), L + 1 being the block count for the last block (the final norm's input);
    any other hook inside block L → (L, False); a module outside the blocks, or a family without
    a table → (0, False): everything from the embeddings on depends on it.
    """
    point = resolve_hook(model, name)
    family = model_family(model)
    blocks = _blocks_path(model, family) if family else None
    if blocks is None or point.layer is None:
        return 0, False
    if point.module_path == f"{blocks}.{point.layer}":
        return (point.layer, True) if point.where == "input" else (point.layer + 1, True)
    return point.layer, False


def hook_dim(model: PreTrainedModel, name: str) -> int:
    """The width d of the activation `[batch, pos, d]` at hook `name`."""
    point, kind = _resolve(model, name)
    if kind is not None:
        return _WIDTHS[kind.width](model.config)
    return _module_output_width(model.get_submodule(point.module_path), name)


def _hidden(config: PretrainedConfig) -> int:
    return config.hidden_size


def _d_mlp(config: PretrainedConfig) -> int:
    # GPT-2 calls it n_inner and leaves it None for the default 4 * d_model.
    width = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return width or 4 * config.hidden_size


def _d_attn(config: PretrainedConfig) -> int:
    # Gemma and SmolLM2 set head_dim explicitly; it need not be d_model / n_heads.
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


_WIDTHS = {"d_model": _hidden, "d_mlp": _d_mlp, "d_attn": _d_attn}


def _module_output_width(module: nn.Module, name: str) -> int:
    """Output width of a raw module path, from the module's own shape attributes."""
    for attr in ("out_features", "nf", "embedding_dim"):  # Linear, GPT-2 Conv1D, Embedding
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.ndim == 1:  # LayerNorm, RMSNorm
        return weight.shape[0]
    raise SaelabError(
        f"cannot tell the width of module '{name}' ({type(module).__name__}) from its "
        "parameters; use a blocks.* hook name or a Linear/norm module inside it"
    )


def _layer_of_path(path: str, blocks: str | None) -> int | None:
    if blocks is None or not path.startswith(f"{blocks}."):
        return None
    return int(path[len(blocks) + 1 :].partition(".")[0])


def _model_type(model: PreTrainedModel) -> str:
    return getattr(model.config, "model_type", None) or type(model).__name__


def _unknown_hook_message(model: PreTrainedModel, name: str, blocks: str | None) -> str:
    family = model_family(model)
    if family is None or blocks is None:
        return (
            f"unknown hook '{name}' for {_model_type(model)} model; saelab has no hook table for "
            "this family, so only module paths work (see: saelab hooks MODEL)"
        )
    count = len(model.get_submodule(blocks))
    return (
        f"unknown hook '{name}' for {family.name} model with {count} layers; valid: "
        f"blocks.{{0..{count - 1}}}.{'|'.join(HOOKS)}, or a module path (see: saelab hooks MODEL)"
    )
