"""Training-recipe options: LR decay shapes, unit-norm decoder for ReLU, b_dec init, pre-encoder
bias, AuxK wiring, bf16 autocast refusal on the CPU, and one-line validation of every option."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.config import (
    B_DEC_INITS,
    RESAMPLE_WEIGHTINGS,
    RunConfig,
    SAEConfig,
    TrainConfig,
    load_run_config,
)
from saelab.errors import SaelabError
from saelab.saes import ReLUSAE, TopKSAE
from saelab.saes.base import geometric_median
from saelab.training.resampling import LOSS_EXPONENTS
from saelab.training.schedules import lr_multiplier
from saelab.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN = 16


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(SaelabError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and message.strip()
    return message


# ----- learning-rate schedules --------------------------------------------------------------------


def test_cosine_decay_runs_from_one_to_zero_over_the_decay_window():
    total, frac = 100, 0.2  # decay window: steps 80..99
    cosine = [lr_multiplier(s, total, 0.0, frac, "cosine") for s in range(total + 1)]
    assert cosine[:81] == [1.0] * 81
    assert cosine[90] == pytest.approx(0.5)
    assert cosine[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(cosine[80:], cosine[81:], strict=False))
    for s in range(80, 100):
        assert cosine[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 80) / 20)))
        # Cosine stays above linear in the first half of the window and below it after.
        linear = lr_multiplier(s, total, 0.0, frac)
        assert linear == pytest.approx((total - s) / 20)
        assert (cosine[s] >= linear) == (s <= 90)
    # The warm-up is the same whatever the decay.
    assert lr_multiplier(3, total, 0.1, frac, "cosine") == lr_multiplier(3, total, 0.1, frac)


def test_trainer_uses_the_configured_decay():
    cfg = TrainConfig(tokens=32 * 10, batch_size=32, lr=1e-2, lr_decay="cosine", lr_decay_frac=0.5)
    sae = ReLUSAE(SAEConfig(hook="h", architecture="relu", width=32), D_IN, seed=0)
    trainer = Trainer([sae], cfg, None, progress=False)
    trainer.fit({"h": torch.randn(32, D_IN)} for _ in range(10))
    expected = 1e-2 * 0.5 * (1 + math.cos(math.pi * 4 / 5))  # step 9 of a 5-step decay
    assert trainer.states[0].last_losses["lr"] == pytest.approx(expected)


# ----- decoder norm, b_dec init, pre-encoder bias -------------------------------------------------


def test_relu_unit_norm_decoder_option_projects_gradients_and_renormalises():
    cfg = SAEConfig(architecture="relu", width=24, l1_coefficient=0.3, decoder_unit_norm=True)
    sae = ReLUSAE(cfg, D_IN, seed=0)
    assert (
        sae.decoder_unit_norm and not ReLUSAE(SAEConfig(architecture="relu"), 4).decoder_unit_norm
    )
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=-1), torch.ones(24))
    assert torch.equal(sae.W_enc.detach(), sae.W_dec.detach().T)
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(1)) * 2
    out = sae.training_step(x)
    # Unit rows: the norm-weighted penalty is the plain L1 of Towards Monosemanticity.
    assert out.losses["l1"].item() == pytest.approx(out.feats.to_dense().sum(-1).mean().item())
    out.loss.backward()
    sae.before_optimizer_step_()
    parallel_F = (sae.W_dec.grad * sae.W_dec.detach()).sum(-1)
    assert parallel_F.abs().max() < 1e-6
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    opt.step()
    assert (sae.W_dec.detach().norm(dim=-1) - 1).abs().max() > 1e-4  # the step left the sphere
    sae.after_optimizer_step_()
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=-1), torch.ones(24))


def test_topk_decoder_norm_cannot_be_switched_off():
    message = _one_line_error(TopKSAE, SAEConfig(k=2, width=8, decoder_unit_norm=False), D_IN)
    assert "remove sae.decoder_unit_norm = false" in message
    assert TopKSAE(SAEConfig(k=2, width=8, decoder_unit_norm=True), D_IN).decoder_unit_norm
    assert TopKSAE(SAEConfig(k=2, width=8), D_IN).decoder_unit_norm


@pytest.mark.parametrize("arch", ["relu", "topk"])
@pytest.mark.parametrize("how", B_DEC_INITS)
def test_b_dec_init_options(arch, how):
    x = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(2)) + 3.0
    x[0] += 200.0  # an outlier the mean chases and the geometric median resists
    cls = ReLUSAE if arch == "relu" else TopKSAE
    sae = cls(SAEConfig(architecture=arch, width=8, k=2, b_dec_init=how), D_IN, seed=0)
    sae.init_from_data_(x)
    expected = {
        "zeros": torch.zeros(D_IN),
        "mean": x.mean(0),
        "geometric_median": geometric_median(x),
    }[how]
    torch.testing.assert_close(sae.b_dec.detach(), expected)


def test_b_dec_init_defaults_follow_the_pre_encoder_bias():
    x = torch.randn(30, D_IN, generator=torch.Generator().manual_seed(3)) + 1.0
    cases = [
        (ReLUSAE, SAEConfig(architecture="relu", width=8), "zeros", False),
        (ReLUSAE, SAEConfig(architecture="relu", width=8, apply_b_dec_to_input=True), "gm", True),
        (TopKSAE, SAEConfig(width=8, k=2), "gm", True),
        (TopKSAE, SAEConfig(width=8, k=2, apply_b_dec_to_input=False), "zeros", False),
    ]
    for cls, cfg, expected, subtracts in cases:
        sae = cls(cfg, D_IN, seed=0)
        assert sae.apply_b_dec_to_input is subtracts
        sae.init_from_data_(x)
        want = geometric_median(x) if expected == "gm" else torch.zeros(D_IN)
        torch.testing.assert_close(sae.b_dec.detach(), want)
    # An explicit constructor argument (as when loading a saved SAE) wins over the config.
    cfg = SAEConfig(architecture="relu", width=8, apply_b_dec_to_input=True)
    assert not ReLUSAE(cfg, D_IN, apply_b_dec_to_input=False).apply_b_dec_to_input


# ----- AuxK ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("aux_coefficient", [0.0, 1 / 32])
def test_auxk_reaches_dead_features_only_when_switched_on(aux_coefficient):
    """k = 1 over 128 features and 32 tokens a step: most features never fire. With AuxK their
    decoder rows learn (from the residual); without it nothing ever reaches them."""
    cfg = SAEConfig(
        hook="h", k=1, width=128, dead_window_tokens=32, aux_coefficient=aux_coefficient
    )
    sae = TopKSAE(cfg, D_IN, seed=0)
    W_dec = sae.W_dec.detach().clone()
    trainer = Trainer(
        [sae], TrainConfig(tokens=32 * 4, batch_size=32, lr=1e-2), None, progress=False
    )
    g = torch.Generator().manual_seed(0)
    trainer.fit({"h": torch.randn(32, D_IN, generator=g)} for _ in range(4))
    state = trainer.states[0]
    never_F = state.fired_total_F == 0
    assert never_F.sum() > 32
    moved_F = (sae.W_dec.detach() - W_dec).abs().amax(-1) > 1e-5  # beyond renormalisation
    if aux_coefficient:
        assert "auxk" in state.last_losses
        assert moved_F[never_F].any()
    else:
        assert "auxk" not in state.last_losses
        assert not moved_F[never_F].any()


# ----- bf16 autocast ------------------------------------------------------------------------------


def test_autocast_is_refused_on_the_cpu():
    message = _one_line_error(RunConfig, train=TrainConfig(autocast_bf16=True), saes=(SAEConfig(),))
    assert "train.autocast_bf16 needs model.device = 'cuda'" in message
    sae = ReLUSAE(SAEConfig(hook="h", architecture="relu", width=8), D_IN)
    message = _one_line_error(Trainer, [sae], TrainConfig(autocast_bf16=True), None)
    assert "CUDA" in message and "turn it off" in message


# ----- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "value"),
    [
        ("train.lr_decay", "step"),
        ("train.resample_every_steps", "-1"),
        ("train.resample_until_frac", "0"),
        ("train.resample_until_frac", "1.5"),
        ("train.resample_dead_window_tokens", "0"),
        ("train.resample_sample_tokens", "0"),
        ("train.resample_weighting", "ce_increase"),
        ("train.resample_lr_warmup_steps", "-5"),
        ("train.distributed", "fsdp"),
        ("sae.b_dec_init", "median"),
        ("sae.k_aux", "0"),
    ],
)
def test_invalid_options_are_one_line_errors_naming_the_field(override, value):
    message = _one_line_error(load_run_config, None, {override: value})
    assert override in message


def test_options_parse_from_flags():
    cfg = load_run_config(
        None,
        {
            "sae.architecture": "relu",
            "sae.decoder_unit_norm": "true",
            "sae.apply_b_dec_to_input": "true",
            "sae.b_dec_init": "mean",
            "train.lr_decay": "cosine",
            "train.resample_every_steps": "25000",
            "train.resample_weighting": "loss",
        },
    )
    sae, train = cfg.saes[0], cfg.train
    assert sae.decoder_unit_norm is True and sae.apply_b_dec_to_input is True
    assert sae.b_dec_init == "mean" and train.lr_decay == "cosine"
    assert train.resample_every_steps == 25_000 and train.resample_weighting == "loss"
    assert train.resample_window_tokens == 25_000 * train.batch_size // 2


def test_every_weighting_has_an_exponent():
    assert set(LOSS_EXPONENTS) == set(RESAMPLE_WEIGHTINGS)
