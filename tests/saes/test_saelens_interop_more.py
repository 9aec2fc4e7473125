"""Gated, JumpReLU, BatchTopK and Matryoshka files with the real SAELens (v6): saelab's folders
load there and SAELens' load here with identical features and reconstructions; save → load in
saelab reproduces each SAE with a non-unit activation scale; bad extra tensors are one-line
errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes import BatchTopKSAE, GatedSAE, JumpReLUSAE, MatryoshkaSAE, SparseAutoencoder
from saelab.saes.storage import CFG_FILENAME, WEIGHTS_FILENAME, load_sae, save_sae

D_IN, WIDTH, K = 16, 48, 6
TOL = {"rtol": 1e-5, "atol": 1e-5}
HOOK = "blocks.0.hook_resid_post"

# id → (class, config fields, SAELens architecture of the saved folder)
CASES = {
    "gated-paper": (GatedSAE, {"gated_penalty": "paper"}, "gated"),
    "gated-april": (GatedSAE, {"gated_penalty": "april"}, "gated"),
    "jumprelu": (JumpReLUSAE, {}, "jumprelu"),
    "batchtopk": (BatchTopKSAE, {"k": K}, "jumprelu"),
    "matryoshka": (MatryoshkaSAE, {"k": K, "matryoshka_widths": (12, 24, WIDTH)}, "jumprelu"),
}


@pytest.fixture(scope="module")
def sae_lens() -> ModuleType:
    """SAELens is an optional extra (``saelab[interop]``); importing it takes a few seconds."""
    return pytest.importorskip("sae_lens")


def _x(n: int = 32) -> torch.Tensor:
    return 2.0 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(7)) + 0.5


def _randomise_(module: torch.nn.Module, names: list[str], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            p = getattr(module, name)
            p.copy_(0.4 * torch.randn(p.shape, generator=g))


def _saelab_sae(case: str, scale: float = 0.37) -> SparseAutoencoder:
    """A trained-looking SAE: every tensor random, thresholds that split the features."""
    cls, fields, _ = CASES[case]
    cfg = SAEConfig(architecture=cls.architecture, width=WIDTH, hook=HOOK, **fields)
    sae = cls(cfg, D_IN, seed=0)
    _randomise_(sae, [n for n, _ in sae.named_parameters()], seed=1)
    with torch.no_grad():
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(0.05 + torch.rand(WIDTH))
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(0.3)
        sae.activation_scale.fill_(scale)  # exercises the folding on save
    return sae


def _assert_same(theirs, ours: SparseAutoencoder) -> None:
    x = _x()
    with torch.no_grad():
        feats = ours.encode(x)
        assert (feats > 0).any() and (feats == 0).any()
        torch.testing.assert_close(theirs.encode(x), feats, **TOL)
        torch.testing.assert_close(theirs.decode(feats), ours.decode(feats), **TOL)
        recon = theirs(x)
        assert (x - recon).norm() > 0
        torch.testing.assert_close(ours(x), recon, **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_saelab_folder_loads_in_saelens_with_identical_outputs(sae_lens, case, tmp_path):
    ours = _saelab_sae(case)
    save_sae(ours, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == CASES[case][2]
    assert (theirs.cfg.d_in, theirs.cfg.d_sae) == (D_IN, WIDTH)
    assert theirs.cfg.apply_b_dec_to_input == ours.apply_b_dec_to_input
    _assert_same(theirs, ours)


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_reproduces_the_sae(case, tmp_path):
    sae = _saelab_sae(case)
    save_sae(sae, tmp_path / "a")
    loaded = load_sae(tmp_path / "a", expected_d_in=D_IN)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert float(loaded.activation_scale) == 1.0
    assert loaded.apply_b_dec_to_input == sae.apply_b_dec_to_input
    x = _x()
    with torch.no_grad():
        feats = sae.encode(x)
        assert (feats > 0).any() and (feats == 0).any()
        torch.testing.assert_close(loaded.encode(x), feats, **TOL)
        torch.testing.assert_close(loaded(x), sae(x), **TOL)
    if isinstance(sae, BatchTopKSAE):
        assert loaded.threshold.item() == pytest.approx(0.3)
    # Saving the loaded SAE again gives bit-identical tensors (JumpReLU's θ included).
    save_sae(loaded, tmp_path / "b")
    first, second = (load_file(tmp_path / d / WEIGHTS_FILENAME) for d in ("a", "b"))
    assert set(first) == set(second) == set(type(sae).saved_tensor_shapes(D_IN, WIDTH))
    for name in first:
        assert torch.equal(second[name], first[name]), name


def test_saved_batchtopk_threshold_is_theta_for_every_feature(tmp_path):
    sae = _saelab_sae("batchtopk")
    save_sae(sae, tmp_path)
    assert torch.equal(
        load_file(tmp_path / WEIGHTS_FILENAME)["threshold"], torch.full((WIDTH,), 0.3)
    )
    cfg = json.loads((tmp_path / CFG_FILENAME).read_text())
    assert (cfg["architecture"], cfg["saelab"]["architecture"]) == ("jumprelu", "batchtopk")


@pytest.mark.parametrize("apply_b_dec", [True, False], ids=["b_dec-in", "no-b_dec-in"])
def test_saelens_gated_sae_loads_in_saelab(sae_lens, apply_b_dec, tmp_path):
    cfg = sae_lens.GatedSAEConfig(d_in=D_IN, d_sae=WIDTH, apply_b_dec_to_input=apply_b_dec)
    theirs = sae_lens.GatedSAE(cfg)
    _randomise_(theirs, ["W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"], seed=2)
    theirs.save_model(tmp_path)
    ours = load_sae(tmp_path, expected_d_in=D_IN)
    assert isinstance(ours, GatedSAE) and ours.apply_b_dec_to_input is apply_b_dec
    _assert_same(theirs, ours)


@pytest.mark.parametrize("apply_b_dec", [True, False], ids=["b_dec-in", "no-b_dec-in"])
def test_saelens_jumprelu_sae_loads_in_saelab(sae_lens, apply_b_dec, tmp_path):
    cfg = sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=WIDTH, apply_b_dec_to_input=apply_b_dec)
    theirs = sae_lens.JumpReLUSAE(cfg)
    _randomise_(theirs, ["W_enc", "b_enc", "W_dec", "b_dec"], seed=3)
    with torch.no_grad():
        # Positive thresholds, and a few zero or negative ones (SAELens' ReLU makes them 0).
        theirs.threshold.copy_(torch.rand(WIDTH, generator=torch.Generator().manual_seed(4)))
        theirs.threshold[:3] = torch.tensor([0.0, -0.5, -2.0])
    theirs.save_model(tmp_path)
    ours = load_sae(tmp_path)
    assert isinstance(ours, JumpReLUSAE) and ours.apply_b_dec_to_input is apply_b_dec
    _assert_same(theirs, ours)


def test_saelens_batchtopk_inference_save_loads_as_jumprelu(sae_lens, tmp_path):
    """SAELens writes a trained BatchTopK SAE as a JumpReLU one; saelab reads it as such."""
    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=WIDTH, k=K)
    trained = sae_lens.BatchTopKTrainingSAE(cfg)
    _randomise_(trained, ["W_enc", "b_enc", "W_dec", "b_dec"], seed=5)
    trained.topk_threshold = torch.tensor(0.25, dtype=torch.float64)
    trained.save_inference_model(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    ours = load_sae(tmp_path)
    assert isinstance(ours, JumpReLUSAE)
    _assert_same(theirs, ours)


def _saved(tmp_path: Path, case: str) -> Path:
    return save_sae(_saelab_sae(case), tmp_path / "sae")


def _load_error(directory: Path) -> str:
    with pytest.raises(SaelabError) as err:
        load_sae(directory)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("case", "name"),
    [("jumprelu", "threshold"), ("batchtopk", "threshold"), ("gated-paper", "r_mag")],
)
def test_wrong_or_missing_extra_tensor_is_a_one_line_error(tmp_path, case, name):
    directory = _saved(tmp_path, case)
    tensors = load_file(directory / WEIGHTS_FILENAME)
    tensors[name] = torch.zeros(WIDTH + 1)
    save_file(tensors, directory / WEIGHTS_FILENAME)
    message = _load_error(directory)
    assert name in message and f"({WIDTH + 1},)" in message and f"({WIDTH},)" in message
    del tensors[name]
    save_file(tensors, directory / WEIGHTS_FILENAME)
    assert name in _load_error(directory)


def test_batchtopk_file_with_per_feature_thresholds_is_refused(tmp_path):
    directory = _saved(tmp_path, "batchtopk")
    tensors = load_file(directory / WEIGHTS_FILENAME)
    tensors["threshold"] = torch.linspace(0.1, 0.5, WIDTH)
    save_file(tensors, directory / WEIGHTS_FILENAME)
    assert "jumprelu" in _load_error(directory)
    # The same file without saelab's section is a plain SAELens JumpReLU SAE and loads as one.
    cfg = json.loads((directory / CFG_FILENAME).read_text())
    del cfg["saelab"]
    (directory / CFG_FILENAME).write_text(json.dumps(cfg))
    assert isinstance(load_sae(directory), JumpReLUSAE)
