"""Read and rewrite activations during a forward pass, through hooks that only live in a `with`.

`capture` records activations (and by default stops the forward pass as soon as it has them all,
so later layers and the LM head never run); `patch` replaces activations with a function of
themselves. Both resolve hook names once on entry and remove every hook in `finally`; they nest.
At one hook point, patches always run before captures, so a capture sees the value the model
actually uses, whichever context was entered first.

Example:
    >>> with capture(model, ["blocks.6.hook_resid_post"]) as acts:
    ...     model(input_ids)
    >>> acts["blocks.6.hook_resid_post"].shape  # [batch, pos, d_model]
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from saelab.errors import SaelabError
from saelab.models.hookpoints import HookPoint, decoder_blocks, resolve_hook

Activation = Float[Tensor, "batch pos d"]
PatchFn = Callable[[Tensor], Tensor]


class _StopForward(Exception):
    """Raised from a hook to end a forward pass whose remaining layers nobody needs.

    Each capture swallows only the instance it raised itself, so a stop never escapes its `with`.
    """


@contextmanager
def capture(
    model: PreTrainedModel, hooks: Sequence[str], stop: bool = True, detach: bool = True
) -> Iterator[dict[str, Activation]]:
    """Record the activation `[batch, pos, d]` at each hook during the forward passes in the block.

    With `stop`, the forward pass is ended as soon as every hook has fired, so the model call
    must be the last statement in the block and returns nothing. Without it, each forward
    overwrites the previous one's activations. `detach=False` keeps the autograd graph.

    Example:
        >>> with capture(model, ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]) as acts:
        ...     model(input_ids)
    """
    points = _resolve_all(model, hooks)
    acts: dict[str, Activation] = {}
    pending = set(points)
    stopper = _StopForward()

    def record(point: HookPoint, act: Tensor) -> None:
        acts[point.name] = act.detach() if detach else act
        pending.discard(point.name)
        if stop and not pending:
            pending.update(points)  # should the caller catch the stop and run again
            raise stopper

    with ExitStack() as handles:
        for point in points.values():
            handles.callback(_register(model, point, record, prepend=False).remove)
        try:
            yield acts
        except _StopForward as raised:
            if raised is not stopper:
                raise
        finally:
            # The stop's traceback holds the forward pass's frames, and through `record` the
            # stop itself: a cycle that kept every pass's activations alive until the garbage
            # collector ran (gigabytes for a 60-hook stream). Cut it.
            stopper.__traceback__ = None


@contextmanager
def patch(model: PreTrainedModel, fns: Mapping[str, PatchFn]) -> Iterator[None]:
    """Replace the activation `[batch, pos, d]` at each hook by `fn(act)` during forward passes.

    `fn` must return a tensor of the activation's shape. Patches at the same hook compose, the
    innermost `with` applied first.

    Example:
        >>> with patch(model, {"blocks.2.hook_resid_post": torch.zeros_like}):
        ...     logits = model(input_ids).logits
    """
    points = _resolve_all(model, list(fns))

    def replace(point: HookPoint, act: Tensor) -> Tensor:
        new = fns[point.name](act)
        if not isinstance(new, Tensor) or new.shape != act.shape:
            got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
            raise SaelabError(
                f"patch for '{point.name}' returned {got} but the activation there has shape "
                f"{tuple(act.shape)}; return a tensor of the same shape"
            )
        return new

    with ExitStack() as handles:
        for point in points.values():
            # Prepended, so every capture at this hook (registered earlier or later) sees the
            # patched value that the rest of the model receives.
            handles.callback(_register(model, point, replace, prepend=True).remove)
        yield


def run_to_hooks(
    model: PreTrainedModel,
    input_ids: Int[Tensor, "batch pos"],
    hooks: Sequence[str],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> dict[str, Activation]:
    """Activations `[batch, pos, d]` at `hooks`, running the model only as far as they need.

    Example:
        >>> acts = run_to_hooks(model, input_ids, ["blocks.6.hook_resid_post"])
    """
    names = [hooks] if isinstance(hooks, str) else list(hooks)
    with torch.no_grad(), capture(model, names, stop=True) as acts:
        model(input_ids, attention_mask=attention_mask, use_cache=False)
    missing = [name for name in names if name not in acts]
    if missing:
        raise SaelabError(
            f"hooks {missing} never fired during the forward pass; pick modules that the "
            "model's forward calls (see: saelab hooks MODEL)"
        )
    return acts


def run_blocks_from(
    model: PreTrainedModel,
    input_ids: Int[Tensor, "batch pos"],
    start: int,
    residual: Activation | None = None,
    patches: Mapping[str, PatchFn] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """The final hidden states (after the final norm, before the LM head) of a forward pass
    that skips blocks `[0, start)` and gives block `start` the residual stream `residual`
    (the activation that flows out of block `start - 1`); `patches` apply during the pass.

    The model's own forward still runs around the blocks, so position ids, rotary embeddings,
    attention masks and per-layer attention types are exactly those of a full pass; the skipped
    blocks are swapped for pass-throughs (`start == len(blocks)` runs only the final norm), and
    the embeddings they would have received are dropped. `start == 0` is a plain full pass
    (`residual` must be None). Equal to a full pass up to float rounding when `residual` is the
    clean activation there; see `residual_entry` for where a hook's change enters.

    Example:
        >>> pre = run_to_hooks(model, ids, ["blocks.6.hook_resid_pre"])["blocks.6.hook_resid_pre"]
        >>> hidden = run_blocks_from(model, ids, 6, pre)
        >>> logits = final_logits(model, hidden)
    """
    base = model.base_model
    blocks = decoder_blocks(model)
    if start == 0:
        if residual is not None:
            raise SaelabError("run_blocks_from at block 0 starts from the embeddings; no residual")
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(patch(model, patches or {}))
            if blocks is not None and model not in _RETURNS_TUPLES:  # learnt for free here
                note = blocks[0].register_forward_hook(_note_output_form(model), prepend=True)
                stack.callback(note.remove)
            return base(input_ids, use_cache=False).last_hidden_state
    if blocks is None or not 0 < start <= len(blocks) or residual is None:
        raise SaelabError(
            f"cannot start at block {start} of this {model.config.model_type} model; give the "
            "residual entering a block of a family saelab knows (see: saelab hooks MODEL)"
        )
    as_tuple = _blocks_return_tuples(model, blocks, input_ids)
    skipped = [blocks[i] for i in range(start)]
    try:
        for i, block in enumerate(skipped):
            blocks[i] = _Skipped(block, residual if i == start - 1 else None, as_tuple)
        with torch.no_grad(), patch(model, patches or {}):
            return base(input_ids, use_cache=False).last_hidden_state
    finally:
        for i, block in enumerate(skipped):
            blocks[i] = block


def final_logits(
    model: PreTrainedModel, hidden: Float[Tensor, "*rows d_model"]
) -> Float[Tensor, "*rows vocab"]:
    """The LM head on final hidden states (`run_blocks_from`'s output, or rows of it), with
    Gemma 2's logit soft-capping: the logits the causal LM returns for those positions."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class _Skipped(nn.Module):
    """Stands in for a skipped block: passes its input on (or hands out the given residual)."""

    def __init__(self, block: nn.Module, residual: Tensor | None, as_tuple: bool) -> None:
        super().__init__()
        self.residual, self.as_tuple = residual, as_tuple
        # Families that read a per-block attribute in their loop (Gemma 2's attention type)
        # find it here too; the block itself is not registered, so it is not a submodule.
        for name in ("attention_type", "layer_type", "is_sliding", "layer_idx"):
            if hasattr(block, name):
                setattr(self, name, getattr(block, name))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        out = hidden if self.residual is None else self.residual.to(hidden.dtype)
        return (out,) if self.as_tuple else out


_RETURNS_TUPLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per model: do its blocks return `(hidden, ...)` (older transformers) or the hidden states?"""


def _note_output_form(model: PreTrainedModel) -> Callable[..., None]:
    def note(_: nn.Module, args: tuple, output: Any) -> None:
        _RETURNS_TUPLES[model] = isinstance(output, tuple)

    return note


def _blocks_return_tuples(model: PreTrainedModel, blocks: nn.ModuleList, input_ids: Tensor) -> bool:
    """Whether this model's blocks return `(hidden, ...)` rather than the hidden states: seen on
    a full pass (start 0), else once per model on a one-token pass stopped after block 0."""
    if model not in _RETURNS_TUPLES:
        stopper = _StopForward()
        note_form = _note_output_form(model)

        def note(module: nn.Module, args: tuple, output: Any) -> None:
            note_form(module, args, output)
            raise stopper

        handle = blocks[0].register_forward_hook(note, prepend=True)
        try:
            with torch.no_grad():
                model.base_model(input_ids[:1, :1], use_cache=False)
        except _StopForward as raised:
            if raised is not stopper:
                raise
        finally:
            handle.remove()
    return _RETURNS_TUPLES.get(model, False)


def _resolve_all(model: PreTrainedModel, names: Sequence[str]) -> dict[str, HookPoint]:
    if isinstance(names, str):  # a lone name would otherwise be split into characters
        names = [names]
    return {name: resolve_hook(model, name) for name in dict.fromkeys(names)}


def _register(
    model: PreTrainedModel,
    point: HookPoint,
    on_act: Callable[[HookPoint, Tensor], Tensor | None],
    prepend: bool,
) -> RemovableHandle:
    """Hook `on_act` onto `point`; a tensor it returns replaces the activation."""
    module = model.get_submodule(point.module_path)
    if point.where == "input":
        input_name = _first_parameter(module)

        def pre_hook(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            # Blocks and projections take the activation positionally; fall back to the keyword
            # in case a caller passes it by name.
            if args:
                new = on_act(point, args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = on_act(point, kwargs[input_name])
            return None if new is None else (args, {**kwargs, input_name: new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend)

    def hook(_: nn.Module, args: tuple, output: Any) -> Any:
        # Attention modules and older decoder layers return a tuple whose [0] is the activation.
        if isinstance(output, Tensor):
            return on_act(point, output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            new = on_act(point, output[0])
            return None if new is None else (new, *output[1:])
        raise SaelabError(
            f"module '{point.module_path}' returns {type(output).__name__}, not a tensor; hook "
            "one of its submodules instead (see: saelab hooks MODEL)"
        )

    return module.register_forward_hook(hook, prepend=prepend)


def _first_parameter(module: nn.Module) -> str:
    parameters = list(inspect.signature(module.forward).parameters)
    return parameters[0] if parameters else "hidden_states"
