"""Learning-rate and penalty multipliers as pure functions of the step."""

from __future__ import annotations

import math


def lr_multiplier(
    step: int, total_steps: int, warmup_frac: float, decay_frac: float, decay: str = "linear"
) -> float:
    """Linear warm-up from 0 over the first ``warmup_frac`` of steps, flat, then a decay to 0
    over the last ``decay_frac`` (the April-2024 recipe decays linearly over the last 20 %).

    ``decay`` is ``linear`` (``1 − t``) or ``cosine`` (``(1 + cos πt)/2``), where ``t`` is the
    fraction of the decay window already done: both are 1 at its first step and reach 0 just
    after its last.
    """
    warmup = int(round(warmup_frac * total_steps))
    decay_steps = int(round(decay_frac * total_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_start = total_steps - decay_steps
    if decay_steps and step >= decay_start:
        if decay == "cosine":
            done = min(1.0, (step - decay_start) / decay_steps)
            return 0.5 * (1.0 + math.cos(math.pi * done))
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0


RESAMPLE_LR_START = 0.1
"""The learning rate right after a resample, relative to the ordinary one (Gated-SAE App. D.1.1)."""


def resample_lr_multiplier(steps_since_resample: int | None, warmup_steps: int) -> float:
    """LR factor after a dead-feature resample: 0.1 at the first step after it, back to 1 along
    a cosine over ``warmup_steps`` steps; 1 when there was none (``None``) or no warm-up.

    Multiplies :func:`lr_multiplier`. Example: ``resample_lr_multiplier(500, 1000) == 0.55``.
    """
    if steps_since_resample is None or warmup_steps <= 0 or steps_since_resample >= warmup_steps:
        return 1.0
    done = max(steps_since_resample, 0) / warmup_steps
    return RESAMPLE_LR_START + (1 - RESAMPLE_LR_START) * 0.5 * (1 - math.cos(math.pi * done))


def penalty_multiplier(step: int, total_steps: int, warmup_frac: float) -> float:
    """Sparsity-penalty warm-up: linear from 0 to 1 over the first ``warmup_frac`` of steps."""
    warmup = int(round(warmup_frac * total_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup
    return 1.0
