"""Indirect effects of SAE features and error nodes on a task metric (METHODS §9.1).

Nodes are every feature at every spliced position of every site, plus one error node (a
d-vector) per site and position. For a node ``a`` with clean value ``a_c`` and patch value
``a_p`` (the corrupted prompt's, or zero for tasks without one):

* attribution patching: ``IE_atp(a) = ∇_a m|_{a_c} · (a_p − a_c)`` — one backward pass;
* integrated gradients:
  ``IE_ig(a) = [(1/N) Σ_{k<N} ∇_a m|_{a_c + (k/N)(a_p − a_c)}] · (a_p − a_c)``,
  interpolating one site at a time while the others run normally (as the reference code does);
  summed over a site's nodes it approaches ``m(site patched) − m(clean)`` as N grows.

For a feature the product is a scalar; for an error node a dot product over d. Gradients reach
nodes because each site is rebuilt from leaf tensors
(:class:`~saelab.analysis.circuits.spliced.SiteEdit`).

Example:
    >>> effects = attribution_patching(spliced, batch)
    >>> effects.top_features(10)   # [(hook, feature, IE summed over positions, mean over prompts)]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from saelab.analysis.circuits.registry import attribution_method, register_method
from saelab.analysis.circuits.spliced import SiteEdit, SiteValues, SplicedModel
from saelab.analysis.circuits.tasks import TaskBatch, last_positions, logit_diff
from saelab.errors import SaelabError

log = logging.getLogger(__name__)

Metric = Callable[[Tensor, TaskBatch], Tensor]
"""``(logits [N, P, V], batch) → metric per prompt [N]``; :func:`logit_diff` by default."""


@dataclass(frozen=True)
class NodeEffects:
    """Indirect effect of every node, per prompt and position (zero at unspliced positions)."""

    features: dict[str, Float[Tensor, "N P F"]]
    errors: dict[str, Float[Tensor, "N P"]]
    method: str

    def feature_totals(self) -> dict[str, Float[Tensor, " F"]]:
        """Each feature's IE summed over positions, averaged over prompts (Marks et al.'s
        aggregation)."""
        return {hook: ie.sum(1).mean(0) for hook, ie in self.features.items()}

    def error_totals(self) -> dict[str, float]:
        """Each site's error-node IE summed over positions, averaged over prompts."""
        return {hook: float(ie.sum(1).mean(0)) for hook, ie in self.errors.items()}

    def ranked_features(self) -> list[tuple[str, int, float]]:
        """Every (hook, feature, total IE), largest |total IE| first."""
        totals = self.feature_totals()
        flat = torch.cat([t.detach().cpu().double() for t in totals.values()])
        owners = [(hook, f) for hook, t in totals.items() for f in range(t.numel())]
        order = flat.abs().argsort(descending=True, stable=True)
        return [(*owners[i], float(flat[i])) for i in order.tolist()]

    def top_features(self, n: int) -> list[tuple[str, int, float]]:
        return self.ranked_features()[:n]


def patch_values(
    spliced: SplicedModel, batch: TaskBatch, clean: Mapping[str, SiteValues] | None = None
) -> dict[str, SiteValues]:
    """Patch states: the corrupted prompts' features and errors, or zeros without them."""
    if batch.corrupted_NP is not None:
        return spliced.site_values(batch.corrupted_NP, batch.mask_NP)
    clean = clean or spliced.site_values(batch.tokens_NP, batch.mask_NP)
    return {
        hook: SiteValues(torch.zeros_like(v.feats_NPF), torch.zeros_like(v.error_NPD))
        for hook, v in clean.items()
    }


def node_gradients(
    spliced: SplicedModel,
    batch: TaskBatch,
    values: Mapping[str, SiteValues],
    metric: Metric = logit_diff,
) -> dict[str, SiteValues]:
    """``∂(Σ_prompts m)/∂node`` with the sites in `values` set to those feature and error values
    (leaves), and every other site running normally. Prompts do not interact, so each prompt's
    rows hold the gradient of its own metric."""
    leaves = {
        hook: (v.feats_NPF.detach().clone(), v.error_NPD.detach().clone())
        for hook, v in values.items()
    }
    edits = {
        hook: SiteEdit(features=_constant(f_NPF), error=_constant(e_NPD))
        for hook, (f_NPF, e_NPD) in leaves.items()
    }
    flat = [t for pair in leaves.values() for t in pair]
    with torch.enable_grad():
        for t in flat:
            t.requires_grad_(True)
        logits_NPV = spliced.logits(
            batch.tokens_NP, batch.mask_NP, edits, logits_to_keep=last_positions(batch)
        )
        total = metric(logits_NPV, batch).sum()
        grads = torch.autograd.grad(total, flat, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(flat, grads, strict=True)]
    return {
        hook: SiteValues(grads[2 * i].detach(), grads[2 * i + 1].detach())
        for i, hook in enumerate(leaves)
    }


def _constant(value: Tensor) -> Callable[[Tensor], Tensor]:
    def replace(_: Tensor) -> Tensor:
        return value

    return replace


def _effects(grads: SiteValues, clean: SiteValues, patched: SiteValues) -> tuple[Tensor, Tensor]:
    feats_NPF = grads.feats_NPF * (patched.feats_NPF - clean.feats_NPF)
    errors_NP = (grads.error_NPD * (patched.error_NPD - clean.error_NPD)).sum(-1)
    return feats_NPF, errors_NP


def attribution_patching(
    spliced: SplicedModel,
    batch: TaskBatch,
    metric: Metric = logit_diff,
    *,
    patched: Mapping[str, SiteValues] | None = None,
) -> NodeEffects:
    """IE of every node by attribution patching: one backward pass at the clean values.

    `patched` overrides the patch states (default :func:`patch_values`)."""
    clean = spliced.site_values(batch.tokens_NP, batch.mask_NP)
    patched = patched if patched is not None else patch_values(spliced, batch, clean)
    grads = node_gradients(spliced, batch, clean, metric)
    feats, errors = {}, {}
    for hook in spliced.hooks:
        feats[hook], errors[hook] = _effects(grads[hook], clean[hook], patched[hook])
    return NodeEffects(feats, errors, "atp")


def integrated_gradients(
    spliced: SplicedModel,
    batch: TaskBatch,
    steps: int = 10,
    metric: Metric = logit_diff,
    progress: bool = False,
) -> NodeEffects:
    """IE of every node by integrated gradients with `steps` points ``k/steps``, k < steps,
    one site at a time."""
    if steps < 1:
        raise SaelabError(f"integrated gradients needs at least 1 step, got {steps}")
    clean = spliced.site_values(batch.tokens_NP, batch.mask_NP)
    patched = patch_values(spliced, batch, clean)
    feats, errors = {}, {}
    bar = tqdm(total=steps * len(spliced.hooks), desc="ig", disable=not progress, leave=False)
    for hook in spliced.hooks:
        c, p = clean[hook], patched[hook]
        grad_f_NPF, grad_e_NPD = torch.zeros_like(c.feats_NPF), torch.zeros_like(c.error_NPD)
        for k in range(steps):
            alpha = k / steps
            point = SiteValues(
                c.feats_NPF + alpha * (p.feats_NPF - c.feats_NPF),
                c.error_NPD + alpha * (p.error_NPD - c.error_NPD),
            )
            g = node_gradients(spliced, batch, {hook: point}, metric)[hook]
            grad_f_NPF += g.feats_NPF / steps
            grad_e_NPD += g.error_NPD / steps
            bar.update()
        feats[hook], errors[hook] = _effects(SiteValues(grad_f_NPF, grad_e_NPD), c, p)
    bar.close()
    return NodeEffects(feats, errors, "ig")


@register_method("atp")
def _by_attribution_patching(
    spliced: SplicedModel, batch: TaskBatch, metric: Metric, *, ig_steps: int, progress: bool
) -> NodeEffects:
    """One backward pass at the clean values (`ig_steps` and `progress` have no use here)."""
    return attribution_patching(spliced, batch, metric)


@register_method("ig")
def _by_integrated_gradients(
    spliced: SplicedModel, batch: TaskBatch, metric: Metric, *, ig_steps: int, progress: bool
) -> NodeEffects:
    return integrated_gradients(spliced, batch, ig_steps, metric, progress)


def node_effects(
    spliced: SplicedModel,
    batch: TaskBatch,
    method: str = "atp",
    *,
    ig_steps: int = 10,
    metric: Metric = logit_diff,
    progress: bool = False,
) -> NodeEffects:
    """IE of every node by `method`, a name in
    :data:`~saelab.analysis.circuits.registry.ATTRIBUTION_METHODS` (``atp``, ``ig``)."""
    by_method = attribution_method(method)
    return by_method(spliced, batch, metric, ig_steps=ig_steps, progress=progress)
