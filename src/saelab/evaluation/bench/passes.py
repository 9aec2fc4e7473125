"""Forward passes shared by every SAE on a hook: token sequences in, per-sequence activations
out (at one position of each sequence, or averaged over its tokens), both the model's own at each
hook and each SAE's latents, from ONE pass of the model per batch.

Sequences are right-padded (with an attention mask, so the real tokens see only real tokens) and
run only as far as the deepest hook needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from saelab.errors import SaelabError
from saelab.models.hookpoints import hook_dim
from saelab.models.intervene import run_to_hooks
from saelab.saes.base import SparseAutoencoder


@dataclass
class LoadedSAE:
    """A saved SAE as the suites use it: its folder (the result's key), the module, its info."""

    key: str
    sae: SparseAutoencoder
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def hook(self) -> str:
        return self.sae.cfg.hook


def load_saes(sae_dirs: Sequence[str | Path], device: str = "cpu") -> list[LoadedSAE]:
    """Each SAE folder loaded, with its :func:`~.common.sae_info`."""
    from saelab.evaluation.bench.common import sae_info
    from saelab.saes.storage import load_sae

    if not sae_dirs:
        raise SaelabError("no SAEs to benchmark; pass at least one SAE folder")
    return [LoadedSAE(str(d), load_sae(d, device=device).eval(), sae_info(d)) for d in sae_dirs]


def model_name_of(loaded: LoadedSAE, override: str | None) -> str:
    """The model an SAE is measured on: ``override``, else the one it was trained on."""
    return override or str(loaded.sae.metadata.get("model_name") or "default")


def check_reachable(model, loaded: Sequence[LoadedSAE], model_name: str) -> None:
    """One-line error unless every SAE's hook exists in ``model`` with the SAE's input width
    (an unknown hook lists the model's hooks)."""
    for item in loaded:
        width = hook_dim(model, item.hook)  # UnknownHookError names the valid hooks
        if width != item.sae.d_in:
            raise SaelabError(
                f"SAE {item.key} reads d_in={item.sae.d_in} at {item.hook} but {model_name} has "
                f"width {width} there; benchmark it on the model it was trained on (--model)"
            )


@torch.no_grad()
def sequence_features(
    model,
    sequences: Sequence[Sequence[int]],
    loaded: Sequence[LoadedSAE],
    *,
    positions: Sequence[int] | None = None,
    pad_id: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "forward",
) -> tuple[dict[str, Float[Tensor, "N D"]], list[Float[Tensor, "N F"]]]:
    """Per sequence: the model's activation at each SAE's hook and each SAE's latents, read at
    ``positions[i]`` of sequence ``i`` (negative counts from its end), or, without
    ``positions``, averaged over its tokens after the first (BOS). Returns ``({hook: [N, D]},
    [latents [N, F] per SAE, in order])``, float32 on the CPU. One model pass per batch."""
    device = next(model.parameters()).device
    hooks = sorted({item.hook for item in loaded})
    acts_out: dict[str, list[Tensor]] = {h: [] for h in hooks}
    feats_out: list[list[Tensor]] = [[] for _ in loaded]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # less padding
    bar = tqdm(total=len(sequences), disable=not progress, desc=desc, unit="seq")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in rows)
        ids_NP = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask_NP = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids_NP[r, : len(sequences[i])] = torch.tensor(list(sequences[i]))
            mask_NP[r, : len(sequences[i])] = 1
        acts = run_to_hooks(model, ids_NP.to(device), hooks, attention_mask=mask_NP.to(device))
        lengths = mask_NP.sum(dim=1)
        if positions is not None:
            at = torch.tensor([positions[i] for i in rows])
            at = torch.where(at < 0, lengths + at, at)
            pick_NP = torch.zeros_like(mask_NP, dtype=torch.bool)
            pick_NP[torch.arange(len(rows)), at] = True
        else:
            pick_NP = mask_NP.bool().clone()
            pick_NP[:, 0] = False
            if bool((pick_NP.sum(dim=1) == 0).any()):
                raise SaelabError(
                    "a text of the task has no token after BOS; give every text some words"
                )
        counts_N = pick_NP.sum(dim=1, keepdim=True).float()
        row_of_T = torch.arange(len(rows)).repeat_interleave(pick_NP.sum(dim=1))
        for hook in hooks:
            x_TD = acts[hook][pick_NP.to(device)].float()
            pooled = torch.zeros(len(rows), x_TD.shape[-1], device=x_TD.device)
            pooled.index_add_(0, row_of_T.to(x_TD.device), x_TD)
            acts_out[hook].append((pooled / counts_N.to(x_TD.device)).cpu())
            for j, item in enumerate(loaded):
                if item.hook != hook:
                    continue
                f_TF = item.sae.encode(x_TD)
                pooled_f = torch.zeros(len(rows), f_TF.shape[-1], device=f_TF.device)
                pooled_f.index_add_(0, row_of_T.to(f_TF.device), f_TF)
                feats_out[j].append((pooled_f / counts_N.to(f_TF.device)).cpu())
        bar.update(len(rows))
    bar.close()
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    acts_by_hook = {h: torch.cat(v)[inverse] for h, v in acts_out.items()}
    return acts_by_hook, [torch.cat(v)[inverse] for v in feats_out]
