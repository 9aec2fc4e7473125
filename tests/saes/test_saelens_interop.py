"""Interop with the real SAELens (v6): saelab's folders load there and SAELens' load here, and
both libraries compute the same features and reconstructions."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from saelab.config import SAEConfig
from saelab.saes import ReLUSAE, SparseAutoencoder, TopKSAE
from saelab.saes.storage import CFG_FILENAME, load_sae, save_sae

D_IN, WIDTH, K = 16, 48, 6
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def sae_lens() -> ModuleType:
    """SAELens is an optional extra (``saelab[interop]``); importing it takes a few seconds."""
    return pytest.importorskip("sae_lens")


def _x(n: int = 32) -> torch.Tensor:
    return 2.0 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(7)) + 0.5


def _randomise_(module: torch.nn.Module, seed: int, dec_scale: float | None = None) -> None:
    """Random weights everywhere (biases too); decoder rows of random, non-unit norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            p = getattr(module, name)
            p.copy_(0.4 * torch.randn(p.shape, generator=g))
        if dec_scale is not None:
            norms = 0.2 + dec_scale * torch.rand(module.W_dec.shape[0], 1, generator=g)
            module.W_dec.mul_(norms / module.W_dec.norm(dim=-1, keepdim=True))


def _saelab_sae(arch: str) -> SparseAutoencoder:
    cls = {"topk": TopKSAE, "relu": ReLUSAE}[arch]
    sae = cls(SAEConfig(architecture=arch, width=WIDTH, k=K, hook="blocks.0.hook_resid_post"), D_IN)
    _randomise_(sae, seed=1)
    sae.activation_scale.fill_(0.37)  # exercises the folding on save
    return sae


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_saelab_folder_loads_in_saelens_with_identical_outputs(sae_lens, arch, tmp_path):
    ours = _saelab_sae(arch)
    save_sae(ours, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == ours.saelens_architecture
    assert theirs.cfg.d_in == D_IN and theirs.cfg.d_sae == WIDTH
    assert theirs.cfg.metadata.hook_name == "blocks.0.hook_resid_post"

    x = _x()
    with torch.no_grad():
        feats = ours.encode(x)
        assert (feats > 0).any()
        if arch == "topk":
            assert ((feats != 0).sum(-1) <= K).all()
        torch.testing.assert_close(theirs.encode(x), feats, **TOL)
        torch.testing.assert_close(theirs.decode(feats), ours.decode(feats), **TOL)
        torch.testing.assert_close(theirs(x), ours(x), **TOL)


def _saelens_standard(sae_lens: ModuleType, apply_b_dec: bool):
    cfg = sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=WIDTH, apply_b_dec_to_input=apply_b_dec)
    sae = sae_lens.StandardSAE(cfg)
    _randomise_(sae, seed=2, dec_scale=2.0)
    return sae


def _saelens_topk(sae_lens: ModuleType, apply_b_dec: bool, rescale: bool):
    cfg = sae_lens.TopKSAEConfig(
        d_in=D_IN,
        d_sae=WIDTH,
        k=K,
        apply_b_dec_to_input=apply_b_dec,
        rescale_acts_by_decoder_norm=rescale,
    )
    sae = sae_lens.TopKSAE(cfg)
    _randomise_(sae, seed=3, dec_scale=2.0)
    return sae


def _assert_same_outputs(theirs, ours: SparseAutoencoder) -> None:
    x = _x()
    with torch.no_grad():
        recon = theirs(x)
        torch.testing.assert_close(ours(x), recon, **TOL)
        assert (x - recon).norm() > 0  # not trivially equal
        feats = theirs.encode(x)
        torch.testing.assert_close(ours.encode(x), feats, **TOL)
        torch.testing.assert_close(ours.decode(feats), theirs.decode(feats), **TOL)


@pytest.mark.parametrize("apply_b_dec", [True, False], ids=["b_dec-in", "no-b_dec-in"])
def test_saelens_standard_sae_loads_in_saelab(sae_lens, apply_b_dec, tmp_path):
    theirs = _saelens_standard(sae_lens, apply_b_dec)
    theirs.save_model(tmp_path)
    ours = load_sae(tmp_path, expected_d_in=D_IN)
    assert isinstance(ours, ReLUSAE)
    assert ours.apply_b_dec_to_input is apply_b_dec
    _assert_same_outputs(theirs, ours)


@pytest.mark.parametrize("apply_b_dec", [True, False], ids=["b_dec-in", "no-b_dec-in"])
def test_saelens_topk_sae_loads_in_saelab(sae_lens, apply_b_dec, tmp_path):
    theirs = _saelens_topk(sae_lens, apply_b_dec, rescale=False)
    theirs.save_model(tmp_path)
    ours = load_sae(tmp_path)
    assert isinstance(ours, TopKSAE) and ours.cfg.k == K
    assert ours.apply_b_dec_to_input is apply_b_dec
    _assert_same_outputs(theirs, ours)


def test_saelens_topk_rescaled_by_decoder_norm_loads_in_saelab(sae_lens, tmp_path):
    theirs = _saelens_topk(sae_lens, apply_b_dec=True, rescale=True)
    norms = theirs.W_dec.detach().norm(dim=-1)
    assert (norms - 1).abs().max() > 0.5, "decoder norms must differ from 1 to test the fold"
    theirs.save_model(tmp_path)
    assert json.loads((Path(tmp_path) / CFG_FILENAME).read_text())["rescale_acts_by_decoder_norm"]

    ours = load_sae(tmp_path)
    _assert_same_outputs(theirs, ours)
    # The fold moves the decoder norms into the encoder, leaving unit decoder rows.
    torch.testing.assert_close(ours.W_dec.norm(dim=-1), torch.ones(WIDTH))
    x = _x()
    # Without the fold the TopK choice would differ: a plain load of the same weights disagrees.
    cfg = json.loads((Path(tmp_path) / CFG_FILENAME).read_text())
    cfg["rescale_acts_by_decoder_norm"] = False
    (Path(tmp_path) / CFG_FILENAME).write_text(json.dumps(cfg))
    unfolded = load_sae(tmp_path)
    with torch.no_grad():
        assert not torch.allclose(unfolded(x), theirs(x), **TOL)


def test_saelens_roundtrip_through_saelab(sae_lens, tmp_path):
    """SAELens → saelab → SAELens: the reconstruction survives both conversions."""
    theirs = _saelens_topk(sae_lens, apply_b_dec=True, rescale=True)
    theirs.save_model(tmp_path / "a")
    save_sae(load_sae(tmp_path / "a"), tmp_path / "b")
    back = sae_lens.SAE.load_from_disk(tmp_path / "b")
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), **TOL)
