"""ReLU SAE (April-2024 recipe): loss = mse + λ Σ_i f_i ‖d_i‖, tied init with small decoder rows."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig
from saelab.saes.kernels import relu_blocks
from saelab.saes.relu import ReLUSAE

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _hand_set_sae(l1: float) -> ReLUSAE:
    """d_in = 2, two features: encoder identity, decoder rows of norm 2 and 3."""
    sae = ReLUSAE(SAEConfig(architecture="relu", width=2, l1_coefficient=l1), d_in=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
        sae.b_dec.zero_()
    return sae


def test_loss_on_hand_set_weights():
    # x = (1, −1): f = ReLU(x) = (1, 0); x̂ = 1·(2, 0) = (2, 0); ‖x − x̂‖² = 1 + 1 = 2.
    # Penalty Σ f_i ‖d_i‖ = 1·2 + 0·3 = 2. With λ = 0.5 and penalty_scale = 1: loss = 2 + 1 = 3.
    sae = _hand_set_sae(l1=0.5)
    out = sae.training_step(torch.tensor([[1.0, -1.0]]))
    assert out.losses["mse"].item() == pytest.approx(2.0)
    assert out.losses["l1"].item() == pytest.approx(2.0)
    assert out.loss.item() == pytest.approx(3.0)
    assert torch.equal(out.feats.to_dense(), torch.tensor([[1.0, 0.0]]))
    # penalty_scale warms λ up: at 0.5 the penalty counts half.
    assert sae.training_step(torch.tensor([[1.0, -1.0]]), penalty_scale=0.5).loss.item() == (
        pytest.approx(2.5)
    )


def test_loss_is_mean_over_tokens_of_hand_cases():
    # Second token x = (0, 2): f = (0, 2); x̂ = (0, 6); error 16; penalty 2·3 = 6.
    # Means over the two tokens: mse = (2 + 16)/2 = 9, l1 = (2 + 6)/2 = 4.
    sae = _hand_set_sae(l1=0.25)
    out = sae.training_step(torch.tensor([[1.0, -1.0], [0.0, 2.0]]))
    assert out.losses["mse"].item() == pytest.approx(9.0)
    assert out.losses["l1"].item() == pytest.approx(4.0)
    assert out.loss.item() == pytest.approx(9.0 + 0.25 * 4.0)


def _random_sae(apply_b_dec: bool, l1: float = 0.7) -> ReLUSAE:
    cfg = SAEConfig(architecture="relu", width=24, l1_coefficient=l1)
    sae = ReLUSAE(cfg, d_in=6, apply_b_dec_to_input=apply_b_dec, seed=0).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in PARAMS:
            p = getattr(sae, name)
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return sae


@pytest.mark.parametrize("sparse_path", [False, True], ids=["dense-blocks", "sparse-blocks"])
@pytest.mark.parametrize("apply_b_dec", [False, True], ids=["plain", "b_dec-subtracted"])
def test_loss_and_grads_match_reference(apply_b_dec, sparse_path, monkeypatch):
    # The step decodes blocks with few firing features through their non-zeros only;
    # forcing the threshold to 1 (or 0) sends every block down one path.
    monkeypatch.setattr(relu_blocks, "SPARSE_MAX_DENSITY", 1.0 if sparse_path else 0.0)
    sae = _random_sae(apply_b_dec)
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n) for n in PARAMS)
    f = torch.relu(((x - b_dec) if apply_b_dec else x) @ W_enc + b_enc)
    mse = ((f @ W_dec + b_dec - x) ** 2).sum(-1).mean()
    penalty = (f * W_dec.norm(dim=-1)).sum(-1).mean()
    ref = mse + 0.7 * 0.3 * penalty
    assert (f > 0).any() and (f == 0).any()

    out = sae.training_step(x, penalty_scale=0.3)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.feats.to_dense(), f.detach())

    sae.zero_grad()
    ref.backward()
    want = {n: getattr(sae, n).grad.clone() for n in PARAMS}
    sae.zero_grad()
    out.loss.backward()
    for n in PARAMS:
        torch.testing.assert_close(getattr(sae, n).grad, want[n], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("norm", [0.1, 0.37])
def test_init_decoder_norms_and_tied_encoder(norm):
    cfg = SAEConfig(architecture="relu", expansion=4, decoder_init_norm=norm)
    sae = ReLUSAE(cfg, d_in=16, seed=3)
    assert sae.W_dec.shape == (64, 16) and sae.W_enc.shape == (16, 64)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((64,), norm))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    # Random directions, not a fixed pattern.
    cos = (sae.W_dec / norm) @ (sae.W_dec / norm).T
    assert (cos - torch.eye(64)).abs().max() < 0.99


def test_init_is_seeded():
    cfg = SAEConfig(architecture="relu", width=32)
    a, b, c = (ReLUSAE(cfg, d_in=8, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.W_dec, b.W_dec)
    assert not torch.equal(a.W_dec, c.W_dec)


def test_relu_sae_has_no_decoder_constraint():
    """The norm-weighted penalty replaces the unit-norm constraint: the hooks change nothing."""
    sae = _random_sae(False)
    sae.training_step(torch.randn(5, 6, dtype=torch.float64)).loss.backward()
    W, grad = sae.W_dec.detach().clone(), sae.W_dec.grad.clone()
    sae.before_optimizer_step_()
    sae.after_optimizer_step_()
    assert torch.equal(sae.W_dec, W) and torch.equal(sae.W_dec.grad, grad)
