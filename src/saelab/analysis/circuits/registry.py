"""The one list of circuit attribution methods: it drives ``node_effects``, the config's
validation and the CLI's ``--method`` choices.

Each method registers itself where it is defined (:mod:`saelab.analysis.circuits.attribution`).
This module imports nothing of the package at run time, so both the config and the methods can
import it without a cycle.

Example:
    >>> @register_method("atp_zero")
    ... def atp_towards_zero(spliced, batch, metric, *, ig_steps, progress):
    ...     clean = spliced.site_values(batch.tokens_NP, batch.mask_NP)
    ...     zeros = {h: SiteValues(v.feats_NPF * 0, v.error_NPD * 0) for h, v in clean.items()}
    ...     return attribution_patching(spliced, batch, metric, patched=zeros)
    >>> node_effects(spliced, batch, "atp_zero")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from saelab.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

    from saelab.analysis.circuits.attribution import NodeEffects
    from saelab.analysis.circuits.spliced import SplicedModel
    from saelab.analysis.circuits.tasks import TaskBatch


class AttributionMethod(Protocol):
    """``(spliced, batch, metric, *, ig_steps, progress) → NodeEffects``; a method ignores the
    options it has no use for."""

    def __call__(
        self,
        spliced: SplicedModel,
        batch: TaskBatch,
        metric: Callable[[Tensor, TaskBatch], Tensor],
        *,
        ig_steps: int,
        progress: bool,
    ) -> NodeEffects: ...


ATTRIBUTION_METHODS: Registry[AttributionMethod] = Registry("attribution method")
"""Method name (``--method``) → function, filled by :func:`register_method` as
:mod:`~saelab.analysis.circuits.attribution` is imported."""

register_method = ATTRIBUTION_METHODS.register
"""Decorator: make the function the attribution method of the name given."""
attribution_method = ATTRIBUTION_METHODS.lookup
"""The method registered under a name; an unknown name lists the known ones."""
