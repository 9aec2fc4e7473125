"""Kernels that exploit TopK sparsity: only the K chosen features of each token are touched.

A dense TopK SAE step multiplies ``[B, F]`` matrices three times (encoder backward, decoder forward
and backward). With K ≪ F those products are mostly zeros, so here the decoder is an
``embedding_bag`` over the chosen rows, the gradient of the values it weights is a sampled product
(K dot products per token), and both weight gradients are ``embedding_bag`` sums in
feature-major order (each feature's row adds up the tokens that chose it). Only the forward
encoder GEMM, needed to rank all features, stays dense; :func:`dense_mm` runs it.

Shape legend: B batch, D d_in, F d_sae, K active features per token, N = B·K chosen pairs.
"""

from __future__ import annotations

import logging
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

log = logging.getLogger(__name__)

# CSR products are the point of this module; PyTorch's "beta" notice on each use is noise.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

USE_ONEDNN = True
"""Route large float32/bfloat16 CPU matrix products through oneDNN (see :func:`dense_mm`)."""

_ONEDNN_MIN_MACS = 1 << 24
"""Below this many multiply-adds a product is too small for the oneDNN call to pay off."""

_onednn_failed = False


# ----- dense products and row-wise top-k ---------------------------------------------------------


def dense_mm(
    a_MK: Float[Tensor, "M K"],
    b_KN: Float[Tensor, "K N"],
    bias_N: Float[Tensor, " N"] | None = None,
    *,
    add_MN: Float[Tensor, "M N"] | None = None,
) -> Float[Tensor, "M N"]:
    """``a @ b (+ bias) (+ add)`` as a new tensor, from the fastest CPU library at hand.

    PyTorch sends float32 CPU products to MKL, which on non-Intel CPUs runs without its AVX-512
    kernels; oneDNN (also inside PyTorch) picks kernels by instruction set and measured 1.5–2×
    faster for the SAE shapes on an AVX-512 AMD EPYC. ``bias`` and ``add`` are fused into the
    product there (``add`` accumulates a sum of products without an extra pass). Any operand may
    be a transposed view. Not differentiable: call it under ``no_grad`` or in a backward.
    """
    global _onednn_failed
    if (
        USE_ONEDNN
        and not _onednn_failed
        and a_MK.device.type == "cpu"
        and a_MK.dtype in (torch.float32, torch.bfloat16)
        and all(t is None or t.dtype == a_MK.dtype for t in (b_KN, bias_N, add_MN))
        and a_MK.shape[0] * a_MK.shape[1] * b_KN.shape[1] >= _ONEDNN_MIN_MACS
    ):
        try:
            # Both compute X Wᵀ + b for a weight W laid out [N, K], as nn.Linear stores it.
            if add_MN is None:
                return torch.ops.mkldnn._linear_pointwise(a_MK, b_KN.t(), bias_N, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(a_MK, add_MN, b_KN.t(), bias_N, "add")
        except (RuntimeError, AttributeError, NotImplementedError) as exc:
            _onednn_failed = True
            log.debug("oneDNN matmul unavailable (%s); using torch.mm", exc)
    if add_MN is None:
        return a_MK @ b_KN if bias_N is None else torch.addmm(bias_N, a_MK, b_KN)
    out_MN = torch.addmm(add_MN, a_MK, b_KN)
    return out_MN if bias_N is None else out_MN.add_(bias_N)


TOPK_GROUP = 16
"""Columns per group in :func:`topk_rows`."""


def topk_rows(scores_BF: Float[Tensor, "B F"], k: int) -> tuple[Tensor, Int[Tensor, "B K"]]:
    """``scores.topk(k, dim=-1, sorted=False)``, found through per-group maxima first.

    The F columns form F/S strided groups of S. The k groups with the largest maxima hold the
    row's top k: an element outside them is beaten by k group maxima, so it is not in the top k.
    One vectorised max pass and two small top-k over the group maxima and the k·S candidates
    replace the top-k over all F columns, whose per-element cost is several times a max's (5 %
    of a TopK step). Same values; among exactly tied scores another one may be chosen.
    """
    batch, d_sae = scores_BF.shape
    groups = d_sae // TOPK_GROUP
    if d_sae % TOPK_GROUP or groups < 2 * k:
        return scores_BF.topk(k, dim=-1, sorted=False)
    group_max_BG = scores_BF.reshape(batch, TOPK_GROUP, groups).amax(1)
    _, group_BK = group_max_BG.topk(k, dim=-1, sorted=False)
    offsets_S = torch.arange(0, d_sae, groups, device=scores_BF.device)
    cand_BC = (group_BK.unsqueeze(-1) + offsets_S).reshape(batch, k * TOPK_GROUP)
    top_BK, pos_BK = scores_BF.gather(1, cand_BC).topk(k, dim=-1, sorted=False)
    return top_BK, cand_BC.gather(1, pos_BK)


def transposed_copy(a_MN: Float[Tensor, "M N"]) -> Float[Tensor, "N M"]:
    """``a.t().contiguous()`` on all threads. PyTorch copies a whole 2-D transpose with a
    single-threaded blocked kernel (3× slower here); into column slices it uses the parallel one.
    """
    out_NM = a_MN.new_empty(a_MN.shape[1], a_MN.shape[0])
    half = a_MN.shape[0] // 2
    out_NM[:, :half].copy_(a_MN[:half].t())
    out_NM[:, half:].copy_(a_MN[half:].t())
    return out_NM


# ----- feature-major order -----------------------------------------------------------------------


class FeatureMajor(NamedTuple):
    """N chosen (token, feature) pairs grouped by feature, as ``embedding_bag`` bags."""

    perm_N: Int[Tensor, " N"]
    """Positions of the pairs, sorted by feature."""
    token_N: Int[Tensor, " N"]
    """The token (row) of each sorted pair."""
    offsets_F: Int[Tensor, " F"]
    """Where each feature's run of pairs starts in the sorted order."""


def feature_major(idx_BK: Int[Tensor, "B K"], d_sae: int) -> FeatureMajor:
    """Feature-major order of the pairs ``(b, idx[b, k])``, flattened row by row."""
    perm_N, offsets_F = _sort_by_feature(idx_BK.reshape(-1), d_sae)
    return FeatureMajor(perm_N, perm_N.div(idx_BK.shape[-1], rounding_mode="floor"), offsets_F)


def feature_major_csr(
    crow_B1: Int[Tensor, " B+1"], col_N: Int[Tensor, " N"], d_sae: int
) -> FeatureMajor:
    """Feature-major order of the non-zeros of a CSR ``[B, F]`` matrix."""
    perm_N, offsets_F = _sort_by_feature(col_N, d_sae)
    token_N = torch.repeat_interleave(
        torch.arange(crow_B1.numel() - 1, device=col_N.device), crow_B1.diff()
    )
    return FeatureMajor(perm_N, token_N[perm_N], offsets_F)


def _sort_by_feature(feature_N: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    feature_N = feature_N.to(torch.int64)
    # Stable sort: a radix sort on CPU, far cheaper than the comparison sort behind stable=False.
    _, perm_N = torch.sort(feature_N, stable=True)
    counts_F = torch.bincount(feature_N, minlength=d_sae)
    return perm_N, counts_F.cumsum(0) - counts_F


def sum_rows_by_feature(
    order: FeatureMajor, weights_N: Float[Tensor, " N"], rows_BD: Float[Tensor, "B D"]
) -> Float[Tensor, "F D"]:
    """``out[f] = Σ_{pairs (b, f)} weight · rows[b]``, i.e. ``Wᵀ rows`` for the sparse ``[B, F]``
    matrix W of the pairs (weights in the pairs' original order), without forming it."""
    return F.embedding_bag(
        order.token_N,
        rows_BD.contiguous(),
        order.offsets_F,
        mode="sum",
        per_sample_weights=weights_N.reshape(-1)[order.perm_N],
    )


def sampled_dots(
    idx_BK: Int[Tensor, "B K"], a_BD: Float[Tensor, "B D"], W_FD: Float[Tensor, "F D"]
) -> Float[Tensor, "B K"]:
    """``out[b, k] = a[b] · W[idx[b, k]]``: the entries of ``a Wᵀ`` at the chosen features only."""
    batch, k = idx_BK.shape
    crow_B1 = torch.arange(0, batch * k + 1, k, device=idx_BK.device, dtype=torch.int64)
    return sampled_dots_csr(crow_B1, idx_BK.reshape(-1), a_BD, W_FD).reshape(idx_BK.shape)


def sampled_dots_csr(
    crow_B1: Int[Tensor, " B+1"],
    col_N: Int[Tensor, " N"],
    a_BD: Float[Tensor, "B D"],
    W_FD: Float[Tensor, "F D"],
) -> Float[Tensor, " N"]:
    """``a[b] · W[f]`` for each non-zero ``(b, f)`` of a CSR pattern, in CSR order.

    ``W_FD`` should be contiguous: the kernel wants ``[F, D]`` rows and copies anything else.
    """
    ones_N = torch.ones(col_N.shape, dtype=a_BD.dtype, device=a_BD.device)
    mask_BF = torch.sparse_csr_tensor(
        crow_B1,
        col_N.to(torch.int64),
        ones_N,
        size=(crow_B1.numel() - 1, W_FD.shape[0]),
        check_invariants=False,
    )
    return torch.sparse.sampled_addmm(mask_BF, a_BD.contiguous(), W_FD.t(), beta=0.0).values()


# ----- differentiable kernels --------------------------------------------------------------------


def fp32_forward(forward):
    """Run a hand-written kernel's forward in float32 even under CPU or CUDA autocast.

    ``train.autocast_bf16`` lets matrix products elsewhere in a step run in bfloat16; these
    kernels index, scatter and accumulate, and stay exact in float32 (inputs cast on entry)."""
    for device in ("cpu", "cuda"):
        forward = torch.amp.custom_fwd(device_type=device, cast_inputs=torch.float32)(forward)
    return forward


def fp32_backward(backward):
    """The matching backward: runs with autocast off, as its forward did."""
    for device in ("cpu", "cuda"):
        backward = torch.amp.custom_bwd(device_type=device)(backward)
    return backward


class _GatherPreacts(torch.autograd.Function):
    """Encoder pre-activations at chosen features; the backward is sparse in the features.

    The forward takes values already computed by the dense GEMM (no second matmul); the backward
    builds ``dL/dW_enc = xᵀ G`` from the ``B·K`` non-zeros of ``G`` only. With ``b_dec`` the input
    is ``x − b_dec`` and its gradient ``−W_enc Σ_b G_b`` needs no ``[B, D]`` input gradient.
    """

    @staticmethod
    @fp32_forward
    def forward(ctx, x_BD, W_enc_DF, b_enc_F, idx_BK, pre_BK, b_dec_D):  # type: ignore[override]
        ctx.save_for_backward(x_BD, W_enc_DF, idx_BK, b_dec_D)
        ctx.mark_non_differentiable(idx_BK)
        return pre_BK.clone()

    @staticmethod
    @fp32_backward
    def backward(ctx, grad_BK):  # type: ignore[override]
        x_BD, W_enc_DF, idx_BK, b_dec_D = ctx.saved_tensors
        need_x, need_W, need_b, _, _, need_b_dec = ctx.needs_input_grad
        d_sae = W_enc_DF.shape[1]
        grad_x = grad_W = grad_b = grad_b_dec = None
        grad_BK = grad_BK.contiguous()
        if need_W:
            sae_in_BD = x_BD if b_dec_D is None else x_BD - b_dec_D
            grad_FD = sum_rows_by_feature(feature_major(idx_BK, d_sae), grad_BK, sae_in_BD)
            # Autograd would copy a transposed view into W_enc's layout anyway; do it here once.
            grad_W = transposed_copy(grad_FD)
        if need_b or need_b_dec:
            grad_b = torch.zeros(d_sae, dtype=grad_BK.dtype, device=grad_BK.device)
            grad_b.index_add_(0, idx_BK.reshape(-1), grad_BK.reshape(-1))
            if need_b_dec:
                grad_b_dec = -(W_enc_DF @ grad_b)
            if not need_b:
                grad_b = None
        if need_x:
            grad_x = F.embedding_bag(
                idx_BK, transposed_copy(W_enc_DF), per_sample_weights=grad_BK, mode="sum"
            )
        return grad_x, grad_W, grad_b, None, None, grad_b_dec


def gather_preacts(
    x_BD: Float[Tensor, "B D"],
    W_enc_DF: Float[Tensor, "D F"],
    b_enc_F: Float[Tensor, " F"],
    idx_BK: Int[Tensor, "B K"],
    pre_BK: Float[Tensor, "B K"],
    *,
    b_dec_D: Float[Tensor, " D"] | None = None,
) -> Float[Tensor, "B K"]:
    """``(x @ W_enc + b_enc)[b, idx[b, k]]``, given those values, differentiable in x, W, b.

    With ``b_dec_D`` the encoder input is ``x − b_dec_D`` (``pre_BK`` must be computed from it),
    and ``b_dec_D`` gets its gradient too.
    """
    return _GatherPreacts.apply(x_BD, W_enc_DF, b_enc_F, idx_BK, pre_BK, b_dec_D)


class _SparseDecode(torch.autograd.Function):
    """``embedding_bag`` decoder with a backward that avoids PyTorch's: that one sorts the
    indices with a comparison sort, several times slower than the whole sparse step."""

    @staticmethod
    @fp32_forward
    def forward(ctx, idx_BK, vals_BK, W_dec_FD):  # type: ignore[override]
        ctx.save_for_backward(idx_BK, vals_BK, W_dec_FD)
        ctx.mark_non_differentiable(idx_BK)
        return F.embedding_bag(idx_BK, W_dec_FD, per_sample_weights=vals_BK, mode="sum")

    @staticmethod
    @fp32_backward
    def backward(ctx, grad_BD):  # type: ignore[override]
        idx_BK, vals_BK, W_dec_FD = ctx.saved_tensors
        _, need_vals, need_W = ctx.needs_input_grad
        grad_vals = grad_W = None
        if need_vals:
            grad_vals = sampled_dots(idx_BK, grad_BD, W_dec_FD)
        if need_W:
            order = feature_major(idx_BK, W_dec_FD.shape[0])
            grad_W = sum_rows_by_feature(order, vals_BK, grad_BD)
        return None, grad_vals, grad_W


def sparse_decode(
    idx_BK: Int[Tensor, "B K"], vals_BK: Float[Tensor, "B K"], W_dec_FD: Float[Tensor, "F D"]
) -> Float[Tensor, "B D"]:
    """``Σ_k vals[b, k] · W_dec[idx[b, k]]`` without materialising a ``[B, F]`` matrix."""
    return _SparseDecode.apply(idx_BK, vals_BK, W_dec_FD)


def scatter_dense(
    idx_BK: Int[Tensor, "B K"], vals_BK: Float[Tensor, "B K"], d_sae: int
) -> Float[Tensor, "B F"]:
    """The dense ``[B, F]`` feature matrix, for callers that want every feature."""
    out = vals_BK.new_zeros(*vals_BK.shape[:-1], d_sae)
    return out.scatter_(-1, idx_BK, vals_BK)
