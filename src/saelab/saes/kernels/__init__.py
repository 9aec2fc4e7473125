"""Hand-written autograd kernels the architectures train with; they know nothing of SAE classes.

:mod:`.sparse_ops` holds the dense product and the TopK-sparse encode/decode pieces;
:mod:`.relu_blocks` the ReLU SAE's block-by-block training step built from them.

Example::

    recon_BD = sparse_decode(idx_BK, vals_BK, W_dec_FD)   # Σ_k vals · W_dec[idx], no [B, F]
"""

from saelab.saes.kernels.relu_blocks import relu_train_body
from saelab.saes.kernels.sparse_ops import (
    dense_mm,
    fp32_backward,
    fp32_forward,
    gather_preacts,
    scatter_dense,
    sparse_decode,
    topk_rows,
)

__all__ = [
    "dense_mm",
    "fp32_backward",
    "fp32_forward",
    "gather_preacts",
    "relu_train_body",
    "scatter_dense",
    "sparse_decode",
    "topk_rows",
]
