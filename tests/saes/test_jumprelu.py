"""JumpReLU SAE: the straight-through estimators of METHODS §4.2 on hand-set numbers, the training
step against a reference written from the formulas, the √d_in units, and a short real run."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.errors import SaelabError
from saelab.saes.jumprelu import JumpReLUSAE, heaviside_step, jumprelu
from saelab.saes.registry import sae_folder_name
from saelab.training.checkpoint import latest_checkpoint, load_state, save_state
from saelab.training.trainer import Trainer
from synthetic import sparse_stream

D_IN, WIDTH, BATCH = 6, 20, 32
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")

# Three tokens, three features; θ = (1, 0.5, 2), ε = 0.1, so K = 1 where |z − θ| < 0.05.
PRE = [[1.04, 0.30, 2.20], [0.97, 0.56, 1.96], [1.20, 0.54, 2.06]]
THETA = [1.0, 0.5, 2.0]
EPS = 0.1


def _hand_inputs():
    pre = torch.tensor(PRE, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    return pre, theta


def test_forward_is_z_times_step():
    pre, theta = _hand_inputs()
    expected_step = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.float64)
    assert torch.equal(heaviside_step(pre, theta, EPS), expected_step)
    assert torch.equal(jumprelu(pre, theta, EPS), pre.detach() * expected_step)


def test_jumprelu_pseudo_derivatives_on_hand_set_numbers():
    pre, theta = _hand_inputs()
    grad_out = torch.tensor(
        [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64
    )
    jumprelu(pre, theta, EPS).backward(grad_out)
    # In the kernel (|z − θ| < 0.05): feature 0 tokens 0, 1; feature 1 token 2; feature 2 token 1.
    # ∂/∂θ = −(θ/ε) Σ K·g: −(1/0.1)(1 + 4) = −50; −(0.5/0.1)·8 = −40; −(2/0.1)·6 = −120.
    torch.testing.assert_close(
        theta.grad, torch.tensor([-50.0, -40.0, -120.0], dtype=torch.float64)
    )
    # ∂/∂z = H(z − θ)·g: the exact derivative of z·H, no kernel term.
    expected_pre_grad = grad_out * (pre.detach() > theta.detach())
    torch.testing.assert_close(pre.grad, expected_pre_grad)


def test_step_pseudo_derivative_reaches_theta_only():
    pre, theta = _hand_inputs()
    grad_out = torch.tensor(
        [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64
    )
    heaviside_step(pre, theta, EPS).backward(grad_out)
    # ∂/∂θ H = −(1/ε) Σ K·g: −10·5 = −50; −10·8 = −80; −10·6 = −60.
    torch.testing.assert_close(theta.grad, torch.tensor([-50.0, -80.0, -60.0], dtype=torch.float64))
    assert pre.grad is None


def _random_sae(*, apply_b_dec: bool = False, l1: float = 0.3) -> JumpReLUSAE:
    # A bandwidth wide enough that many pre-activations fall inside the kernel.
    cfg = SAEConfig(architecture="jumprelu", width=WIDTH, l1_coefficient=l1, jumprelu_bandwidth=0.2)
    sae = JumpReLUSAE(cfg, D_IN, apply_b_dec_to_input=apply_b_dec, seed=0).double()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name in PARAMS:
            p = getattr(sae, name)
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        sae.threshold.copy_(0.1 + 0.5 * torch.rand(WIDTH, generator=g))
    return sae


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(
        BATCH, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_training_step_matches_the_formulas(apply_b_dec):
    sae = _random_sae(apply_b_dec=apply_b_dec)
    x = _x()
    out = sae.training_step(x, penalty_scale=0.5)
    sae.zero_grad()
    out.loss.backward()

    # Reference: plain tensors, the step as a constant mask, θ's gradient from the STE formulas.
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().clone().requires_grad_() for n in PARAMS)
    theta = sae.threshold.detach()
    eps, lam = 0.2 * math.sqrt(D_IN), sae.cfg.l1_coefficient * 0.5
    pre = (x - b_dec if apply_b_dec else x) @ W_enc + b_enc
    fires = (pre > theta).double().detach()
    f = pre * fires
    f.retain_grad()
    mse = (x - (f @ W_dec + b_dec)).pow(2).sum(-1).mean()
    l0 = fires.sum(-1).mean()
    (mse + lam * l0).backward()
    kernel = (((pre.detach() - theta) / eps).abs() < 0.5).double()
    assert kernel.sum() >= 5, "the test needs pre-activations inside the kernel"
    d_theta = (-(theta / eps) * kernel * f.grad).sum(0) + lam * (-(1 / eps) * kernel).sum(0) / BATCH

    torch.testing.assert_close(out.loss, (mse + lam * l0).detach())
    torch.testing.assert_close(out.losses["l0"], l0)
    torch.testing.assert_close(out.feats.to_dense(), f.detach())
    for name, ref in zip(PARAMS, (W_enc, b_enc, W_dec, b_dec), strict=True):
        torch.testing.assert_close(getattr(sae, name).grad, ref.grad, msg=name)
    torch.testing.assert_close(sae.threshold.grad, d_theta)  # θ itself is the parameter


def test_l0_penalty_moves_thresholds_not_the_encoder():
    x = _x()
    unpenalised = _random_sae(l1=0.0)
    unpenalised.training_step(x).loss.backward()
    no_penalty = {n: p.grad for n, p in unpenalised.named_parameters()}
    sae = _random_sae(l1=5.0)  # the same weights
    sae.training_step(x).loss.backward()
    for name in PARAMS:
        torch.testing.assert_close(sae.get_parameter(name).grad, no_penalty[name])
    assert not torch.allclose(sae.threshold.grad, no_penalty["threshold"])


def test_inference_is_a_hard_threshold_and_init_is_in_sqrt_d_units():
    sae = _random_sae()
    x = _x()
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
        expected = torch.relu(pre) * (pre > sae.threshold)
        torch.testing.assert_close(sae.encode_normalised(x).to_dense(), expected)
    fresh = JumpReLUSAE(SAEConfig(architecture="jumprelu", width=WIDTH), D_IN, seed=0)
    # Gemma Scope's θ = ε = 0.001 at E‖x‖² = 1 are √d_in times larger at E‖x‖ = √d_in.
    torch.testing.assert_close(fresh.threshold, torch.full((WIDTH,), 0.001 * math.sqrt(D_IN)))
    assert fresh.bandwidth == pytest.approx(0.001 * math.sqrt(D_IN))
    assert fresh.decoder_unit_norm and not fresh.apply_b_dec_to_input
    torch.testing.assert_close(fresh.W_dec.norm(dim=-1), torch.ones(WIDTH))
    torch.testing.assert_close(fresh.W_enc, fresh.W_dec.T)


def test_folder_name_names_the_l0_coefficient():
    cfg = SAEConfig(hook="h", architecture="jumprelu", l1_coefficient=0.02)
    assert sae_folder_name(cfg) == "h-jumprelu-x16-l0_0.02"


def test_trains_with_the_real_trainer():
    cfg = SAEConfig(
        hook="h", architecture="jumprelu", width=64, l1_coefficient=0.01, jumprelu_bandwidth=0.05
    )
    sae = JumpReLUSAE(cfg, 16, seed=0)
    held_out = next(sparse_stream(16, seed=99))["h"]
    theta_before = sae.threshold.detach().clone()
    with torch.no_grad():
        before = sae.training_step(held_out)
    Trainer([sae], TrainConfig(tokens=30 * 64, batch_size=64, lr=3e-3), progress=False).fit(
        sparse_stream(16)
    )
    with torch.no_grad():
        after = sae.training_step(held_out)
    assert after.loss.item() < 0.5 * before.loss.item()
    assert after.losses["mse"].item() < 0.5 * before.losses["mse"].item()
    assert not torch.equal(sae.threshold, theta_before)  # θ learns through the estimator
    assert bool((sae.threshold >= 0).all())  # projected onto θ ≥ 0 after every update


def test_threshold_takes_adam_steps_of_its_own_learning_rate():
    # Adam's first step moves each parameter by lr·sign(grad) (bias-corrected moments), so θ moves
    # by exactly lr × jumprelu_threshold_lr_scale and the other parameters by at most lr.
    lr, scale = 1e-3, 7.0
    cfg = SAEConfig(
        hook="h",
        architecture="jumprelu",
        width=64,
        l1_coefficient=0.5,
        jumprelu_bandwidth=0.5,
        jumprelu_init_threshold=0.5,
        jumprelu_threshold_lr_scale=scale,
    )
    sae = JumpReLUSAE(cfg, 16, seed=0)
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    train = TrainConfig(tokens=64, batch_size=64, lr=lr, lr_warmup_frac=0, lr_decay_frac=0)
    Trainer([sae], train, progress=False).fit(sparse_stream(16))
    moved_F = (sae.threshold - before["threshold"]).abs()
    assert int((moved_F > 0).sum()) >= 10, "the test needs features inside the kernel"
    torch.testing.assert_close(
        moved_F[moved_F > 0], torch.full_like(moved_F[moved_F > 0], lr * scale)
    )
    for name in ("W_enc", "b_enc", "b_dec"):  # (W_dec is renormalised after the step)
        assert (sae.get_parameter(name) - before[name]).abs().max() <= lr * 1.001, name
    assert JumpReLUSAE(SAEConfig(architecture="jumprelu", width=8), 16).lr_scales() == {
        "threshold": pytest.approx(4.0)  # default √d_in
    }


def test_l0_falls_with_the_coefficient_as_thresholds_learn():
    # Sparse data: every input is 3 of 64 directions. A few hundred steps must take θ far from its
    # tiny Gemma Scope initial value, and a larger L0 coefficient must give a smaller L0 — near the
    # true 3 for the largest. (With θ trained as log θ, L0 barely depended on the coefficient.)
    held_out = next(sparse_stream(16, seed=99, batch=512))["h"]
    l0s = []
    for coefficient in (0.01, 0.1, 1.0):
        cfg = SAEConfig(hook="h", architecture="jumprelu", width=64, l1_coefficient=coefficient)
        sae = JumpReLUSAE(cfg, 16, seed=0)
        theta_init = sae.threshold.detach().clone()
        train = TrainConfig(tokens=200 * 64, batch_size=64, lr=3e-3)
        Trainer([sae], train, progress=False).fit(sparse_stream(16))
        with torch.no_grad():
            l0s.append(sae.training_step(held_out * sae.activation_scale).losses["l0"].item())
        assert sae.threshold.mean() > 10 * theta_init.mean()
        assert bool((sae.threshold >= 0).all())
    assert l0s[0] > 1.5 * l0s[1] > 1.5 * 1.5 * l0s[2], l0s
    assert l0s[2] < 2 * 3, l0s


def test_resume_refuses_a_checkpoint_with_other_parameters_in_one_line(tmp_path):
    cfg = SAEConfig(hook="h", architecture="jumprelu", width=32)
    train = TrainConfig(tokens=3 * 64, batch_size=64, lr=1e-3, checkpoint_every_tokens=64)
    sae = JumpReLUSAE(cfg, 16, seed=0)
    Trainer([sae], train, tmp_path, progress=False, tensorboard=False).fit(sparse_stream(16))
    # A run of this version resumes ...
    same = JumpReLUSAE(cfg, 16, seed=1)
    assert Trainer([same], train, tmp_path, progress=False, tensorboard=False).resume(
        sparse_stream(16)
    )
    path = latest_checkpoint(tmp_path)
    saved = load_state(path, "sae_0")
    assert torch.equal(same.threshold, saved["params"]["threshold"])
    # ... one written when θ was stored as log θ does not, with a one-line error.
    saved["params"]["log_threshold"] = saved["params"].pop("threshold").log()
    save_state(path, "sae_0", saved)
    fresh = Trainer([JumpReLUSAE(cfg, 16)], train, tmp_path, progress=False, tensorboard=False)
    with pytest.raises(SaelabError, match="another saelab version") as err:
        fresh.resume(sparse_stream(16))
    assert "\n" not in str(err.value)
