"""Other tools' SAE layouts: SAEs read from hand-made sparsify and dictionary_learning files run
exactly those tools' forward passes (naive references written here from their definitions),
saelab SAEs written in those layouts run the same forward under the references, saelab → X →
saelab keeps reconstructions and names, and every bad folder is a one-line SaelabError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.models.hookpoints import resolve_hook
from saelab.saes import SparseAutoencoder
from saelab.saes.formats import (
    DL_CLASSES,
    FORMATS,
    convert_sae,
    detect_format,
    read_sae,
    write_sae,
)
from saelab.saes.formats.sparsify import _hook_for_module
from saelab.saes.registry import ARCHITECTURES, architecture_class
from saelab.saes.storage import load_sae, save_sae

D_IN, WIDTH, K = 8, 24, 4
SPARSIFY_CONFIG_FIELDS = {
    "activation",
    "expansion_factor",
    "normalize_decoder",
    "num_latents",
    "k",
    "multi_topk",
    "skip_connection",
    "transcode",
}
"""sparsify's ``SparseCoderConfig`` fields (eai-sparsify 1.3)."""
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _x(n: int = 64) -> Tensor:
    return 2.0 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(11)) + 0.7


def _randn(*shape: int, g: torch.Generator, scale: float = 0.5) -> Tensor:
    return scale * torch.randn(*shape, generator=g)


# ----- naive references of the other tools' forward passes -------------------------------------


def sparsify_forward(st: dict[str, Tensor], cfg: dict, x: Tensor) -> tuple[Tensor, Tensor]:
    """sparsify's SparseCoder: ReLU pre-activations (of x − b_dec unless transcoding), the k
    largest kept, decoded with W_dec, plus x W_skipᵀ with a skip connection."""
    sae_in = x if cfg.get("transcode") else x - st["b_dec"]
    post = torch.relu(sae_in @ st["encoder.weight"].T + st["encoder.bias"])
    vals, idx = post.topk(cfg["k"], dim=-1)
    z = torch.zeros_like(post).scatter(-1, idx, vals)
    out = z @ st["W_dec"] + st["b_dec"]
    if "W_skip" in st:
        out = out + x @ st["W_skip"].T
    return out, z


def dl_forward(dict_class: str, st: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """dictionary_learning's ``forward`` of each class (default arguments), from its source."""
    if dict_class == "AutoEncoder":
        f = torch.relu((x - st["bias"]) @ st["encoder.weight"].T + st["encoder.bias"])
        return f @ st["decoder.weight"].T + st["bias"], f
    if dict_class == "AutoEncoderNew":
        f = torch.relu(x @ st["encoder.weight"].T + st["encoder.bias"])
        return f @ st["decoder.weight"].T + st["decoder.bias"], f
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        post = torch.relu((x - st["b_dec"]) @ st["encoder.weight"].T + st["encoder.bias"])
        if dict_class == "AutoEncoderTopK":  # encode(use_threshold=False)
            vals, idx = post.topk(int(st["k"]), dim=-1)
            f = torch.zeros_like(post).scatter(-1, idx, vals)
        else:  # encode(use_threshold=True)
            f = post * (post > st["threshold"])
        return f @ st["decoder.weight"].T + st["b_dec"], f
    if dict_class == "MatryoshkaBatchTopKSAE":
        post = torch.relu((x - st["b_dec"]) @ st["W_enc"] + st["b_enc"])
        f = post * (post > st["threshold"])
        return f @ st["W_dec"] + st["b_dec"], f
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ st["W_enc"] + st["b_enc"]
        f = torch.relu(pre * (pre > st["threshold"]))
        return f @ st["W_dec"] + st["b_dec"], f
    assert dict_class == "GatedAutoEncoder"
    x_enc = (x - st["decoder_bias"]) @ st["encoder.weight"].T
    gate = (x_enc + st["gate_bias"] > 0).float()
    f = gate * torch.relu(st["r_mag"].exp() * x_enc + st["mag_bias"])
    return f @ st["decoder.weight"].T + st["decoder_bias"], f


# ----- hand-made foreign files -------------------------------------------------------------------


def sparsify_files(
    folder: Path, *, transcode: bool = False, skip: bool = False, seed: int = 0
) -> tuple[dict[str, Tensor], dict]:
    """A sparsify hook folder as ``SparseCoder.save_to_disk`` writes it."""
    g = torch.Generator().manual_seed(seed)
    st = {
        "encoder.weight": _randn(WIDTH, D_IN, g=g),
        # Negative biases: many tokens have fewer than k positive pre-activations.
        "encoder.bias": _randn(WIDTH, g=g) - 3.0,
        "W_dec": _randn(WIDTH, D_IN, g=g),
        "b_dec": _randn(D_IN, g=g),
    }
    if skip:
        st["W_skip"] = _randn(D_IN, D_IN, g=g, scale=0.2)
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": WIDTH,
        "k": K,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": D_IN,
    }
    folder.mkdir(parents=True)
    save_file(st, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return st, cfg


def dl_state(dict_class: str, seed: int = 0) -> dict[str, Tensor]:
    """A random state dict with the names, shapes and buffers of ``dict_class``."""
    g = torch.Generator().manual_seed(seed)
    linear = {
        "encoder.weight": _randn(WIDTH, D_IN, g=g),
        "encoder.bias": _randn(WIDTH, g=g) - 0.5,
        "decoder.weight": _randn(D_IN, WIDTH, g=g),
    }
    params = {
        "W_enc": _randn(D_IN, WIDTH, g=g),
        "b_enc": _randn(WIDTH, g=g) - 0.5,
        "W_dec": _randn(WIDTH, D_IN, g=g),
        "b_dec": _randn(D_IN, g=g),
    }
    topk_buffers = {"k": torch.tensor(K, dtype=torch.int32), "threshold": torch.tensor(0.3)}
    if dict_class == "AutoEncoder":
        return {**linear, "bias": _randn(D_IN, g=g)}
    if dict_class == "AutoEncoderNew":
        return {**linear, "decoder.bias": _randn(D_IN, g=g)}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {**linear, "b_dec": _randn(D_IN, g=g), **topk_buffers}
    if dict_class == "MatryoshkaBatchTopKSAE":
        return {**params, **topk_buffers, "group_sizes": torch.tensor([4, 8, 12])}
    if dict_class == "JumpReluAutoEncoder":
        # Some thresholds below zero: dictionary_learning's ReLU makes them act as zero.
        return {**params, "threshold": _randn(WIDTH, g=g, scale=0.3)}
    assert dict_class == "GatedAutoEncoder"
    return {
        "encoder.weight": linear["encoder.weight"],
        "gate_bias": _randn(WIDTH, g=g) - 0.3,
        "r_mag": _randn(WIDTH, g=g, scale=0.2),
        "mag_bias": _randn(WIDTH, g=g),
        "decoder.weight": linear["decoder.weight"],
        "decoder_bias": _randn(D_IN, g=g),
    }


def dl_files(folder: Path, cls: str, **trainer) -> dict[str, Tensor]:
    """A dictionary_learning save folder of class ``cls``, its state dict as safetensors;
    ``trainer`` overrides fields of the config's trainer section."""
    st = dl_state(cls)
    config = {
        "trainer": {
            "trainer_class": DL_CLASSES[cls].trainer_class,
            "dict_class": cls,
            "activation_dim": D_IN,
            "dict_size": WIDTH,
            "layer": 3,
            "lm_name": "EleutherAI/pythia-70m-deduped",
            "submodule_name": "resid_post_layer_3",
            **({"k": K} if "k" in st else {}),
            **trainer,
        },
        "buffer": {"d_submodule": D_IN, "io": "out", "ctx_len": 128},
    }
    folder.mkdir(parents=True)
    save_file(st, folder / "ae.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return st


# ----- saelab SAEs with random weights ------------------------------------------------------------


def saelab_sae(arch: str, *, apply_b_dec: bool | None = None, seed: int = 1) -> SparseAutoencoder:
    """An SAE of ``arch`` with random weights everywhere and a non-unit activation scale."""
    cls = architecture_class(arch)
    fields = {"architecture": arch, "width": WIDTH, "k": K, "hook": "blocks.2.hook_resid_post"}
    kwargs = {}
    if arch.endswith("transcoder"):
        fields["output_hook"] = "blocks.2.hook_mlp_out"
        kwargs["d_out"] = D_IN
    if arch == "matryoshka":
        fields["matryoshka_widths"] = (6, 12, WIDTH)
    sae = cls(SAEConfig(**fields), D_IN, apply_b_dec_to_input=apply_b_dec, **kwargs)
    g = torch.Generator().manual_seed(seed)
    tensors = {name: t.clone() for name, t in sae.folded_state_dict().items()}
    for t in tensors.values():
        t.copy_(_randn(*t.shape, g=g))
    if "b_enc" in tensors:
        tensors["b_enc"] -= 0.3
    if "threshold" in tensors:  # saelab's thresholds are ≥ 0; batchtopk shares one
        shared = arch in ("batchtopk", "matryoshka")
        tensors["threshold"] = torch.full((WIDTH,), 0.2) if shared else tensors["threshold"].abs()
    if "r_mag" in tensors:
        tensors["r_mag"] *= 0.3
    sae.load_folded_state_dict_(tensors)
    sae.activation_scale.fill_(0.5)  # exercises the folding on export
    sae.metadata = {"model_name": "tiny-model", "context_size": 64}
    return sae


# ----- sparsify ----------------------------------------------------------------------------------


def test_sparsify_topk_reads_as_sparsify_runs_it(tmp_path):
    st, cfg = sparsify_files(tmp_path / "layers.2")
    loaded = read_sae(tmp_path / "layers.2")
    sae, x = loaded.sae, _x()
    assert loaded.format == "sparsify" and sae.architecture == "topk"
    assert sae.cfg.hook == "blocks.2.hook_resid_post"
    want_out, want_z = sparsify_forward(st, cfg, x)
    assert ((want_z > 0).sum(-1) < K).any(), "the data must exercise fewer than k positives"
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), want_z, **TOL)
        torch.testing.assert_close(sae(x), want_out, **TOL)


def test_sparsify_width_from_expansion_factor(tmp_path):
    st, cfg = sparsify_files(tmp_path / "layers.0")
    cfg = {**cfg, "num_latents": 0, "expansion_factor": WIDTH // D_IN}
    (tmp_path / "layers.0" / "cfg.json").write_text(json.dumps(cfg))
    sae, x = read_sae(tmp_path / "layers.0").sae, _x()
    assert sae.d_sae == WIDTH
    with torch.no_grad():
        torch.testing.assert_close(sae(x), sparsify_forward(st, cfg, x)[0], **TOL)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelab_topk_written_for_sparsify_runs_the_same(apply_b_dec, tmp_path):
    sae, x = saelab_sae("topk", apply_b_dec=apply_b_dec), _x()
    notes = write_sae(sae, tmp_path / "out", "sparsify")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"cfg.json", "sae.safetensors"}
    st = load_file(tmp_path / "out" / "sae.safetensors")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert set(st) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"]) == (D_IN, WIDTH, K)
    # Only SparseCoderConfig's fields (sparsify warns about others); saelab's rides in the header.
    assert set(cfg) <= {*SPARSIFY_CONFIG_FIELDS, "d_in", "d_out"}
    with safe_open(str(tmp_path / "out" / "sae.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["saelab"])["hook"] == sae.cfg.hook
    assert any("folded b_dec" in n for n in notes) == (not apply_b_dec)
    with torch.no_grad():
        torch.testing.assert_close(sparsify_forward(st, cfg, x)[0], sae(x), **TOL)
        torch.testing.assert_close(sparsify_forward(st, cfg, x)[1], sae.encode(x), **TOL)


@pytest.mark.parametrize(
    ("transcode", "skip", "arch"),
    [
        (True, False, "topk_transcoder"),
        (True, True, "topk_skip_transcoder"),
        (False, True, "topk_skip_transcoder"),  # an SAE with a skip connection
    ],
)
def test_sparsify_transcoders_and_skip_connections(transcode, skip, arch, tmp_path):
    st, cfg = sparsify_files(tmp_path / "layers.1.mlp", transcode=transcode, skip=skip)
    hooks = {"hook": "blocks.1.ln2.hook_normalized", "output_hook": "blocks.1.hook_mlp_out"}
    sae = read_sae(tmp_path / "layers.1.mlp", **(hooks if transcode else {})).sae
    x = _x()
    assert sae.architecture == arch
    if transcode:
        assert (sae.cfg.hook, sae.cfg.output_hook) == tuple(hooks.values())
    with torch.no_grad():
        torch.testing.assert_close(sae(x), sparsify_forward(st, cfg, x)[0], **TOL)
    # And back: sparsify's forward of the written files is saelab's.
    write_sae(sae, tmp_path / "back", "sparsify")
    st2 = load_file(tmp_path / "back" / "sae.safetensors")
    cfg2 = json.loads((tmp_path / "back" / "cfg.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(sparsify_forward(st2, cfg2, x)[0], sae(x), **TOL)


def test_sparsify_transcoder_without_hook_names_keeps_the_module_path(tmp_path):
    sparsify_files(tmp_path / "layers.1.mlp", transcode=True)
    loaded = read_sae(tmp_path / "layers.1.mlp")
    assert loaded.sae.cfg.hook == loaded.sae.cfg.output_hook == "layers.1.mlp"
    assert any("--hook and --output-hook" in note for note in loaded.notes)


def test_sparsify_checkpoint_with_one_hook_folder_reads_it(tmp_path):
    sparsify_files(tmp_path / "ckpt" / "h.1")
    loaded = read_sae(tmp_path / "ckpt")
    assert loaded.format == "sparsify" and loaded.sae.cfg.hook == "blocks.1.hook_resid_post"


def test_sparsify_checkpoint_with_several_hooks_asks_for_one(tmp_path):
    sparsify_files(tmp_path / "ckpt" / "layers.1")
    sparsify_files(tmp_path / "ckpt" / "layers.2")
    with pytest.raises(SaelabError, match=r"2 hooks \(layers.1, layers.2\)") as err:
        read_sae(tmp_path / "ckpt")
    assert "\n" not in str(err.value)


def test_module_paths_map_only_to_hooks_they_carry(tiny_model):
    """Invariant on every family: a module path that maps to a hook name resolves back to that
    very module (output side), in base-model and full form."""
    from tiny_models import N_LAYERS

    modules = dict(tiny_model.named_modules())
    prefixes = [p for p in modules if p.endswith(f".{N_LAYERS - 1}") and "." in p]
    block = min(prefixes, key=len)  # e.g. model.layers.2 / transformer.h.2
    mapped = 0
    for full in (p for p in modules if p == block or p.startswith(f"{block}.")):
        for path in (full, full.partition(".")[2]):
            hook = _hook_for_module(path, "output")
            if hook is None:
                continue
            point = resolve_hook(tiny_model, hook)
            assert (point.module_path, point.where) == (full, "output"), (path, hook)
            mapped += 1
    assert _hook_for_module(block.partition(".")[2], "output") is not None
    assert mapped >= 2


@pytest.mark.parametrize(
    ("path", "where", "hook"),
    [
        ("layers.6", "output", "blocks.6.hook_resid_post"),
        ("h.3.mlp", "output", "blocks.3.hook_mlp_out"),
        ("model.layers.2", "output", "blocks.2.hook_resid_post"),
        ("layers.6", "input", "blocks.6.hook_resid_pre"),
        # Gemma2's hook_mlp_out is its post-norm, not the MLP: ambiguous, kept raw.
        ("layers.6.mlp", "output", None),
        ("encoder.block.1", "output", None),
    ],
)
def test_module_path_to_hook_name(path, where, hook):
    assert _hook_for_module(path, where) == hook


# ----- dictionary_learning -----------------------------------------------------------------------


@pytest.mark.parametrize("dict_class", list(DL_CLASSES))
def test_dictionary_learning_reads_as_it_runs(dict_class, tmp_path):
    st = dl_files(tmp_path / "ae", dict_class)
    loaded = read_sae(tmp_path / "ae")
    sae, x = loaded.sae, _x()
    assert loaded.format == "dictionary_learning"
    assert sae.architecture == DL_CLASSES[dict_class].architecture
    assert sae.cfg.hook == "blocks.3.hook_resid_post"
    assert sae.metadata["model_name"] == "EleutherAI/pythia-70m-deduped"
    want_out, want_f = dl_forward(dict_class, st, x)
    assert (want_f > 0).any() and (want_f == 0).any()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), want_f, **TOL)
        torch.testing.assert_close(sae(x), want_out, **TOL)
    if dict_class == "AutoEncoderTopK":
        assert any("threshold" in note for note in loaded.notes)


def test_dictionary_learning_batchtopk_threshold_never_learnt_keeps_every_positive(tmp_path):
    st = dl_files(tmp_path / "ae", "BatchTopKSAE")
    st["threshold"] = torch.tensor(-1.0)
    save_file(st, tmp_path / "ae" / "ae.safetensors")
    loaded = read_sae(tmp_path / "ae")
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(loaded.sae(x), dl_forward("BatchTopKSAE", st, x)[0], **TOL)
    assert any("never learnt" in note for note in loaded.notes)


WRITABLE = [
    ("relu", False, "AutoEncoderNew"),
    ("relu", True, "AutoEncoder"),
    ("topk", True, "AutoEncoderTopK"),
    ("topk", False, "AutoEncoderTopK"),
    ("batchtopk", True, "BatchTopKSAE"),
    ("matryoshka", True, "MatryoshkaBatchTopKSAE"),
    ("jumprelu", False, "JumpReluAutoEncoder"),
    ("jumprelu", True, "JumpReluAutoEncoder"),
    ("gated", True, "GatedAutoEncoder"),
]


@pytest.mark.parametrize(("arch", "apply_b_dec", "dict_class"), WRITABLE)
def test_saelab_written_for_dictionary_learning_runs_the_same(
    arch, apply_b_dec, dict_class, tmp_path
):
    sae, x = saelab_sae(arch, apply_b_dec=apply_b_dec), _x()
    write_sae(sae, tmp_path / "out", "dictionary_learning")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"config.json", "ae.safetensors"}
    st = load_file(tmp_path / "out" / "ae.safetensors")
    trainer = json.loads((tmp_path / "out" / "config.json").read_text())["trainer"]
    assert trainer["dict_class"] == dict_class
    assert (trainer["activation_dim"], trainer["dict_size"]) == (D_IN, WIDTH)
    assert (trainer["layer"], trainer["submodule_name"]) == (2, "resid_post_layer_2")
    assert trainer["lm_name"] == "tiny-model"
    want_out, want_f = dl_forward(dict_class, st, x)
    with torch.no_grad():
        torch.testing.assert_close(want_f, sae.encode(x), **TOL)
        torch.testing.assert_close(want_out, sae(x), **TOL)


# ----- round trips -------------------------------------------------------------------------------

ROUND_TRIPS = [
    ("topk", True, "sparsify", True),
    ("topk", False, "sparsify", False),  # b_dec folded into the encoder bias
    ("topk_skip_transcoder", None, "sparsify", True),
    ("relu", False, "dictionary_learning", True),
    ("relu", True, "dictionary_learning", True),
    ("topk", True, "dictionary_learning", True),
    ("gated", True, "dictionary_learning", True),
    ("batchtopk", True, "dictionary_learning", True),
    ("jumprelu", False, "dictionary_learning", True),
    ("matryoshka", True, "saelens", True),
]


@pytest.mark.parametrize(("arch", "apply_b_dec", "fmt", "exact"), ROUND_TRIPS)
def test_round_trip_keeps_reconstructions_and_names(arch, apply_b_dec, fmt, exact, tmp_path):
    sae, x = saelab_sae(arch, apply_b_dec=apply_b_dec), _x()
    save_sae(sae, tmp_path / "src", metadata=sae.metadata)
    source = load_sae(tmp_path / "src")
    there = convert_sae(tmp_path / "src", tmp_path / fmt, to=fmt)
    assert there.source_format == "saelens" and detect_format(tmp_path / fmt) == fmt
    back = convert_sae(tmp_path / fmt, tmp_path / "back", to="saelens")
    assert back.source_format == fmt and not [n for n in back.notes if "hook" in n]
    again = load_sae(tmp_path / "back")
    assert again.architecture == arch
    assert (again.cfg.hook, again.cfg.output_hook) == (sae.cfg.hook, sae.cfg.output_hook)
    assert again.metadata["model_name"] == "tiny-model"
    assert again.metadata["hook_name"] == sae.cfg.hook
    assert again.cfg.k == sae.cfg.k and again.d_sae == WIDTH
    with torch.no_grad():
        if exact:
            assert torch.equal(again(x), source(x))
        else:
            torch.testing.assert_close(again(x), source(x), **TOL)


def test_hook_given_by_the_user_replaces_the_recorded_one(tmp_path):
    dl_files(tmp_path / "ae", "AutoEncoder", submodule_name=None, layer=1)
    bare = read_sae(tmp_path / "ae")
    assert bare.sae.cfg.hook == "" and any("--hook" in note for note in bare.notes)
    done = convert_sae(
        tmp_path / "ae", tmp_path / "out", to="saelens", hook="blocks.1.hook_mlp_out"
    )
    assert not [n for n in done.notes if "hook" in n]
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["metadata"]["hook_name"] == (
        "blocks.1.hook_mlp_out"
    )
    renamed = convert_sae(tmp_path / "out", tmp_path / "out2", to="saelens", hook="blocks.0.x")
    assert renamed.sae.cfg.hook == "blocks.0.x"
    assert load_sae(tmp_path / "out2").cfg.hook == "blocks.0.x"


def test_formats_registry_names_every_layout():
    assert list(FORMATS) == ["saelens", "sparsify", "dictionary_learning"]
    assert all(name == fmt.name for name, fmt in FORMATS.items())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_registered_layout_round_trips_every_architecture_it_accepts(fmt, tmp_path):
    """Whatever a layout writes, it alone is detected in, and reads back to the same SAE; what it
    refuses is a one-line error that leaves nothing behind. saelab's own layout takes them all."""
    x, accepted = _x(), []
    for arch in ARCHITECTURES:
        sae, out = saelab_sae(arch), tmp_path / arch
        try:
            write_sae(sae, out, fmt)
        except SaelabError as exc:
            assert "\n" not in str(exc) and not out.exists(), arch
            continue
        accepted.append(arch)
        assert [name for name, other in FORMATS.items() if other.holds(out)] == [fmt], arch
        assert detect_format(out) == fmt
        loaded = read_sae(out)
        assert (loaded.format, loaded.sae.architecture) == (fmt, arch)
        assert (loaded.sae.cfg.hook, loaded.sae.cfg.output_hook) == (
            sae.cfg.hook,
            sae.cfg.output_hook,
        )
        assert (loaded.sae.d_in, loaded.sae.d_sae, loaded.sae.d_out) == (
            sae.d_in,
            sae.d_sae,
            sae.d_out,
        )
        with torch.no_grad():
            torch.testing.assert_close(loaded.sae(x), sae(x), **TOL)
    assert "topk" in accepted  # every layout stores TopK SAEs
    if fmt == "saelens":
        assert accepted == list(ARCHITECTURES)


# ----- bad input ---------------------------------------------------------------------------------


def _one_line_error(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(SaelabError, match=match) as err:
        call(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_unknown_layout_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    _one_line_error("no SAE found", read_sae, tmp_path / "empty")
    _one_line_error("does not exist", read_sae, tmp_path / "nope")
    _one_line_error("unknown SAE layout 'onnx'", read_sae, tmp_path / "empty", "onnx")
    _one_line_error("is a file", read_sae, tmp_path / "empty" / "notes.txt")
    sparsify_files(tmp_path / "s")
    _one_line_error("only for transcoders", read_sae, tmp_path / "s", output_hook="blocks.1.x")


def test_several_layouts_in_one_folder_ask_for_from(tmp_path):
    dl_files(tmp_path / "both", "AutoEncoder")
    save_file({"x": torch.zeros(1)}, tmp_path / "both" / "sae.safetensors")
    _one_line_error("several layouts .*--from", read_sae, tmp_path / "both")


def test_missing_config_files(tmp_path):
    sparsify_files(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").unlink()
    _one_line_error("cfg.json is missing", read_sae, tmp_path / "s")
    dl_files(tmp_path / "d", "AutoEncoder")
    (tmp_path / "d" / "config.json").unlink()
    _one_line_error("config.json is missing", read_sae, tmp_path / "d")
    sparsify_files(tmp_path / "w")
    (tmp_path / "w" / "sae.safetensors").unlink()
    _one_line_error("sae.safetensors is missing", read_sae, tmp_path / "w", "sparsify")
    dl_files(tmp_path / "v", "AutoEncoder")
    (tmp_path / "v" / "ae.safetensors").unlink()
    _one_line_error("ae.safetensors is missing", read_sae, tmp_path / "v", "dictionary_learning")


def test_pickle_only_dictionary_learning_explains_a_conversion_that_works(tmp_path):
    st = dl_files(tmp_path / "d", "AutoEncoderTopK")
    (tmp_path / "d" / "ae.safetensors").unlink()
    torch.save(st, tmp_path / "d" / "ae.pt")  # what dictionary_learning writes
    message = _one_line_error("pickle, which saelab never loads", read_sae, tmp_path / "d")
    assert "weights_only=True" in message
    # The advice, run as given (here: the user's own unpickling, not saelab's).
    exec(message.split('python -c "')[1].rsplit('" and run again')[0])
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(
            read_sae(tmp_path / "d").sae(x), dl_forward("AutoEncoderTopK", st, x)[0], **TOL
        )


def test_shape_mismatch_names_both_shapes(tmp_path):
    sparsify_files(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "num_latents": WIDTH + 1}))
    _one_line_error(
        rf"shape \({WIDTH}, {D_IN}\) .* implies \({WIDTH + 1}, {D_IN}\)", read_sae, tmp_path / "s"
    )


def test_corrupt_files(tmp_path):
    sparsify_files(tmp_path / "s")
    weights = tmp_path / "s" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    _one_line_error("corrupt or truncated", read_sae, tmp_path / "s")
    dl_files(tmp_path / "d", "AutoEncoder")
    (tmp_path / "d" / "config.json").write_text("{not json")
    _one_line_error("not valid JSON", read_sae, tmp_path / "d")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"activation": "groupmax"}, "'groupmax' activation, not supported yet"),
        ({"d_in": "eight"}, "positive integer 'd_in'"),
        ({"embed_skip": True}, "sets 'embed_skip'"),
    ],
)
def test_sparsify_options_saelab_cannot_run(edit, match, tmp_path):
    sparsify_files(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, **edit}))
    _one_line_error(match, read_sae, tmp_path / "s")


def test_unknown_or_unexpected_tensors_are_refused(tmp_path):
    st, _ = sparsify_files(tmp_path / "s")
    save_file({**st, "W_skip": torch.zeros(D_IN, D_IN)}, tmp_path / "s" / "sae.safetensors")
    _one_line_error("W_skip but .* no skip_connection", read_sae, tmp_path / "s")
    save_file({**st, "post_enc": torch.zeros(WIDTH)}, tmp_path / "s" / "sae.safetensors")
    _one_line_error("does not know .*post_enc", read_sae, tmp_path / "s")
    st = dl_files(tmp_path / "d", "AutoEncoder")
    del st["bias"]
    save_file(st, tmp_path / "d" / "ae.safetensors")
    _one_line_error("no tensor 'bias'", read_sae, tmp_path / "d")


def test_dictionary_learning_config_mistakes(tmp_path):
    dl_files(tmp_path / "d", "AutoEncoderTopK", k=K + 1)
    _one_line_error(f"says k={K + 1} but .* holds k={K}", read_sae, tmp_path / "d")
    dl_files(tmp_path / "c", "AutoEncoder", dict_class="CrossCoder")
    _one_line_error("dict_class 'CrossCoder', not supported yet", read_sae, tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({"buffer": {}}))
    _one_line_error("no 'trainer' section", read_sae, tmp_path / "c")


def test_architecture_missing_from_the_registry_is_not_supported_yet(monkeypatch, tmp_path):
    dl_files(tmp_path / "d", "JumpReluAutoEncoder")
    monkeypatch.delitem(ARCHITECTURES, "jumprelu")
    _one_line_error("'jumprelu' architecture, not supported yet", read_sae, tmp_path / "d")


def test_layouts_that_cannot_hold_an_architecture_refuse_and_write_nothing(tmp_path):
    _one_line_error(
        "sparsify stores only TopK", write_sae, saelab_sae("relu"), tmp_path / "a", "sparsify"
    )
    _one_line_error(
        "dictionary_learning has no class",
        write_sae,
        saelab_sae("topk_transcoder"),
        tmp_path / "b",
        "dictionary_learning",
    )
    assert list(tmp_path.iterdir()) == []  # no destination, no staging folder left behind


def test_existing_destination_is_never_overwritten(tmp_path):
    sae = saelab_sae("topk")
    (tmp_path / "made").mkdir()
    write_sae(sae, tmp_path / "made", "sparsify")  # an empty folder is fine
    before = (tmp_path / "made" / "sae.safetensors").read_bytes()
    _one_line_error(
        "already exists and is not empty", write_sae, sae, tmp_path / "made", "sparsify"
    )
    assert (tmp_path / "made" / "sae.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made"]


def test_formats_doc_table_names_every_layout_and_class():
    doc = (Path(__file__).parents[2] / "docs" / "formats.md").read_text()
    section = doc[doc.index("## Bring and take SAEs") :]
    for name in [*FORMATS, *DL_CLASSES]:
        assert f"`{name}`" in section, name
