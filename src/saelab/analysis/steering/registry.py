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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from saelab.errors import SaelabError

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


BUILDERS: dict[str, Builder] = {}
"""Method name (``--method``) → builder, filled by :func:`register_method` as
:mod:`~saelab.analysis.steering.build` is imported."""


def register_method(*names: str) -> Callable[[Builder], Builder]:
    """Decorator: make the function the builder of each method in ``names``. A name has one
    builder; registering it again is an error."""

    def register(builder: Builder) -> Builder:
        taken = [name for name in names if name in BUILDERS]
        if taken:
            raise SaelabError(
                f"steering method {taken[0]!r} already has a builder "
                f"({BUILDERS[taken[0]].__name__}); give {builder.__name__} another name"
            )
        BUILDERS.update(dict.fromkeys(names, builder))
        return builder

    return register


def builder_for(method: str) -> Builder:
    """The builder of ``method``; a one-line error lists the methods there are."""
    if method not in BUILDERS:
        raise SaelabError(
            f"unknown steering method {method!r}; choose one of: {', '.join(BUILDERS)}"
        )
    return BUILDERS[method]
