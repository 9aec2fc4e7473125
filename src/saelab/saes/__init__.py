"""SAE architectures, one module each, all registered in :data:`ARCHITECTURES`."""

from saelab.saes import relu, topk  # noqa: F401  (importing registers the architectures)
from saelab.saes.base import (
    DenseFeatureActs,
    FeatureActs,
    SparseAutoencoder,
    SparseFeatureActs,
    TrainStepOutput,
)
from saelab.saes.registry import ARCHITECTURES, architecture_class
from saelab.saes.relu import ReLUSAE
from saelab.saes.topk import TopKSAE

__all__ = [
    "ARCHITECTURES",
    "DenseFeatureActs",
    "FeatureActs",
    "ReLUSAE",
    "SparseAutoencoder",
    "SparseFeatureActs",
    "TopKSAE",
    "TrainStepOutput",
    "architecture_class",
]
