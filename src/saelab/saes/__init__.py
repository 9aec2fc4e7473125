"""SAE architectures, one module each, all registered in :data:`ARCHITECTURES`."""

from saelab.saes import relu, topk  # noqa: F401  (importing registers the architectures)
from saelab.saes.base import (
    DenseFeatureActs,
    FeatureActs,
    SparseAutoencoder,
    SparseFeatureActs,
    TrainStepOutput,
)
from saelab.saes.batchtopk import BatchTopKSAE
from saelab.saes.clt import (
    CrossLayerTranscoder,
    JumpReLUCrossLayerTranscoder,
    TopKCrossLayerTranscoder,
)
from saelab.saes.formats import FORMATS, convert_sae, read_sae, write_sae
from saelab.saes.gated import GatedSAE
from saelab.saes.jumprelu import JumpReLUSAE
from saelab.saes.matryoshka import MatryoshkaSAE
from saelab.saes.registry import ARCHITECTURES, architecture_class
from saelab.saes.relu import ReLUSAE
from saelab.saes.replacement import (
    MANIFEST_FILENAME,
    CrossLayerReplacement,
    PerLayerReplacement,
    Replacement,
    is_replacement_dir,
    load_replacement,
    write_replacement_manifest,
)
from saelab.saes.storage import find_sae_dirs, load_sae, save_sae
from saelab.saes.topk import TopKSAE
from saelab.saes.transcoder import (
    ReLUTranscoder,
    SkipTranscoder,
    TopKSkipTranscoder,
    TopKTranscoder,
    Transcoder,
)

__all__ = [
    "ARCHITECTURES",
    "MANIFEST_FILENAME",
    "CrossLayerReplacement",
    "PerLayerReplacement",
    "Replacement",
    "is_replacement_dir",
    "load_replacement",
    "write_replacement_manifest",
    "BatchTopKSAE",
    "CrossLayerTranscoder",
    "JumpReLUCrossLayerTranscoder",
    "TopKCrossLayerTranscoder",
    "DenseFeatureActs",
    "FORMATS",
    "FeatureActs",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "ReLUSAE",
    "ReLUTranscoder",
    "SkipTranscoder",
    "SparseAutoencoder",
    "SparseFeatureActs",
    "TopKSAE",
    "TopKSkipTranscoder",
    "TopKTranscoder",
    "TrainStepOutput",
    "find_sae_dirs",
    "load_sae",
    "save_sae",
    "Transcoder",
    "architecture_class",
    "convert_sae",
    "read_sae",
    "write_sae",
]
