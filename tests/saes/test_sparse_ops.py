"""The sparse TopK kernels against a dense reference: TopK by ``sort``, mask, ReLU, dense matmul.

Forward values and every gradient (x, W_enc, b_enc, W_dec, the feature values) must agree with
autograd through the dense computation, in float64 to round-off and in float32 to float tolerance.
"""

from __future__ import annotations

import pytest
import torch

from saelab.saes.kernels.sparse_ops import gather_preacts, scatter_dense, sparse_decode

B, D, F, K = 7, 5, 24, 4


def _inputs(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(B, D, generator=g, dtype=dtype),
        "W_enc": torch.randn(D, F, generator=g, dtype=dtype),
        "b_enc": torch.randn(F, generator=g, dtype=dtype),
        "W_dec": torch.randn(F, D, generator=g, dtype=dtype),
        "target": torch.randn(B, D, generator=g, dtype=dtype),
    }


def _leaves(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone().requires_grad_(name != "target") for name, t in inputs.items()}


def _dense_reference(p: dict[str, torch.Tensor], k: int):
    """Dense TopK SAE body: returns (dense feature matrix, reconstruction, top-k indices)."""
    pre_BF = p["x"] @ p["W_enc"] + p["b_enc"]
    idx_BK = pre_BF.detach().sort(dim=-1, descending=True).indices[:, :k]
    mask_BF = torch.zeros_like(pre_BF, dtype=torch.bool).scatter_(-1, idx_BK, True)
    acts_BF = torch.relu(pre_BF * mask_BF)
    acts_BF.retain_grad()
    return acts_BF, acts_BF @ p["W_dec"], idx_BK


def _sparse_path(p: dict[str, torch.Tensor], k: int):
    with torch.no_grad():
        pre_BF = p["x"] @ p["W_enc"] + p["b_enc"]
    top_BK, idx_BK = pre_BF.topk(k, dim=-1, sorted=False)
    vals_BK = gather_preacts(p["x"], p["W_enc"], p["b_enc"], idx_BK, top_BK).relu()
    vals_BK.retain_grad()
    return vals_BK, sparse_decode(idx_BK, vals_BK, p["W_dec"]), idx_BK


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-4)], ids=["f64", "f32"]
)
@pytest.mark.parametrize("k", [1, K, F], ids=["k1", "k4", "kF"])
def test_forward_and_gradients_match_dense_reference(dtype, tol, k):
    inputs = _inputs(dtype)
    dense, sparse = _leaves(inputs), _leaves(inputs)

    acts_BF, recon_ref, idx_ref = _dense_reference(dense, k)
    vals_BK, recon, idx_BK = _sparse_path(sparse, k)

    # Same features chosen (as sets per token: the sparse path does not sort them).
    assert torch.equal(idx_BK.sort(-1).values, idx_ref.sort(-1).values)
    torch.testing.assert_close(scatter_dense(idx_BK, vals_BK.detach(), F), acts_BF.detach())
    torch.testing.assert_close(recon, recon_ref, rtol=tol, atol=tol)

    # A loss that weights every output differently, so no gradient is trivially symmetric.
    weights = torch.linspace(0.5, 2.0, B * D, dtype=dtype).reshape(B, D)
    (weights * (recon_ref - inputs["target"]) ** 2).sum().backward()
    (weights * (recon - inputs["target"]) ** 2).sum().backward()
    for name in ("x", "W_enc", "b_enc", "W_dec"):
        assert sparse[name].grad is not None, name
        torch.testing.assert_close(sparse[name].grad, dense[name].grad, rtol=tol, atol=tol)
    # d loss / d vals equals the dense gradient at the chosen features.
    torch.testing.assert_close(vals_BK.grad, acts_BF.grad.gather(-1, idx_BK), rtol=tol, atol=tol)


def test_gradients_flow_only_to_inputs_that_need_them():
    """The backward skips work for inputs without requires_grad and still gets the rest right."""
    inputs = _inputs(torch.float64, seed=1)
    dense = _leaves(inputs)
    sparse = {k: v.clone() for k, v in inputs.items()}
    sparse["W_enc"].requires_grad_(True)  # x, b_enc, W_dec are constants here

    _, recon_ref, _ = _dense_reference(dense, K)
    _, recon, _ = _sparse_path(sparse, K)
    recon_ref.pow(2).sum().backward()
    recon.pow(2).sum().backward()

    assert sparse["x"].grad is None and sparse["b_enc"].grad is None
    torch.testing.assert_close(sparse["W_enc"].grad, dense["W_enc"].grad)


def test_gather_preacts_returns_given_values_not_a_view():
    inputs = _inputs(torch.float32)
    with torch.no_grad():
        pre_BF = inputs["x"] @ inputs["W_enc"] + inputs["b_enc"]
    top_BK, idx_BK = pre_BF.topk(K, dim=-1)
    out = gather_preacts(inputs["x"], inputs["W_enc"], inputs["b_enc"], idx_BK, top_BK)
    assert torch.equal(out, pre_BF.gather(-1, idx_BK))
    out.add_(1.0)
    assert torch.equal(top_BK, pre_BF.gather(-1, idx_BK)), "output aliases its input"


def test_sparse_decode_repeated_feature_sums_its_values():
    """The same feature chosen twice in a row contributes the sum of both values."""
    W_dec = torch.randn(F, D, dtype=torch.float64)
    idx = torch.tensor([[3, 3, 5]])
    vals = torch.tensor([[0.5, 1.5, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(sparse_decode(idx, vals, W_dec)[0], 2.0 * W_dec[3] - 2.0 * W_dec[5])


@pytest.mark.parametrize("lead", [(B,), (2, 3)], ids=["2d", "3d"])
def test_scatter_dense_places_each_value_at_its_index(lead):
    g = torch.Generator().manual_seed(2)
    # Distinct indices per row: a random permutation's first K entries.
    idx = torch.stack(
        [torch.randperm(F, generator=g)[:K] for _ in range(int(torch.tensor(lead).prod()))]
    )
    idx = idx.reshape(*lead, K)
    vals = torch.randn(*lead, K, generator=g)
    dense = scatter_dense(idx, vals, F)

    assert dense.shape == (*lead, F)
    expected = torch.zeros(*lead, F)
    for pos in torch.cartesian_prod(*[torch.arange(n) for n in lead]).reshape(-1, len(lead)):
        row = tuple(pos.tolist())
        for j in range(K):
            expected[row][idx[row][j]] = vals[row][j]
    assert torch.equal(dense, expected)
    assert ((dense != 0).sum(-1) == K).all()
