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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from saelab.errors import SaelabError
from saelab.models.hookpoints import HookPoint, resolve_hook

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
