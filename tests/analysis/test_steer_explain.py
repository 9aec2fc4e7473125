"""``saelab steer --explain-with``: a steering vector in an SAE's feature basis
(:mod:`saelab.analysis.steering.explain`), checked against SAEs with hand-set weights."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.analysis.steering.explain import (
    dense_parts,
    explain_vector,
    feature_densities,
    format_explanation,
)
from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes import ReLUSAE
from saelab.saes.storage import save_sae

D_IN = 8


def signed_basis_sae(scale: float = 1.0) -> tuple[ReLUSAE, torch.Tensor]:
    """A ReLU SAE whose 16 decoder rows are ±q_j of an orthonormal basis Q (rows j and j+8),
    encoder = decoderᵀ, no biases: ``encode(c·q_j) = c`` at feature j, 0 elsewhere (c > 0)."""
    sae = ReLUSAE(SAEConfig(hook="h", architecture="relu", expansion=2), D_IN, seed=0)
    q_DD = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(1)))[0]
    rows_FD = torch.cat([q_DD.T, -q_DD.T])
    with torch.no_grad():
        sae.W_dec.copy_(rows_FD * scale)  # training units: model units × activation scale
        sae.W_enc.copy_(rows_FD.T / scale)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.activation_scale.fill_(scale)
    return sae, q_DD.T


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_a_decoder_row_along_the_vector_explains_it_exactly(scale):
    sae, q_FD = signed_basis_sae(scale)
    vector = 3.0 * q_FD[5]
    density = torch.full((16,), 0.001)
    out = explain_vector(vector, sae, density, top=3)
    top = out["encode"]["features"][0]
    assert top["feature"] == 5
    assert top["coef"] == pytest.approx(3.0, rel=1e-5)
    assert top["share"] == pytest.approx(1.0, rel=1e-5)
    assert out["encode"]["active"] == 1
    assert out["encode"]["recon_rel_error"] < 1e-5
    assert out["norm"] == pytest.approx(3.0, rel=1e-6)
    # The minimum-norm least squares splits the vector evenly between +q_5 and −q_5.
    lstsq = {row["feature"]: row["coef"] for row in out["lstsq"]["features"][:2]}
    assert lstsq == {5: pytest.approx(1.5, abs=1e-5), 13: pytest.approx(-1.5, abs=1e-5)}


def test_least_squares_reconstructs_any_vector_on_a_wide_decoder():
    sae = ReLUSAE(SAEConfig(hook="h", architecture="relu", expansion=4), D_IN, seed=3)
    vector = torch.randn(D_IN, generator=torch.Generator().manual_seed(7))
    out = explain_vector(vector, sae, torch.zeros(sae.d_sae), top=sae.d_sae)
    assert out["lstsq"]["recon_rel_error"] < 1e-6
    assert out["lstsq"]["explained_share"] == pytest.approx(1.0, abs=1e-6)
    # The top list with every feature holds every feature's share: they add up to the whole.
    total = sum(row["share"] for row in out["lstsq"]["features"])
    assert total == pytest.approx(1.0, abs=1e-6)


def test_dense_shares_count_only_features_strictly_above_each_threshold():
    sae, q_FD = signed_basis_sae()
    vector = 2.0 * q_FD[1] + 1.0 * q_FD[2]  # shares 4/5 and 1/5 of ‖v‖²
    density = torch.full((16,), 0.001, dtype=torch.float64)
    density[1] = 0.2  # dense
    density[2] = 0.05  # frequent, not dense
    shares = explain_vector(vector, sae, density)["encode"]["dense_share"]
    assert shares["0.1"] == pytest.approx(0.8, rel=1e-5)
    assert shares["0.01"] == pytest.approx(1.0, rel=1e-5)
    density[1] = 0.1  # exactly at the threshold: not above it
    shares = explain_vector(vector, sae, density)["encode"]["dense_share"]
    assert shares["0.1"] == pytest.approx(0.0, abs=1e-7)
    coef = torch.zeros(16, dtype=torch.float64)
    coef[1], coef[2] = 2.0, 1.0
    removed = vector.double() - dense_parts(coef, q_FD.repeat(2, 1), density, 0.01)
    assert removed.abs().max() < 1e-6


def test_densities_come_from_the_stored_log10_density(tmp_path):
    sae, _ = signed_basis_sae()
    density = torch.linspace(0, 0.5, 16, dtype=torch.float64)
    save_sae(sae, tmp_path / "sae", log10_density=torch.log10(density + 1e-10))
    got, source = feature_densities(sae, tmp_path / "sae")
    assert source == "sparsity"
    assert torch.allclose(got, density, atol=1e-6)
    with pytest.raises(SaelabError, match="pass the model"):
        feature_densities(sae, tmp_path / "nowhere")


def test_width_mismatch_is_one_line_and_table_names_every_top_feature():
    sae, q_FD = signed_basis_sae()
    with pytest.raises(SaelabError, match="width 5"):
        explain_vector(torch.ones(5), sae, torch.zeros(16))
    out = explain_vector(q_FD[0], sae, torch.zeros(16), top=2)
    text = format_explanation({"sae": "S", "density_source": "sparsity", **out})
    assert "encode:" in text and "lstsq:" in text and text.count("\n") == 2 + 2 * 3


@pytest.mark.integration
@pytest.mark.usefixtures("one_thread")
def test_steer_explain_with_writes_the_explanation(tmp_path, tiny_model_dir, words_file, capsys):
    """``saelab steer --explain-with``: an SAE without stored densities gets them measured on
    the neutral text, and the least-squares decomposition rebuilds the vector."""
    from steering_fixtures import HOOK, tiny_sae

    from saelab.cli import main

    save_sae(tiny_sae(), tmp_path / "sae")
    argv = [
        "-q", "steer", "--model", tiny_model_dir, "--neutral", words_file, "--neutral-tokens",
        "64", "--method", "actadd", "--positive", "w5 w6", "--negative", "w7 w8", "--hook", HOOK,
        "--coefs", "0", "--explain-with", tmp_path / "sae", "--explain-top", "3",
        "--out", tmp_path / "out",
    ]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    explanation = json.loads((tmp_path / "out" / "steer.json").read_text())["explain"]
    assert explanation["density_source"] == "measured"
    assert len(explanation["encode"]["features"]) == 3
    assert explanation["lstsq"]["recon_rel_error"] < 1e-4
    assert "lstsq:" in capsys.readouterr().out
