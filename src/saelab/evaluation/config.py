"""The options of ``saelab eval`` (:class:`EvalConfig`) and ``saelab transfer``
(:class:`TransferConfig`): where saved SAEs are measured. Field names are the keywords of
:func:`~saelab.evaluation.evaluate.evaluate_sae_dirs` and
:func:`~saelab.evaluation.transfer.transfer_saes`, so a config calls them as
``evaluate_sae_dirs(dirs, **dataclasses.asdict(cfg))``.

Example::

    cfg = EvalConfig(tokens=16_384)
    evaluate_sae_dirs(["runs/sae"], **dataclasses.asdict(cfg))
"""

from __future__ import annotations

from dataclasses import dataclass

from saelab.config import require


def _check_common(tokens: int, context: int | None, device: str) -> None:
    require(tokens >= 1, f"--tokens must be positive, got {tokens}")
    require(context is None or context >= 2, f"--context must be at least 2, got {context}")
    require(
        device.split(":")[0] in ("cpu", "cuda"), f"--device must be cpu or cuda, got {device!r}"
    )


@dataclass(frozen=True)
class EvalConfig:
    model_name: str | None = None
    """Model the SAEs are measured on. Default: the one each SAE was trained on."""
    dataset: str | None = None
    """Evaluation text (a text spec). Default: each SAE's training text."""
    tokens: int = 8192
    """Evaluation tokens per SAE."""
    context: int | None = None
    """Tokens per sequence, BOS included. Default: each SAE's training context."""
    device: str = "cpu"
    """Where the model and the SAEs run: cpu or cuda."""

    def __post_init__(self) -> None:
        _check_common(self.tokens, self.context, self.device)


@dataclass(frozen=True)
class TransferConfig:
    layers: str
    """Layers to evaluate every SAE at, on its own hook type: a range 2-10, a list 2,4,6 or one
    layer."""
    model_name: str | None = None
    """Model the SAEs are measured on. Default: the one the first SAE was trained on."""
    dataset: str | None = None
    """Evaluation text (a text spec). Default: the first SAE's training text."""
    tokens: int = 8192
    """Evaluation tokens per cell of the matrix."""
    context: int | None = None
    """Tokens per sequence, BOS included. Default: the first SAE's training context."""
    device: str = "cpu"
    """Where the model and the SAEs run: cpu or cuda."""

    def __post_init__(self) -> None:
        require(bool(self.layers.strip()), "--layers needs layers, e.g. 2-10, 2,4,6 or 3")
        _check_common(self.tokens, self.context, self.device)
