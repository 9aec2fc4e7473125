"""The language model side: loading models, naming hook points, reading and patching activations."""

from saelab.models.hookpoints import (
    HOOKS,
    HookPoint,
    hook_at_layer,
    hook_dim,
    hook_layer,
    hook_layer_and_suffix,
    list_hooks,
    n_layers,
    resolve_hook,
    split_hook_name,
)
from saelab.models.intervene import capture, patch, run_to_hooks
from saelab.models.loading import bos_token_id, cache_root, load_model

__all__ = [
    "HOOKS",
    "HookPoint",
    "bos_token_id",
    "cache_root",
    "capture",
    "hook_at_layer",
    "hook_dim",
    "hook_layer",
    "hook_layer_and_suffix",
    "list_hooks",
    "load_model",
    "n_layers",
    "patch",
    "resolve_hook",
    "run_to_hooks",
    "split_hook_name",
]
