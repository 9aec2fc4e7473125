"""Learning-rate and penalty multipliers as pure functions of the step."""

from __future__ import annotations


def lr_multiplier(step: int, total_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warm-up from 0 over the first ``warmup_frac`` of steps, flat, then linear decay
    to 0 over the last ``decay_frac`` (the April-2024 recipe decays over the last 20 %)."""
    warmup = int(round(warmup_frac * total_steps))
    decay = int(round(decay_frac * total_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_start = total_steps - decay
    if decay and step >= decay_start:
        return max(0.0, (total_steps - step) / decay)
    return 1.0


def penalty_multiplier(step: int, total_steps: int, warmup_frac: float) -> float:
    """Sparsity-penalty warm-up: linear from 0 to 1 over the first ``warmup_frac`` of steps."""
    warmup = int(round(warmup_frac * total_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup
    return 1.0
