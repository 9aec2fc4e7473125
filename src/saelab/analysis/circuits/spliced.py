"""A language model with SAEs spliced in at one or more hooks (METHODS §9.1).

At each site the activation is decomposed as ``x = x̂(f) + ε`` with ``f = encode(x)`` and the
error ``ε = x − x̂(f)``, and rebuilt as ``decode(f') + ε'``, where a :class:`SiteEdit` says how
``f'`` and ``ε'`` come from ``f`` and ``ε`` (kept, masked, ablated, or replaced by leaves that
gradients reach). With nothing edited and the error kept the model computes what it does clean,
to float rounding; without the error term the SAE's reconstruction replaces the activation.

Only real, non-BOS positions are rebuilt: the SAE was not trained on position 0, so there (and at
padding) the clean activation passes through, as in ``saelab eval``.

The rebuilt activation carries the gradient of the original straight through
(``+ (x − x.detach())``, value 0), as Marks et al.'s code does, so a node at an earlier site sees
the model's own gradient however many sites lie downstream.

Example:
    >>> spliced = SplicedModel(model, [sae])
    >>> logits = spliced.logits(batch.tokens_NP, batch.mask_NP)                  # ≈ clean
    >>> logits = spliced.logits(batch.tokens_NP, batch.mask_NP, add_error=False)  # x̂ alone
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers import PreTrainedModel

from saelab.analysis.circuits.tasks import TaskBatch, last_positions, logit_diff
from saelab.errors import SaelabError
from saelab.models.hookpoints import hook_dim
from saelab.models.intervene import patch, run_to_hooks
from saelab.saes.base import SparseAutoencoder

FeatureFn = Callable[[Tensor], Tensor]
"""Maps the features computed at a site ``[N, P, F]`` to the ones decoded."""
ErrorFn = Callable[[Tensor], Tensor]
"""Maps the error term ``[N, P, D]`` to the one added back."""


@dataclass(frozen=True)
class SiteEdit:
    """How one site's activation is rebuilt; the default changes nothing."""

    features: FeatureFn | None = None
    """``f → f'`` on the features encoded from this forward pass's activation; None keeps f."""
    error: ErrorFn | None = None
    """``ε → ε'`` on the error term; None keeps ε."""
    add_error: bool = True
    """False splices ``decode(f')`` alone, dropping the SAE's reconstruction error."""


@dataclass(frozen=True)
class SiteValues:
    """Features and error term at one site, zero outside the spliced positions."""

    feats_NPF: Float[Tensor, "N P F"]
    error_NPD: Float[Tensor, "N P D"]


class SplicedModel:
    """`model` with `saes` spliced in, one per hook (each SAE's ``cfg.hook``).

    Example:
        >>> spliced = SplicedModel(model, {"blocks.6.hook_resid_post": sae})
        >>> values = spliced.site_values(tokens_NP, mask_NP)  # f and ε at every site
    """

    def __init__(
        self,
        model: PreTrainedModel,
        saes: Sequence[SparseAutoencoder] | Mapping[str, SparseAutoencoder],
        *,
        skip_positions: int = 1,
    ) -> None:
        pairs = list(saes.items()) if isinstance(saes, Mapping) else [(s.cfg.hook, s) for s in saes]
        if not pairs:
            raise SaelabError("no SAE to splice in; pass at least one SAE")
        hooks = [hook for hook, _ in pairs]
        if len(set(hooks)) != len(hooks):
            twice = next(h for h in hooks if hooks.count(h) > 1)
            raise SaelabError(f"two SAEs at {twice}; splice at most one SAE per hook")
        for hook, sae in pairs:
            if sae.cfg.output_hook is not None or sae.d_out != sae.d_in:
                raise SaelabError(
                    f"the SAE at {hook} is a transcoder; circuits splice autoencoders only"
                )
            if (width := hook_dim(model, hook)) != sae.d_in:
                raise SaelabError(
                    f"the SAE for {hook} expects d_in={sae.d_in} but the model's activation "
                    f"there has width {width}; use an SAE trained on this model and hook"
                )
        self.model = model
        self.saes: dict[str, SparseAutoencoder] = dict(pairs)
        self.skip_positions = skip_positions
        """Leading positions never rebuilt (position 0 holds BOS, which no SAE was trained on)."""

    @property
    def hooks(self) -> list[str]:
        return list(self.saes)

    def splice_mask(self, mask_NP: Bool[Tensor, "N P"]) -> Bool[Tensor, "N P"]:
        """Positions that are rebuilt: real tokens past the first `skip_positions`."""
        splice_NP = mask_NP.clone()
        splice_NP[:, : self.skip_positions] = False
        return splice_NP

    def logits(
        self,
        tokens_NP: Int[Tensor, "N P"],
        mask_NP: Bool[Tensor, "N P"] | None = None,
        edits: Mapping[str, SiteEdit] | None = None,
        *,
        add_error: bool = True,
        logits_to_keep: Int[Tensor, " U"] | None = None,
    ) -> Float[Tensor, "N P V"]:
        """Logits with every site rebuilt; sites missing from `edits` keep their features and
        add their error term when `add_error`. With `logits_to_keep` (positions), only the
        logits there are computed."""
        if mask_NP is None:
            mask_NP = torch.ones_like(tokens_NP, dtype=torch.bool)
        unknown = sorted(set(edits or {}) - set(self.saes))
        if unknown:
            raise SaelabError(f"edits for {unknown} but SAEs only at {self.hooks}")
        default = SiteEdit(add_error=add_error)
        splice_NP = self.splice_mask(mask_NP)
        fns = {h: self._rebuild(h, (edits or {}).get(h, default), splice_NP) for h in self.saes}
        with patch(self.model, fns):
            return self.model(
                tokens_NP,
                attention_mask=mask_NP.long(),
                use_cache=False,
                logits_to_keep=0 if logits_to_keep is None else logits_to_keep,
            ).logits

    @torch.no_grad()
    def metric(
        self,
        batch: TaskBatch,
        edits: Mapping[str, SiteEdit] | None = None,
        *,
        add_error: bool = True,
        metric: Callable[[Tensor, TaskBatch], Tensor] = logit_diff,
    ) -> Float[Tensor, " N"]:
        """The task metric of every prompt of `batch` (:func:`logit_diff` by default) with the
        sites rebuilt as in :meth:`logits`."""
        logits_NPV = self.logits(
            batch.tokens_NP,
            batch.mask_NP,
            edits,
            add_error=add_error,
            logits_to_keep=last_positions(batch),
        )
        return metric(logits_NPV, batch)

    @torch.no_grad()
    def site_values(
        self, tokens_NP: Int[Tensor, "N P"], mask_NP: Bool[Tensor, "N P"] | None = None
    ) -> dict[str, SiteValues]:
        """Features and error terms of the unmodified forward pass at every site.

        The clean pass equals the spliced pass with error terms, so every site sees its clean
        input; the model stops after the deepest hook.
        """
        if mask_NP is None:
            mask_NP = torch.ones_like(tokens_NP, dtype=torch.bool)
        acts = run_to_hooks(self.model, tokens_NP, self.hooks, attention_mask=mask_NP.long())
        keep_NP1 = self.splice_mask(mask_NP)[..., None]
        values = {}
        for hook, sae in self.saes.items():
            x_NPD = acts[hook].to(sae.W_dec.dtype)
            feats_NPF = sae.encode(x_NPD)
            error_NPD = x_NPD - sae.decode(feats_NPF)
            values[hook] = SiteValues(feats_NPF * keep_NP1, error_NPD * keep_NP1)
        return values

    def _rebuild(self, hook: str, edit: SiteEdit, splice_NP: Tensor) -> Callable[[Tensor], Tensor]:
        sae = self.saes[hook]

        def rebuild(x_NPD: Tensor) -> Tensor:
            with torch.no_grad():
                x_sae_NPD = x_NPD.detach().to(sae.W_dec.dtype)
                feats_NPF = sae.encode(x_sae_NPD)
                recon_NPD = sae.decode(feats_NPF)
            out_NPD = recon_NPD if edit.features is None else sae.decode(edit.features(feats_NPF))
            if edit.add_error:
                error_NPD = x_sae_NPD - recon_NPD
                out_NPD = out_NPD + (error_NPD if edit.error is None else edit.error(error_NPD))
            out_NPD = out_NPD.to(x_NPD.dtype)
            if x_NPD.requires_grad:
                out_NPD = out_NPD + (x_NPD - x_NPD.detach())
            return torch.where(splice_NP[..., None].to(x_NPD.device), out_NPD, x_NPD)

        return rebuild
