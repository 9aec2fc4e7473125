"""Gated SAE: the encoder is a JumpReLU in disguise (App. E), the three loss terms against hand
numbers and a naive reference, the frozen decoder of the auxiliary term, and a short real run."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.errors import SaelabError
from saelab.saes.gated import GatedSAE
from saelab.training.trainer import Trainer
from synthetic import sparse_stream

D_IN, WIDTH, BATCH = 6, 20, 16
PARAMS = ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")


def _random_sae(penalty: str = "paper", *, apply_b_dec: bool = True, l1: float = 0.7) -> GatedSAE:
    cfg = SAEConfig(architecture="gated", width=WIDTH, l1_coefficient=l1, gated_penalty=penalty)
    sae = GatedSAE(cfg, D_IN, apply_b_dec_to_input=apply_b_dec, seed=0).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in PARAMS:
            p = getattr(sae, name)
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return sae


def _x(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, D_IN, generator=g, dtype=torch.float64)


def _reference(sae: GatedSAE, x: torch.Tensor, penalty_scale: float = 1.0):
    """Eqs. 6–8 of the paper written out densely, with SAELens' ``W_enc ⊙ exp(r_mag)``."""
    W, b_gate, r_mag, b_mag, W_dec, b_dec = (getattr(sae, n) for n in PARAMS)
    x_tilde = x - b_dec if sae.apply_b_dec_to_input else x
    pi_gate = x_tilde @ W + b_gate
    pi_mag = x_tilde @ (W * r_mag.exp()) + b_mag
    f = (pi_gate > 0).double() * torch.relu(pi_mag)
    mse = (x - (f @ W_dec + b_dec)).pow(2).sum(-1).mean()
    gate = torch.relu(pi_gate)
    if sae.cfg.gated_penalty == "paper":
        l1 = gate.sum(-1).mean()
        aux = (x - (gate @ W_dec.detach() + b_dec.detach())).pow(2).sum(-1).mean()
    else:
        l1 = (gate * W_dec.norm(dim=-1)).sum(-1).mean()
        aux = (x - (gate @ W_dec + b_dec)).pow(2).sum(-1).mean()
    loss = mse + sae.cfg.l1_coefficient * penalty_scale * l1 + aux
    return loss, {"mse": mse, "l1": l1, "aux": aux}, f


def _grads(sae: GatedSAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    loss.backward()
    grads = {n: getattr(sae, n).grad for n in PARAMS}
    return {
        n: torch.zeros_like(getattr(sae, n)) if g is None else g.clone() for n, g in grads.items()
    }


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encoder_is_a_jumprelu_with_the_app_e_threshold(apply_b_dec):
    sae = _random_sae(apply_b_dec=apply_b_dec)
    x = _x()
    with torch.no_grad():
        x_tilde = x - sae.b_dec if apply_b_dec else x
        pi_mag = x_tilde @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
        theta = sae.b_mag - sae.r_mag.exp() * sae.b_gate
        jumprelu = torch.relu(pi_mag) * (pi_mag > theta)
        feats = sae.encode_normalised(x).to_dense()
    assert (feats > 0).any() and (feats == 0).any()
    torch.testing.assert_close(feats, jumprelu, rtol=1e-12, atol=1e-12)


def _hand_set_sae(penalty: str) -> GatedSAE:
    """d_in = 2, two features: W_enc = I, b_gate = (0, −1), exp(r_mag) = (1, 2),
    W_dec = diag(1, 2)."""
    cfg = SAEConfig(architecture="gated", width=2, l1_coefficient=0.5, gated_penalty=penalty)
    sae = GatedSAE(cfg, d_in=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_gate.copy_(torch.tensor([0.0, -1.0]))
        sae.r_mag.copy_(torch.tensor([0.0, math.log(2.0)]))
        sae.b_mag.zero_()
        sae.W_dec.copy_(torch.diag(torch.tensor([1.0, 2.0])))
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize(
    ("penalty", "l1", "loss"),
    # x = (2, 1.5): π_gate = (2, 0.5) → both open; π_mag = (2, 3) = f̃; x̂ = (2, 6);
    # mse = 4.5² = 20.25.
    # ReLU(π_gate) = (2, 0.5), decoded (2, 1): aux = 0.5² = 0.25. paper: L1 = 2.5;
    # april: L1 = 2·‖d_1‖ + 0.5·‖d_2‖ = 2 + 1 = 3. loss = 20.25 + 0.5·L1 + 0.25.
    [("paper", 2.5, 21.75), ("april", 3.0, 22.0)],
)
def test_loss_terms_on_hand_set_weights(penalty, l1, loss):
    sae = _hand_set_sae(penalty)
    out = sae.training_step(torch.tensor([[2.0, 1.5]]))
    assert out.losses["mse"].item() == pytest.approx(20.25)
    assert out.losses["l1"].item() == pytest.approx(l1)
    assert out.losses["aux"].item() == pytest.approx(0.25)
    assert out.loss.item() == pytest.approx(loss)
    assert torch.allclose(out.feats.to_dense(), torch.tensor([[2.0, 3.0]]))
    assert torch.allclose(out.recon_BD, torch.tensor([[2.0, 6.0]]))


@pytest.mark.parametrize("penalty", ["paper", "april"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_training_step_loss_and_grads_match_reference(penalty, apply_b_dec):
    sae = _random_sae(penalty, apply_b_dec=apply_b_dec)
    x = _x()
    out = sae.training_step(x, penalty_scale=0.6)
    ours = _grads(sae, out.loss)
    ref_loss, ref_terms, ref_f = _reference(sae, x, penalty_scale=0.6)
    theirs = _grads(sae, ref_loss)
    torch.testing.assert_close(out.loss, ref_loss)
    for name, value in ref_terms.items():
        torch.testing.assert_close(out.losses[name], value.detach())
    torch.testing.assert_close(out.feats.to_dense(), ref_f.detach())
    for name in PARAMS:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


def test_paper_auxiliary_term_gives_the_decoder_no_gradient():
    """With the paper penalty, W_dec learns from the reconstruction alone: its gradient is that
    of the MSE term; the L1-shrunk gate path does not pull the decoder."""
    sae = _random_sae("paper")
    x = _x()
    full = _grads(sae, sae.training_step(x).loss)["W_dec"]
    mse_only = _grads(sae, _reference(sae, x)[1]["mse"])["W_dec"]
    torch.testing.assert_close(full, mse_only)
    # The april recipe differs on purpose: its aux term and norm-weighted L1 reach W_dec.
    april = _random_sae("april")
    full = _grads(april, april.training_step(x).loss)["W_dec"]
    mse_only = _grads(april, _reference(april, x)[1]["mse"])["W_dec"]
    assert not torch.allclose(full, mse_only)


def test_init_and_saved_tensors():
    sae = GatedSAE(SAEConfig(architecture="gated", width=WIDTH), D_IN, seed=0)
    assert sae.b_enc is None and "b_enc" not in dict(sae.named_parameters())
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(WIDTH))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    for name in ("b_gate", "r_mag", "b_mag", "b_dec"):
        assert torch.equal(getattr(sae, name), torch.zeros_like(getattr(sae, name)))
    assert set(sae.folded_state_dict()) == set(GatedSAE.saved_tensor_shapes(D_IN, WIDTH)) == {
        "W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"
    }  # fmt: skip


def test_decoder_norm_follows_the_penalty():
    assert GatedSAE(SAEConfig(architecture="gated", width=8), 4).decoder_unit_norm
    april = SAEConfig(architecture="gated", width=8, gated_penalty="april")
    assert not GatedSAE(april, 4).decoder_unit_norm
    with pytest.raises(SaelabError, match="gated_penalty"):
        GatedSAE(SAEConfig(architecture="gated", gated_penalty="april", decoder_unit_norm=True), 4)
    with pytest.raises(SaelabError, match="gated_penalty"):
        SAEConfig(architecture="gated", gated_penalty="l2")


@pytest.mark.parametrize("penalty", ["paper", "april"])
def test_trains_with_the_real_trainer(penalty):
    cfg = SAEConfig(
        hook="h", architecture="gated", width=64, l1_coefficient=0.05, gated_penalty=penalty
    )
    sae = GatedSAE(cfg, 16, seed=0)
    held_out = next(sparse_stream(16, seed=99))["h"]
    with torch.no_grad():
        before = sae.training_step(held_out).loss.item()
    train = TrainConfig(tokens=30 * 64, batch_size=64, lr=3e-3)
    Trainer([sae], train, progress=False).fit(sparse_stream(16))
    with torch.no_grad():
        after = sae.training_step(held_out)
    assert after.loss.item() < 0.5 * before
    norms = sae.W_dec.norm(dim=-1)
    if penalty == "paper":
        torch.testing.assert_close(norms, torch.ones_like(norms))
    else:
        assert not torch.allclose(norms, torch.ones_like(norms))
