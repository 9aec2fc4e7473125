"""Cross-layer transcoders: the forward pass against the formula written out here, units,
save/load through a replacement set, the loss summed over output layers, the decoder's size."""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes import (
    JumpReLUCrossLayerTranscoder,
    TopKCrossLayerTranscoder,
    load_replacement,
    load_sae,
    save_sae,
    write_replacement_manifest,
)
from saelab.saes.base import DenseFeatureActs
from saelab.saes.replacement import decoder_floats, topk_activation

pytestmark = pytest.mark.usefixtures("one_thread")

D, N, F_LAYER, K = 12, 3, 8, 3
LAYERS = (1, 2, 4)
IN, OUT = "blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"


def _clt(cls, seed: int = 0):
    cfg = SAEConfig(
        architecture=cls.architecture,
        hook=IN.format(layer=LAYERS[0]),
        output_hook=OUT.format(layer=LAYERS[0]),
        layers=LAYERS,
        width=N * F_LAYER,
        k=K,
        l1_coefficient=0.5,
    )
    clt = cls(cfg, D, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        clt.b_enc.copy_(torch.randn(clt.d_sae, generator=g) * 0.1)
        clt.b_dec.copy_(torch.randn(N * D, generator=g))
        clt.input_scales.copy_(torch.tensor([0.5, 2.0, 1.3]))
        clt.output_scales.copy_(torch.tensor([3.0, 0.7, 1.1]))
        if hasattr(clt, "threshold"):
            clt.threshold.copy_(torch.rand(clt.d_sae, generator=g) * 0.3)
    return clt


def _by_formula(clt, x_BND: torch.Tensor) -> torch.Tensor:
    """ŷ_j = (b_dec,j + Σ_{i≤j} a_i W_dec,i→j) / s_out,j; a_i = act(s_in,i x_i W_enc,i + b_enc,i)"""
    out = []
    acts = []
    for i in range(N):
        cols = slice(i * F_LAYER, (i + 1) * F_LAYER)
        pre = clt.input_scales[i] * x_BND[:, i] @ clt.W_enc[:, cols] + clt.b_enc[cols]
        if hasattr(clt, "threshold"):
            acts.append(pre * (pre > clt.threshold[cols]))
        else:
            acts.append(topk_activation(pre, K))
    for j in range(N):
        y = clt.b_dec[j * D : (j + 1) * D].clone()
        for i in range(j + 1):
            y = y + acts[i] @ getattr(clt, f"W_dec_{i}")[:, j - i]
        out.append(y / clt.output_scales[j])
    return torch.stack(out, 1)


@pytest.mark.parametrize("cls", [TopKCrossLayerTranscoder, JumpReLUCrossLayerTranscoder])
def test_forward_matches_the_formula_and_survives_save_load(cls, tmp_path):
    clt = _clt(cls)
    x_BND = torch.randn(6, N, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expect = _by_formula(clt, x_BND)
        torch.testing.assert_close(clt(x_BND.flatten(1)).view(6, N, D), expect)
    folder = tmp_path / "set"
    save_sae(clt, folder / "clt")
    loaded = load_sae(folder / "clt")
    assert type(loaded) is cls and loaded.layers == list(LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_BND.flatten(1)).view(6, N, D), expect)
    write_replacement_manifest(
        folder,
        kind="cross_layer",
        model="tiny",
        n_layers=5,
        layers=LAYERS,
        input_hook=IN,
        output_hook=OUT,
        members=[(LAYERS[0], "clt")],
    )
    rep = load_replacement(folder)
    assert rep.kind == "cross_layer" and rep.layers == list(LAYERS)
    x = {layer: x_BND[:, i] for i, layer in enumerate(LAYERS)}
    y = rep.reconstruct({layer: rep.encode(layer, x[layer]) for layer in LAYERS}, x)
    for i, layer in enumerate(LAYERS):
        torch.testing.assert_close(y[layer], expect[:, i], rtol=1e-5, atol=1e-5)
    assert rep.decoder(4, 1) is None and rep.decoder(1, 4).shape == (F_LAYER, D)
    assert rep.d_sae(2) == F_LAYER and rep.skip(1) is None


def test_sparse_and_dense_decoding_agree_and_the_loss_sums_the_output_layers():
    clt = _clt(TopKCrossLayerTranscoder)
    x_BD = torch.randn(10, N * D, generator=torch.Generator().manual_seed(4))
    y_BD = torch.randn(10, N * D, generator=torch.Generator().manual_seed(5))
    feats = clt.encode_normalised(x_BD)
    assert (feats.l0_per_token() <= N * K).all() and feats.idx_BK.shape == (10, N * K)
    sparse = clt.decode_feats(feats)
    dense = clt.decode_feats(DenseFeatureActs(feats.to_dense()))
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    out = clt.training_step(x_BD, target_BD=y_BD)
    per_layer = [
        (out.recon_BD[:, j * D : (j + 1) * D] - y_BD[:, j * D : (j + 1) * D]).pow(2).sum(-1).mean()
        for j in range(N)
    ]
    torch.testing.assert_close(out.loss, sum(per_layer))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in clt.parameters() if p.grad is not None)
    # Each feature's whole decoder stays a unit vector.
    clt.before_optimizer_step_()
    with torch.no_grad():
        for W in clt.decoders():
            W.add_(W.grad)
    clt.after_optimizer_step_()
    for W in clt.decoders():
        torch.testing.assert_close(W.flatten(1).norm(dim=-1), torch.ones(F_LAYER))


def test_decoder_size_is_the_triangle_and_width_must_divide():
    clt = _clt(TopKCrossLayerTranscoder)
    assert clt.decoder_floats() == F_LAYER * D * N * (N + 1) // 2
    assert decoder_floats(N, F_LAYER, D, cross_layer=True) == clt.decoder_floats()
    assert decoder_floats(N, F_LAYER, D, cross_layer=False) == N * F_LAYER * D
    cfg = SAEConfig(
        architecture="topk_clt_transcoder",
        hook=IN.format(layer=0),
        output_hook=OUT.format(layer=0),
        layers=(0, 1, 2),
        width=10,
    )
    with pytest.raises(SaelabError, match="divisible by 3"):
        TopKCrossLayerTranscoder(cfg, D)
    with pytest.raises(SaelabError, match="width 36"):
        clt.encode(torch.randn(2, D))
