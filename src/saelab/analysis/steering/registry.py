"""The one list of steering methods: it drives :func:`~.build.build_vector`, the config's
validation and the CLI's ``--method`` choices (``STEERING_METHODS`` is its keys, in the order
the builders register).

Each builder registers itself where it is defined (:mod:`saelab.analysis.steering.build`), so
this module imports nothing of the package at run time and both the config and the builders can
reach it.

Example:
    >>> @register_method("random")
    ... def build_random(model, tokenizer, cfg, model_name):
    ...     return SteeringVector(torch.randn(576), cfg.hook, "random", model_name or "default")
    >>> builder_for("random") is build_random
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from saelab.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from saelab.analysis.steering.config import SteerVectorConfig
    from saelab.analysis.steering.vectors import SteeringVector


class Builder(Protocol):
    """``(model, tokenizer, cfg, model_name) → SteeringVector``: the vector ``cfg`` describes,
    built on ``model`` and recorded as built on ``model_name`` (default: the model's own name)."""

    def __call__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        cfg: SteerVectorConfig,
        model_name: str | None,
    ) -> SteeringVector: ...


BUILDERS: Registry[Builder] = Registry("steering method")
"""Method name (``--method``) → builder, filled by :func:`register_method` as
:mod:`~saelab.analysis.steering.build` is imported."""

register_method = BUILDERS.register
"""Decorator: make the function the builder of each method named; a name has one builder."""
builder_for = BUILDERS.lookup
"""The builder of a method; a one-line error lists the methods there are."""
