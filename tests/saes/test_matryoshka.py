"""Matryoshka BatchTopK SAE: the loss is the mean of the nested-prefix reconstruction losses
(against a naive dense reference), features are chosen as by BatchTopK, widths are validated."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig, TrainConfig, load_run_config
from saelab.errors import SaelabError
from saelab.saes.batchtopk import BatchTopKSAE
from saelab.saes.matryoshka import MatryoshkaSAE
from saelab.saes.registry import sae_folder_name
from saelab.training.trainer import Trainer
from synthetic import sparse_stream

D_IN, WIDTH, BATCH, K = 8, 48, 20, 4
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
WIDTHS = (6, 12, 30, 48)


def _sae(cls: type = MatryoshkaSAE, widths: tuple[int, ...] | None = WIDTHS) -> BatchTopKSAE:
    arch = cls.architecture
    cfg = SAEConfig(architecture=arch, width=WIDTH, k=K, aux_coefficient=0.5)
    if cls is MatryoshkaSAE:
        cfg = SAEConfig(
            architecture=arch, width=WIDTH, k=K, aux_coefficient=0.5, matryoshka_widths=widths
        )
    sae = cls(cfg, D_IN, seed=0).double()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name in PARAMS:
            p = getattr(sae, name)
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return sae


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(
        BATCH, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def _reference_loss(sae: MatryoshkaSAE, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean_j ‖x − (z[:, :m_j] W_dec[:m_j] + b_dec)‖², one dense product per prefix."""
    losses = [(x - (z[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum(-1).mean() for m in WIDTHS]
    return torch.stack(losses).mean()


def _grads(sae: BatchTopKSAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    loss.backward()
    return {n: getattr(sae, n).grad.clone() for n in PARAMS}


def test_loss_is_the_mean_of_prefix_losses():
    sae, x = _sae(), _x()
    out = sae.training_step(x)
    ours = _grads(sae, out.loss)
    # z as BatchTopK chooses it (checked against its own reference in test_batchtopk), with the
    # values recomputed here so that gradients flow through the reference.
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = torch.relu(pre) * (out.feats.to_dense() > 0)
    expected = _reference_loss(sae, x, z)
    theirs = _grads(sae, expected)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.losses["matryoshka_mse"], expected.detach())
    full = (x - (z @ sae.W_dec + sae.b_dec)).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["mse"], full.detach())
    torch.testing.assert_close(out.recon_BD, (z @ sae.W_dec + sae.b_dec).detach())
    assert not torch.isclose(out.loss, full)  # the inner prefixes count
    for name in PARAMS:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


def test_features_and_auxk_are_batchtopks():
    x = _x()
    dead_F = torch.zeros(WIDTH, dtype=torch.bool)
    dead_F[::3] = True
    mat, btk = _sae(), _sae(BatchTopKSAE)
    out_m, out_b = mat.training_step(x, dead_F=dead_F), btk.training_step(x, dead_F=dead_F)
    torch.testing.assert_close(out_m.feats.to_dense(), out_b.feats.to_dense())
    torch.testing.assert_close(out_m.losses["auxk"], out_b.losses["auxk"])
    torch.testing.assert_close(out_m.losses["mse"], out_b.losses["mse"])
    assert mat.threshold.item() == btk.threshold.item() > 0
    # A single prefix (the whole dictionary) is exactly BatchTopK.
    whole = _sae(widths=(WIDTH,))
    torch.testing.assert_close(whole.training_step(x).loss, btk.training_step(x).loss)


def test_default_widths_are_the_papers_fractions():
    cfg = SAEConfig(architecture="matryoshka")
    assert cfg.matryoshka_widths_for(9216) == (576, 1152, 2304, 4608, 9216)
    assert MatryoshkaSAE(cfg, 4).prefix_widths == (4, 8, 16, 32, 64)
    assert cfg.matryoshka_widths_for(20) == (1, 2, 5, 10, 20)


def test_widths_are_validated_with_one_line_errors(tmp_path):
    for bad in [(8, 4, 48), (0, 48), (), (4.5, 48)]:
        with pytest.raises(SaelabError, match="matryoshka_widths") as err:
            SAEConfig(architecture="matryoshka", matryoshka_widths=bad)
        assert "\n" not in str(err.value)
    with pytest.raises(SaelabError, match="sae.width=48"):
        SAEConfig(architecture="matryoshka", width=48, matryoshka_widths=(8, 40))
    # Known only once d_in is: expansion 16 of d_in 4 is 64 features.
    with pytest.raises(SaelabError, match="d_sae=64"):
        MatryoshkaSAE(SAEConfig(architecture="matryoshka", matryoshka_widths=(8, 48)), 4)


def test_widths_from_toml_and_flags_become_tuples(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text('[[sae]]\narchitecture = "matryoshka"\nmatryoshka_widths = [4, 16, 64]\n')
    assert load_run_config(run).saes[0].matryoshka_widths == (4, 16, 64)
    flags = load_run_config(overrides={"sae.matryoshka_widths": "8,32,64"})
    assert flags.saes[0].matryoshka_widths == (8, 32, 64)
    with pytest.raises(SaelabError, match="comma-separated"):
        load_run_config(overrides={"sae.matryoshka_widths": "8,x"})


def test_trains_with_the_real_trainer():
    cfg = SAEConfig(hook="h", architecture="matryoshka", width=64, k=4)
    sae = MatryoshkaSAE(cfg, 16, seed=0)
    held_out = next(sparse_stream(16, seed=99))["h"]
    with torch.no_grad():
        before = sae.training_step(held_out).losses["mse"].item()
    Trainer([sae], TrainConfig(tokens=30 * 64, batch_size=64, lr=1e-2), progress=False).fit(
        sparse_stream(16)
    )
    with torch.no_grad():
        after = sae.training_step(held_out).losses["mse"].item()
    assert after < 0.5 * before
    assert sae.threshold.item() > 0
    assert sae_folder_name(cfg) == "h-matryoshka-w64-k4"
