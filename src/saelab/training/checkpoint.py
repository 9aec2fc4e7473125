"""Resumable checkpoints without pickles: nested state → one safetensors file plus one JSON file.

Any nested structure of dicts, lists, numbers, strings and tensors (an optimiser ``state_dict``,
the activation stream's buffer, RNG states) is split into its tensors, stored in safetensors under
dotted keys, and a JSON skeleton whose leaves name those keys. Checkpoints live in
``OUT/checkpoints/step_NNNNNNNN/``; ``OUT/checkpoints/latest.json`` names the newest complete one
and is only rewritten after that folder is complete, so a crash mid-write leaves the previous
checkpoint usable.

Under torchrun every process writes its own named states into the same folder (rank 0 the
shared ones, the others ``rank_R`` or their own SAEs); rank 0 alone creates the folder, renames
it once all have written, and moves ``latest.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saelab.atomic import publish_folder, write_json, write_safetensors
from saelab.errors import SaelabError
from saelab.safetensors_check import read_tensors

if TYPE_CHECKING:
    from saelab.training.distributed import Distributed

log = logging.getLogger(__name__)

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``obj`` into (tensors by dotted key, JSON-able skeleton)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[key] = node.detach().cpu()
            return {_TENSOR: key}
        if isinstance(node, dict):
            return {
                "__dict__": [
                    [walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")]
                    for i, (k, v) in enumerate(node.items())
                ]
            }
        if isinstance(node, (list, tuple)):
            items = [walk(v, f"{key}.{i}") for i, v in enumerate(node)]
            return {_TUPLE: items} if isinstance(node, tuple) else items
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot checkpoint a {type(node).__name__} at {key}")

    return tensors, walk(obj, prefix or "s")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    def build(node: Any) -> Any:
        if isinstance(node, dict):
            if _TENSOR in node:
                return tensors[node[_TENSOR]]
            if _TUPLE in node:
                return tuple(build(v) for v in node[_TUPLE])
            return {build(k): build(v) for k, v in node["__dict__"]}
        if isinstance(node, list):
            return [build(v) for v in node]
        return node

    return build(skeleton)


def save_state(directory: Path, name: str, state: Any) -> None:
    tensors, skeleton = flatten_state(state)
    write_safetensors(directory / f"{name}.safetensors", tensors)
    write_json(directory / f"{name}.json", skeleton)


def load_state(directory: Path, name: str) -> Any:
    json_path = directory / f"{name}.json"
    if not json_path.is_file():
        raise SaelabError(f"checkpoint {directory} lacks {name}.json; it is incomplete")
    skeleton = json.loads(json_path.read_text())
    tensors_path = directory / f"{name}.safetensors"
    if not tensors_path.is_file():
        raise SaelabError(f"checkpoint {directory} lacks {tensors_path.name}; it is incomplete")
    # Any dtype: a state holds counters (int64), RNG states (uint8) and bfloat16 weights, not
    # only the float weights an SAE file may hold.
    fix = "the checkpoint is damaged; start the run again in a new --out folder"
    return unflatten_state(read_tensors(tensors_path, fix=fix, dtypes=None), skeleton)


def write_checkpoint(
    out_dir: Path,
    step: int,
    states: dict[str, Any],
    keep: int = 2,
    *,
    dist: Distributed | None = None,
) -> Path:
    """Write each named state into a new step folder, then point ``latest.json`` at it.

    With ``dist`` (a torchrun job) every process calls this with its own ``states``; the folder
    is made, renamed and pointed at by rank 0 only, between barriers.
    """
    root = out_dir / "checkpoints"
    final = root / f"step_{step:08d}"
    # A fixed name, not a temp_folder_beside: every process must know where to write.
    partial = root / f".step_{step:08d}.partial"
    main = dist is None or dist.is_main
    if main:
        # What a killed writer left half-written: this step's, or that of a step the resumed run
        # does not write again (one an interrupted run was saving at its own step).
        stale = sorted(root.glob(".step_*.partial"))
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
        if stale:
            log.warning("removed %d half-written checkpoint(s) in %s", len(stale), root)
        partial.mkdir(parents=True)
    if dist is not None:
        dist.barrier()
    for name, state in states.items():
        save_state(partial, name, state)
    if dist is not None:
        dist.barrier()
    if main:
        publish_folder(partial, final)
        write_json(root / "latest.json", {"step": step, "path": final.name})
        # The newest `keep` folders stay (at least the one just written).
        for old in sorted(root.glob("step_*"))[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    if dist is not None:
        dist.barrier()  # nobody reads or writes checkpoints before the pointer has moved
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return None
    path = out_dir / "checkpoints" / json.loads(pointer.read_text())["path"]
    return path if path.is_dir() else None
