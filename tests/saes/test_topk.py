"""TopK SAE: the training step against a dense reference written here (TopK by ``sort``), the
unit-norm decoder constraint, and the geometric-median initialisation of ``b_dec``."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes.topk import TopKSAE, geometric_median

D_IN, WIDTH, BATCH = 8, 48, 20
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _sae(k: int = 4, *, k_aux: int | None = None, aux: float = 0.5, seed: int = 0) -> TopKSAE:
    """A float64 TopK SAE with every parameter randomised (biases and decoder norms included)."""
    cfg = SAEConfig(architecture="topk", width=WIDTH, k=k, k_aux=k_aux, aux_coefficient=aux)
    sae = TopKSAE(cfg, D_IN, seed=seed).double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name in PARAMS:
            p = getattr(sae, name)
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return sae


def _x(seed: int = 1, n: int = BATCH) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _topk_by_sort(pre_BF: torch.Tensor, k: int) -> torch.Tensor:
    """Dense ReLU(TopK(pre)): keep the k largest entries of each row (found by sorting)."""
    idx = pre_BF.detach().sort(dim=-1, descending=True).indices[:, :k]
    keep = torch.zeros_like(pre_BF, dtype=torch.bool).scatter_(-1, idx, True)
    return torch.relu(torch.where(keep, pre_BF, torch.zeros_like(pre_BF)))


def _reference_loss(sae: TopKSAE, x: torch.Tensor, dead_F: torch.Tensor | None):
    """Dense TopK SAE loss with AuxK, straight from the definitions in METHODS §3."""
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n) for n in PARAMS)
    pre = (x - b_dec) @ W_enc + b_enc
    z = _topk_by_sort(pre, sae.cfg.k)
    recon = z @ W_dec + b_dec
    mse = (recon - x).pow(2).sum(-1).mean()
    terms = {"mse": mse}
    loss = mse
    if dead_F is not None and bool(dead_F.any()):
        e = (x - recon).detach()
        k_aux = min(sae.cfg.k_aux_for(D_IN), int(dead_F.sum()))
        z_aux = _topk_by_sort(pre.masked_fill(~dead_F, float("-inf")), k_aux)
        z_aux = torch.nan_to_num(z_aux)  # relu(-inf) is 0, but keep the reference NaN-free
        e_hat = z_aux @ W_dec
        auxk = (e - e_hat).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
        terms["auxk"] = auxk
        loss = loss + sae.cfg.aux_coefficient * auxk
    return loss, terms, recon, z


def _grads(sae: TopKSAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    loss.backward()
    return {n: getattr(sae, n).grad.clone() for n in PARAMS}


def _dead_mask(n_dead: int, seed: int = 3) -> torch.Tensor:
    perm = torch.randperm(WIDTH, generator=torch.Generator().manual_seed(seed))
    return torch.zeros(WIDTH, dtype=torch.bool).index_fill_(0, perm[:n_dead], True)


@pytest.mark.parametrize(
    ("n_dead", "k_aux"),
    [(0, None), (2, None), (30, None), (30, 3), (WIDTH, 6)],
    ids=["no-dead", "few-dead-cap", "many-dead-default", "many-dead-k_aux3", "all-dead"],
)
def test_training_step_loss_and_grads_match_dense_reference(n_dead, k_aux):
    sae = _sae(k=5, k_aux=k_aux)
    x = _x()
    dead_F = _dead_mask(n_dead)

    out = sae.training_step(x, dead_F=dead_F)
    ref_loss, ref_terms, ref_recon, ref_z = _reference_loss(sae, x, dead_F)

    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert set(out.losses) == set(ref_terms)
    for name, value in ref_terms.items():
        torch.testing.assert_close(out.losses[name], value.detach(), rtol=1e-12, atol=1e-12)
        assert not out.losses[name].requires_grad
    torch.testing.assert_close(out.recon_BD, ref_recon, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.feats.to_dense(), ref_z.detach())

    got, want = _grads(sae, out.loss), _grads(sae, ref_loss)
    for name in PARAMS:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)


def test_auxk_is_off_without_dead_features_or_coefficient():
    x = _x()
    for sae, dead in [
        (_sae(), None),
        (_sae(), torch.zeros(WIDTH, dtype=torch.bool)),
        (_sae(aux=0.0), torch.ones(WIDTH, dtype=torch.bool)),
    ]:
        out = sae.training_step(x, dead_F=dead)
        assert set(out.losses) == {"mse"}
        torch.testing.assert_close(out.loss, (out.recon_BD - x).pow(2).sum(-1).mean())


def test_auxk_gradient_reaches_only_dead_encoder_columns():
    """AuxK trains dead features: with the MSE gradient removed, live encoder columns get none."""
    sae = _sae(k=3, aux=1.0)
    x = _x()
    dead_F = _dead_mask(20)
    out = sae.training_step(x, dead_F=dead_F)
    aux_part = out.loss - (out.recon_BD - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(aux_part.detach(), out.losses["auxk"])
    aux_part.backward()
    assert sae.W_enc.grad[:, ~dead_F].abs().max() < 1e-12
    assert sae.W_enc.grad[:, dead_F].abs().max() > 1e-3


@pytest.mark.parametrize("k", [1, 4, 16])
def test_l0_is_k_when_the_top_k_preactivations_are_positive(k):
    sae = _sae(k=k)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: ReLU removes nothing
    x = _x(n=64)
    feats_BF = sae.encode(x)
    assert ((feats_BF != 0).sum(-1) == k).all()
    assert (sae.encode_normalised(x).l0_per_token() == k).all()


def test_l0_is_the_number_of_positive_values_among_the_top_k():
    """In general L0 = #{positive pre-activations among the top k} ≤ k."""
    sae = _sae(k=6)
    with torch.no_grad():
        sae.b_enc.sub_(2.0)
    x = _x(n=64)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.sort(dim=-1, descending=True).values[:, :6]
    expected = (top > 0).sum(-1)
    assert (expected < 6).any(), "test data should include tokens with fewer than k firing"
    feats = sae.encode_normalised(x)
    assert torch.equal(feats.l0_per_token(), expected)
    assert torch.equal((sae.encode(x) > 0).sum(-1), expected)


def test_sparse_feature_acts_agree_with_their_dense_form():
    sae = _sae(k=4)
    feats = sae.encode_normalised(_x(n=64))
    dense = feats.to_dense()
    assert dense.shape == (64, WIDTH)
    assert torch.equal(feats.fired_counts(), (dense > 0).sum(0))
    assert torch.equal(feats.l0_per_token(), (dense > 0).sum(-1))


def test_forward_is_decode_of_encode_in_model_units_with_any_leading_shape():
    sae = _sae(k=4)
    sae.activation_scale.fill_(0.37)
    x = _x(n=12).reshape(3, 4, D_IN)
    feats = sae.encode(x)
    assert feats.shape == (3, 4, WIDTH)
    torch.testing.assert_close(sae(x), sae.decode(feats))
    # Model units: the scale is applied on the way in and undone on the way out.
    xs = x.reshape(-1, D_IN) * 0.37
    recon = _reference_loss(sae, xs, None)[2] / 0.37
    torch.testing.assert_close(sae(x).reshape(-1, D_IN), recon)


def test_wrong_width_is_a_one_line_error():
    with pytest.raises(SaelabError) as err:
        _sae().encode(torch.randn(3, D_IN + 1, dtype=torch.float64))
    assert "\n" not in str(err.value) and str(D_IN) in str(err.value)


def test_decoder_rows_unit_norm_after_optimizer_step():
    sae = _sae()
    before = sae.W_dec.detach().clone()
    norms = before.norm(dim=-1)
    assert (norms - 1).abs().max() > 0.1, "fixture should have non-unit rows"
    sae.after_optimizer_step_()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(WIDTH, dtype=torch.float64))
    # Only the length changes, never the direction.
    torch.testing.assert_close(sae.W_dec.detach() * norms[:, None], before)


def test_init_decoder_is_unit_norm_and_tied_to_encoder():
    sae = TopKSAE(SAEConfig(architecture="topk", width=WIDTH, k=4), D_IN, seed=0)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(WIDTH))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()


def test_before_optimizer_step_removes_parallel_gradient_component():
    sae = _sae(k=5)
    out = sae.training_step(_x(), dead_F=_dead_mask(10))
    out.loss.backward()
    grad = sae.W_dec.grad.clone()
    unit = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    parallel = (grad * unit).sum(-1)
    assert parallel.abs().max() > 1e-3, "gradient should start with a parallel part"

    sae.before_optimizer_step_()
    after = sae.W_dec.grad
    torch.testing.assert_close(
        (after * unit).sum(-1), torch.zeros(WIDTH, dtype=torch.float64), atol=1e-12, rtol=0
    )
    # The orthogonal part is untouched: what was removed is exactly the parallel component.
    torch.testing.assert_close(grad - after, parallel[:, None] * unit)


def test_before_optimizer_step_without_gradient_is_a_no_op():
    sae = _sae()
    sae.before_optimizer_step_()
    assert sae.W_dec.grad is None


def _sum_distances(point: torch.Tensor, points: torch.Tensor) -> float:
    return float((points - point).norm(dim=-1).sum())


def test_geometric_median_resists_an_outlier():
    g = torch.Generator().manual_seed(0)
    center = torch.randn(D_IN, generator=g, dtype=torch.float64)
    cluster = center + 0.1 * torch.randn(50, D_IN, generator=g, dtype=torch.float64)
    points = torch.cat([cluster, center[None] + 1000.0])
    median = geometric_median(points)
    mean = points.mean(0)
    assert (median - center).norm() < 0.1 * (mean - center).norm()
    # It is the minimiser of the summed distances: better than the mean and nearby points.
    best = _sum_distances(median, points)
    assert best < _sum_distances(mean, points)
    for _ in range(20):
        nudge = 1e-2 * torch.randn(D_IN, generator=g, dtype=torch.float64)
        assert best <= _sum_distances(median + nudge, points) + 1e-9


def test_geometric_median_of_symmetric_points_is_their_center():
    g = torch.Generator().manual_seed(1)
    center = torch.randn(D_IN, generator=g, dtype=torch.float64)
    offsets = (
        torch.randn(10, D_IN, generator=g, dtype=torch.float64)
        * torch.linspace(1, 9, 10)[:, None].double()
    )
    points = torch.cat([center + offsets, center - offsets])
    torch.testing.assert_close(geometric_median(points), center, atol=1e-6, rtol=0)


def test_init_from_data_sets_b_dec_to_geometric_median_only_when_it_is_subtracted():
    x = _x(n=40).float()
    sae = TopKSAE(SAEConfig(architecture="topk", width=WIDTH, k=4), D_IN, seed=0)
    sae.init_from_data_(x)
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(x))
    assert sae.b_dec.detach().norm() > 0

    plain = TopKSAE(
        SAEConfig(architecture="topk", width=WIDTH, k=4), D_IN, apply_b_dec_to_input=False, seed=0
    )
    plain.init_from_data_(x)
    assert not plain.b_dec.any()
