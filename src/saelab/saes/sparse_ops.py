"""Kernels that exploit TopK sparsity: only the K chosen features of each token are touched.

A dense TopK SAE step multiplies ``[B, F]`` matrices three times (encoder backward, decoder forward
and backward). With K ≪ F those products are mostly zeros, so here the decoder is an
``embedding_bag`` over the chosen rows and the encoder backward is a CSR product with K
non-zeros per row. Only the forward encoder GEMM, needed to rank all features, stays dense.

Shape legend: B batch, D d_in, F d_sae, K active features per token.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

# CSR products are the point of this module; PyTorch's "beta" notice on each use is noise.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _csr_rows(
    idx_BK: Int[Tensor, "B K"], vals_BK: Float[Tensor, "B K"], d_sae: int
) -> Float[Tensor, "B F"]:
    """A CSR matrix with the given K (column, value) pairs in each row."""
    batch, k = idx_BK.shape
    crow = torch.arange(0, batch * k + 1, k, device=idx_BK.device, dtype=torch.int64)
    return torch.sparse_csr_tensor(
        crow,
        idx_BK.reshape(-1).to(torch.int64),
        vals_BK.reshape(-1),
        size=(batch, d_sae),
        check_invariants=False,
    )


class _GatherPreacts(torch.autograd.Function):
    """Encoder pre-activations at chosen features; the backward is sparse in the features.

    The forward takes values already computed by the dense GEMM (no second matmul); the backward
    builds ``dL/dW_enc = xᵀ G`` from the ``B·K`` non-zeros of ``G`` only.
    """

    @staticmethod
    def forward(ctx, x_BD, W_enc_DF, b_enc_F, idx_BK, pre_BK):  # type: ignore[override]
        ctx.save_for_backward(x_BD, W_enc_DF, idx_BK)
        ctx.mark_non_differentiable(idx_BK)
        return pre_BK.clone()

    @staticmethod
    def backward(ctx, grad_BK):  # type: ignore[override]
        x_BD, W_enc_DF, idx_BK = ctx.saved_tensors
        d_sae = W_enc_DF.shape[1]
        grad_x = grad_W = grad_b = None
        grad_BK = grad_BK.contiguous()
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            G_BF = _csr_rows(idx_BK, grad_BK, d_sae)
            if ctx.needs_input_grad[1]:
                # [F, D] product transposed: the layout autograd expects for a [D, F] parameter.
                grad_W = (G_BF.t() @ x_BD).t()
            if ctx.needs_input_grad[0]:
                grad_x = G_BF @ W_enc_DF.t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, dtype=grad_BK.dtype, device=grad_BK.device)
            grad_b.index_add_(0, idx_BK.reshape(-1), grad_BK.reshape(-1))
        return grad_x, grad_W, grad_b, None, None


def gather_preacts(
    x_BD: Float[Tensor, "B D"],
    W_enc_DF: Float[Tensor, "D F"],
    b_enc_F: Float[Tensor, " F"],
    idx_BK: Int[Tensor, "B K"],
    pre_BK: Float[Tensor, "B K"],
) -> Float[Tensor, "B K"]:
    """``(x @ W_enc + b_enc)[b, idx[b, k]]``, given those values, differentiable in x, W, b."""
    return _GatherPreacts.apply(x_BD, W_enc_DF, b_enc_F, idx_BK, pre_BK)


def sparse_decode(
    idx_BK: Int[Tensor, "B K"], vals_BK: Float[Tensor, "B K"], W_dec_FD: Float[Tensor, "F D"]
) -> Float[Tensor, "B D"]:
    """``Σ_k vals[b, k] · W_dec[idx[b, k]]`` without materialising a ``[B, F]`` matrix."""
    return F.embedding_bag(idx_BK, W_dec_FD, per_sample_weights=vals_BK, mode="sum")


def scatter_dense(
    idx_BK: Int[Tensor, "B K"], vals_BK: Float[Tensor, "B K"], d_sae: int
) -> Float[Tensor, "B F"]:
    """The dense ``[B, F]`` feature matrix, for callers that want every feature."""
    out = vals_BK.new_zeros(*vals_BK.shape[:-1], d_sae)
    return out.scatter_(-1, idx_BK, vals_BK)
