"""BatchTopK SAE: the batch-wide top B·k against a dense reference (flatten + sort), the threshold's
moving average, inference that never depends on the batch, and a short real run."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.saes.batchtopk import BatchTopKSAE
from saelab.saes.registry import sae_folder_name
from saelab.training.trainer import Trainer
from synthetic import sparse_stream

D_IN, WIDTH, BATCH, K = 8, 48, 20, 4
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _sae(*, k: int = K, aux: float = 0.5, ema: float = 0.01, seed: int = 0) -> BatchTopKSAE:
    cfg = SAEConfig(
        architecture="batchtopk", width=WIDTH, k=k, aux_coefficient=aux, threshold_ema_lr=ema
    )
    sae = BatchTopKSAE(cfg, D_IN, seed=seed).double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name in PARAMS:
            p = getattr(sae, name)
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return sae


def _x(seed: int = 1, n: int = BATCH) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _batch_topk_by_sort(acts_BF: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Keep the n_keep largest entries of the whole matrix (found by sorting), zero the rest."""
    order = acts_BF.detach().reshape(-1).sort(descending=True).indices[:n_keep]
    keep = torch.zeros(acts_BF.numel(), dtype=torch.bool)
    keep[order] = True
    return acts_BF * keep.reshape(acts_BF.shape)


def _reference(sae: BatchTopKSAE, x: torch.Tensor, dead_F: torch.Tensor | None = None):
    """METHODS §4.1 and TopK's AuxK, densely."""
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n) for n in PARAMS)
    pre = (x - b_dec) @ W_enc + b_enc
    z = _batch_topk_by_sort(torch.relu(pre), sae.cfg.k * x.shape[0])
    recon = z @ W_dec + b_dec
    mse = (recon - x).pow(2).sum(-1).mean()
    loss, terms = mse, {"mse": mse}
    if dead_F is not None:
        e = (x - recon).detach()
        k_aux = min(sae.cfg.k_aux_for(D_IN), int(dead_F.sum()))
        masked = pre.masked_fill(~dead_F, float("-inf"))
        top = masked.detach().topk(k_aux, dim=-1).indices
        z_aux = torch.relu(pre) * torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, top, True)
        auxk = (e - z_aux @ W_dec).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
        terms["auxk"] = auxk
        loss = loss + sae.cfg.aux_coefficient * auxk
    return loss, terms, z, recon


def _grads(sae: BatchTopKSAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    loss.backward()
    return {n: getattr(sae, n).grad.clone() for n in PARAMS}


def test_training_keeps_exactly_the_batch_top_b_times_k():
    sae, x = _sae(), _x()
    out = sae.training_step(x)
    _, _, z, _ = _reference(sae, x)
    assert int(out.feats.l0_per_token().sum()) == BATCH * K
    per_token = out.feats.l0_per_token()
    assert per_token.min() < K < per_token.max(), "tokens share the budget unevenly"
    torch.testing.assert_close(out.feats.to_dense(), z.detach())
    assert torch.equal(out.feats.fired_counts(), (z > 0).sum(0))


def test_one_token_may_take_most_of_the_budget():
    """A token 20× larger than the others wins most of the B·k slots; the padded rows of the
    others must still decode exactly (no padding index collides with a kept one)."""
    sae, x = _sae(), _x()
    x[0] *= 20
    out = sae.training_step(x)
    _, _, z, recon = _reference(sae, x)
    assert out.feats.l0_per_token()[0] > BATCH * K // 4
    torch.testing.assert_close(out.feats.to_dense(), z.detach())
    torch.testing.assert_close(out.recon_BD, recon)


@pytest.mark.parametrize("n_dead", [0, 3, 30], ids=["no-dead", "few-dead", "many-dead"])
def test_loss_and_grads_match_dense_reference(n_dead):
    sae, x = _sae(), _x()
    perm = torch.randperm(WIDTH, generator=torch.Generator().manual_seed(3))
    dead_F = torch.zeros(WIDTH, dtype=torch.bool).index_fill_(0, perm[:n_dead], True)
    out = sae.training_step(x, dead_F=dead_F)
    ours = _grads(sae, out.loss)
    ref_loss, ref_terms, _, ref_recon = _reference(sae, x, dead_F if n_dead else None)
    theirs = _grads(sae, ref_loss)
    torch.testing.assert_close(out.loss, ref_loss)
    assert set(ref_terms) <= set(out.losses)
    for name, value in ref_terms.items():
        torch.testing.assert_close(out.losses[name], value.detach())
    torch.testing.assert_close(out.recon_BD, ref_recon)
    for name in PARAMS:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


def _smallest_kept(sae: BatchTopKSAE, x: torch.Tensor) -> float:
    _, _, z, _ = _reference(sae, x)
    return z[z > 0].min().item()


@pytest.mark.parametrize("rate", [0.01, 0.5])
def test_threshold_is_a_moving_average_of_the_smallest_kept_value(rate):
    sae, x = _sae(ema=rate), _x()
    sae.threshold.fill_(0.3)
    sae.threshold_updates.fill_(100_000)  # long past the bias correction
    smallest = _smallest_kept(sae, x)
    sae.training_step(x)
    assert sae.threshold.dtype == torch.float64
    assert sae.threshold.item() == pytest.approx((1 - rate) * 0.3 + rate * smallest, rel=1e-12)


@pytest.mark.parametrize("rate", [0.01, 0.5])
def test_threshold_average_is_bias_corrected_from_the_first_batch(rate):
    """θ_n = Σ_i r(1 − r)^(n−i) m_i / (1 − (1 − r)^n): a moving average started at 0 and
    divided by its weight, so the first batches are not pulled towards 0."""
    sae = _sae(ema=rate)
    assert sae.threshold.item() == 0.0 and int(sae.threshold_updates) == 0
    smallest = []
    for seed in (1, 2, 3):
        x = _x(seed)
        smallest.append(_smallest_kept(sae, x))
        sae.training_step(x)  # no optimiser step: the weights stay, only θ moves
        n = len(smallest)
        weights = [rate * (1 - rate) ** (n - 1 - i) for i in range(n)]
        expected = sum(w * m for w, m in zip(weights, smallest, strict=True)) / sum(weights)
        assert sae.threshold.item() == pytest.approx(expected, rel=1e-12)
    assert sae.threshold.item() != pytest.approx(smallest[0])  # it does average


def test_inference_is_a_jumprelu_that_ignores_the_rest_of_the_batch():
    sae, x = _sae(), _x()
    sae.threshold.fill_(0.4)
    sae.activation_scale.fill_(0.5)
    with torch.no_grad():
        pre = (x * 0.5 - sae.b_dec) @ sae.W_enc + sae.b_enc
        expected = torch.relu(pre) * (pre > 0.4)
        batch = sae.encode(x)
        torch.testing.assert_close(batch, expected)
        for i in (0, 7, BATCH - 1):
            alone = sae.encode(x[i : i + 1])
            assert torch.equal(alone[0] > 0, batch[i] > 0)
            torch.testing.assert_close(alone[0], batch[i], rtol=1e-12, atol=1e-12)
        # Train/eval mode changes nothing either: only training_step uses the batch top-k.
        sae.eval()
        torch.testing.assert_close(sae.encode(x), batch, rtol=0, atol=0)
    # Training on one batch and encoding another keeps the per-token L0 variable (not exactly k).
    assert len(set((batch > 0).sum(-1).tolist())) > 1


def test_threshold_survives_dtype_casts_checkpoints_and_folder_name():
    sae = _sae().float()
    assert sae.threshold.dtype == torch.float64 and sae.W_enc.dtype == torch.float32
    sae.threshold.fill_(0.123456789)
    fresh = _sae(seed=5).float()
    fresh.load_state_dict(sae.state_dict())  # what the trainer checkpoints and resumes
    assert fresh.threshold.item() == 0.123456789
    assert (
        sae_folder_name(SAEConfig(hook="h", architecture="batchtopk", k=16))
        == "h-batchtopk-x16-k16"
    )


def test_trains_with_the_real_trainer():
    sae = BatchTopKSAE(SAEConfig(hook="h", architecture="batchtopk", width=64, k=4), 16, seed=0)
    held_out = next(sparse_stream(16, seed=99))["h"]
    with torch.no_grad():
        before = sae.training_step(held_out).loss.item()
    sae.threshold.zero_()
    Trainer([sae], TrainConfig(tokens=30 * 64, batch_size=64, lr=1e-2), progress=False).fit(
        sparse_stream(16)
    )
    assert sae.threshold.item() > 0
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))
    with torch.no_grad():
        after = sae.training_step(held_out).loss.item()
    assert after < 0.5 * before
