"""Replacement sets: the manifest, loading (and its one-line errors), the interface against each
member's own prediction, and the expansion of a layered ``[[sae]]`` table."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from saelab.config import RunConfig, SAEConfig, load_run_config
from saelab.errors import SaelabError
from saelab.saes import (
    MANIFEST_FILENAME,
    TopKSkipTranscoder,
    TopKTranscoder,
    Transcoder,
    is_replacement_dir,
    load_replacement,
    save_sae,
    write_replacement_manifest,
)
from saelab.saes.registry import check_run_saes
from saelab.saes.replacement import (
    expand_layered_saes,
    fit_buffer,
    member_configs,
    topk_activation,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D = 16
IN, OUT = "blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"


def _transcoder(cls, layer: int, seed: int) -> Transcoder:
    cfg = SAEConfig(
        architecture=cls.architecture,
        hook=IN.format(layer=layer),
        output_hook=OUT.format(layer=layer),
        width=24,
        k=3,
    )
    tc = cls(cfg, D, d_out=D, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial biases, skip and scales: folding must get them right
        tc.b_enc.copy_(torch.randn(tc.d_sae, generator=g) * 0.1)
        tc.b_dec.copy_(torch.randn(D, generator=g))
        if tc.has_skip:
            tc.W_skip.copy_(torch.randn(D, D, generator=g) * 0.1)
        tc.activation_scale.fill_(1.7 + layer)
        tc.output_scale.fill_(0.6)
    return tc


def _save_set(folder, transcoders: dict[int, Transcoder], n_layers: int = 4):
    members = []
    for layer, tc in transcoders.items():
        name = f"member-{layer}"
        save_sae(tc, folder / name)
        members.append((layer, name))
    write_replacement_manifest(
        folder,
        kind="per_layer",
        model="tiny",
        n_layers=n_layers,
        layers=sorted(transcoders),
        input_hook=IN,
        output_hook=OUT,
        members=members,
    )
    return folder


@pytest.fixture
def saved_set(tmp_path):
    tcs = {0: _transcoder(TopKTranscoder, 0, 1), 2: _transcoder(TopKSkipTranscoder, 2, 2)}
    return _save_set(tmp_path / "set", tcs), tcs


def test_per_layer_interface_reproduces_each_members_own_prediction(saved_set):
    folder, tcs = saved_set
    assert is_replacement_dir(folder)
    rep = load_replacement(folder)
    assert (rep.kind, rep.layers, rep.n_layers, rep.model) == ("per_layer", [0, 2], 4, "tiny")
    assert (rep.input_hook(2), rep.output_hook(2)) == (IN.format(layer=2), OUT.format(layer=2))
    x = {layer: torch.randn(5, 7, D, generator=torch.Generator().manual_seed(9)) for layer in tcs}
    acts = {layer: rep.encode(layer, x[layer]) for layer in tcs}
    y = rep.reconstruct(acts, x)
    for layer, tc in tcs.items():
        with torch.no_grad():
            torch.testing.assert_close(y[layer], tc(x[layer]), rtol=1e-5, atol=1e-5)
        assert rep.d_sae(layer) == 24 and acts[layer].shape == (5, 7, 24)
        assert ((acts[layer] > 0).sum(-1) <= 3).all()
    assert rep.decoder(0, 2) is None and rep.decoder(0, 0).shape == (24, D)
    assert rep.skip(0) is None and rep.skip(2).shape == (D, D)
    # The pieces compose by hand: pre-activations, the nonlinearity, the decoder, the skip.
    W_enc, b_enc = rep.encoder(2)
    by_hand = (
        rep.activation(2, x[2] @ W_enc + b_enc) @ rep.decoder(2, 2)
        + rep.b_dec(2)
        + x[2] @ rep.skip(2).T
    )
    torch.testing.assert_close(by_hand, y[2])
    # float64 for finite differences: every tensor converts.
    rep.to(torch.float64)
    assert rep.encoder(0)[0].dtype == torch.float64 and rep.b_dec(2).dtype == torch.float64
    assert rep.encode(0, x[0].double()).dtype == torch.float64
    with pytest.raises(SaelabError, match="layer 1 is not covered"):
        rep.encoder(1)


def test_a_run_folder_holding_one_set_loads_as_that_set(saved_set, tmp_path):
    folder, _ = saved_set
    assert load_replacement(tmp_path).folder == folder
    shutil.copytree(folder, tmp_path / "other")
    with pytest.raises(SaelabError, match="several replacement sets"):
        load_replacement(tmp_path)


def test_topk_activation_keeps_the_k_largest_rectified():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-3.0, -2.0, -1.0, -4.0]])
    expect = torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(topk_activation(pre, 2), expect)


def _edit(folder, change):
    path = folder / MANIFEST_FILENAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


BAD_MANIFESTS = {
    "duplicate layers": (lambda m: m.update(layers=[0, 0, 2]), "lists layer 0 twice"),
    "two members, one layer": (
        lambda m: m["members"].append({"layer": 2, "folder": "member-0"}),
        "two members for layer 2",
    ),
    "missing layer": (lambda m: m["members"].pop(), "no member for layer 2"),
    "layer out of range": (lambda m: m.update(layers=[0, 7]), r"outside \[0, 4\)"),
    "wrong format": (lambda m: m.update(format="other"), "format 'other'"),
    "escaping folder": (lambda m: m["members"][0].update(folder="../x"), "inside the set"),
    "hook without layer": (lambda m: m.update(input_hook="blocks.0.x"), "with {layer}"),
    "wrong kind": (lambda m: m.update(kind="dense"), "kind 'dense'"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_bad_manifest_is_a_one_line_error(saved_set, case):
    folder, _ = saved_set
    change, message = BAD_MANIFESTS[case]
    _edit(folder, change)
    with pytest.raises(SaelabError, match=message) as err:
        load_replacement(folder)
    assert "\n" not in str(err.value)


def test_missing_garbled_and_incomplete_sets_are_one_line_errors(saved_set, tmp_path):
    folder, _ = saved_set
    with pytest.raises(SaelabError, match="no replacement set"):
        load_replacement(tmp_path / "set" / "member-0")
    shutil.rmtree(folder / "member-2")
    with pytest.raises(SaelabError, match="holds no saved SAE") as err:
        load_replacement(folder)
    assert "member-2" in str(err.value)
    (folder / MANIFEST_FILENAME).write_text("{not json")
    with pytest.raises(SaelabError, match="not valid JSON"):
        load_replacement(folder)


def test_a_member_at_the_wrong_hooks_is_refused(tmp_path):
    tcs = {0: _transcoder(TopKTranscoder, 1, 1)}  # saved as layer 0 but trained at layer 1
    folder = _save_set(tmp_path / "set", tcs)
    with pytest.raises(SaelabError, match="the member of layer 0 maps blocks.1"):
        load_replacement(folder)


# ----- layered [[sae]] tables ---------------------------------------------------------------


def test_layers_parse_from_flags_and_toml():
    assert SAEConfig(layers="all").layers == "all"
    assert SAEConfig(layers=[5, 0, 3]).layers == (0, 3, 5)
    cfg = load_run_config(overrides={"sae.layers": "0,3,5"})
    assert cfg.saes[0].layers == (0, 3, 5)
    for bad, message in (("0,0", "twice"), ("x", "layer numbers"), ([-1], "non-negative")):
        with pytest.raises(SaelabError, match=message):
            SAEConfig(layers=bad)


def test_expansion_substitutes_each_layer_into_the_hooks():
    cfg = RunConfig(saes=(SAEConfig(architecture="topk_transcoder", layers="all", k=4),))
    expanded = expand_layered_saes(cfg, 3)
    hooks = [(s.hook, s.output_hook) for s in expanded.saes]
    assert hooks == [(IN.format(layer=i), OUT.format(layer=i)) for i in range(3)]
    assert all(s.layers is None and s.name.startswith("replacement-") for s in expanded.saes)
    assert expanded.hooks == [h for pair in hooks for h in pair]
    # Configured hooks keep their kind, with each layer's number.
    given = SAEConfig(
        architecture="transcoder",
        hook="blocks.2.hook_resid_mid",
        output_hook="blocks.2.hook_mlp_out",
        layers=(1, 4),
    )
    assert [(c.hook, c.output_hook) for _, c in member_configs(given, 6)] == [
        ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"),
        ("blocks.4.hook_resid_mid", "blocks.4.hook_mlp_out"),
    ]


def test_layers_out_of_range_or_on_an_autoencoder_are_one_line_errors():
    with pytest.raises(SaelabError, match="has layer 7 but the model has 3 layers"):
        expand_layered_saes(
            RunConfig(saes=(SAEConfig(architecture="topk_transcoder", layers=(0, 7)),)), 3
        )
    with pytest.raises(SaelabError, match="only for transcoder architectures") as err:
        check_run_saes([SAEConfig(architecture="topk", layers="all")])
    assert "\n" not in str(err.value)


def test_the_buffer_of_many_hooks_is_lowered_to_fit_its_budget():
    cfg = RunConfig(saes=(SAEConfig(architecture="topk_transcoder", layers="all"),))
    expanded = expand_layered_saes(cfg, 30)
    widths = dict.fromkeys(expanded.hooks, 576)
    fitted, note = fit_buffer(expanded, widths)
    row = 60 * 576 * 4
    assert fitted.data.buffer_size == 2**30 // row < cfg.data.buffer_size
    assert "lowered" in note
    small, note = fit_buffer(expanded, dict.fromkeys(expanded.hooks, 8))
    assert small.data.buffer_size == cfg.data.buffer_size and note is None
