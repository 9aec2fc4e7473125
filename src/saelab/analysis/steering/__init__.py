"""Steering vectors (METHODS §8): build one (CAA, ActAdd, mean-centring, an SAE feature), add it
while the model scores or generates, sweep its coefficient, and move it to other layers or models.

Example:
    >>> from saelab.analysis.steering import Steering, caa_vector, generate, read_pairs, sweep
    >>> pairs = read_pairs("pairs.jsonl")
    >>> vector = caa_vector(model, tokenizer, pairs, "blocks.6.hook_resid_post")
    >>> rows = sweep(model, tokenizer, vector, [-4, 0, 4], pairs=pairs)
    >>> generate(model, tokenizer, "I think", Steering(vector, 4.0))
"""

from saelab.analysis.steering.apply import Steering, generate, steer
from saelab.analysis.steering.build import (
    actadd_vector,
    build_vector,
    caa_vector,
    mean_centred_vector,
    sae_clamp_vector,
    sae_feature_vector,
    sae_vector,
)
from saelab.analysis.steering.config import STEERING_METHODS, SteerConfig, SteerVectorConfig
from saelab.analysis.steering.data import ContrastPair, read_pairs, read_text_rows
from saelab.analysis.steering.run import run_steer
from saelab.analysis.steering.score import SWEEP_KEYS, cost_sweep, effect_sweep, sweep
from saelab.analysis.steering.transfer import layer_transfer, model_transfer
from saelab.analysis.steering.vectors import SteeringVector, load_vector, save_vector

__all__ = [
    "STEERING_METHODS",
    "SWEEP_KEYS",
    "ContrastPair",
    "SteerConfig",
    "SteerVectorConfig",
    "Steering",
    "SteeringVector",
    "actadd_vector",
    "build_vector",
    "caa_vector",
    "cost_sweep",
    "effect_sweep",
    "generate",
    "layer_transfer",
    "load_vector",
    "mean_centred_vector",
    "model_transfer",
    "read_pairs",
    "read_text_rows",
    "run_steer",
    "sae_clamp_vector",
    "sae_feature_vector",
    "sae_vector",
    "save_vector",
    "steer",
    "sweep",
]
