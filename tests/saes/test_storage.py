"""Saved SAEs: save → load reproduces the SAE in model units, files follow the SAELens layout,
and every kind of bad folder is a one-line SaelabError (also through the real CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes import ReLUSAE, SparseAutoencoder, TopKSAE
from saelab.saes.registry import ARCHITECTURES, architecture_class
from saelab.saes.storage import (
    CFG_FILENAME,
    SPARSITY_FILENAME,
    WEIGHTS_FILENAME,
    load_log10_density,
    load_sae,
    save_sae,
)

D_IN, WIDTH = 12, 40
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _trained_looking(arch: str, scale: float = 0.37, seed: int = 0) -> SparseAutoencoder:
    """An SAE with random biases and decoder norms, as after training, and a non-unit scale."""
    cls = {"topk": TopKSAE, "relu": ReLUSAE}[arch]
    sae = cls(SAEConfig(architecture=arch, width=WIDTH, k=5, hook="blocks.1.hook_resid_post"), D_IN)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in PARAMS:
            p = getattr(sae, name)
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        sae.activation_scale.fill_(scale)
    return sae


def _x(n: int = 16) -> torch.Tensor:
    # Model-unit activations: larger than the normalised ones, with an offset.
    return 3.0 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(42)) + 1.0


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.fixture(params=["topk", "relu"])
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def test_save_writes_saelens_layout_and_no_temp_files(arch, tmp_path):
    sae = _trained_looking(arch)
    density = torch.linspace(-6, 0, WIDTH)
    save_sae(sae, tmp_path, log10_density=density, metadata={"model_name": "tiny"})

    assert _files(tmp_path) == {CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME}
    weights = load_file(tmp_path / WEIGHTS_FILENAME)
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (D_IN, WIDTH),
        "W_dec": (WIDTH, D_IN),
        "b_enc": (WIDTH,),
        "b_dec": (D_IN,),
    }
    assert all(v.dtype == torch.float32 for v in weights.values())
    torch.testing.assert_close(load_log10_density(tmp_path), density)

    cfg = json.loads((tmp_path / CFG_FILENAME).read_text())
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, WIDTH)
    assert cfg["architecture"] == sae.saelens_architecture
    assert cfg["apply_b_dec_to_input"] == sae.apply_b_dec_to_input
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "tiny"
    assert cfg["saelab"]["architecture"] == arch


def test_sparsity_file_is_optional(tmp_path):
    save_sae(_trained_looking("topk"), tmp_path)
    assert _files(tmp_path) == {CFG_FILENAME, WEIGHTS_FILENAME}
    assert load_log10_density(tmp_path) is None


def test_load_reproduces_the_sae_in_model_units(arch, tmp_path):
    sae = _trained_looking(arch, scale=0.37)
    x = _x()
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path, expected_d_in=D_IN)

    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert float(loaded.activation_scale) == 1.0  # the scale is folded into the weights
    assert loaded.apply_b_dec_to_input == sae.apply_b_dec_to_input
    with torch.no_grad():
        feats = sae.encode(x)
        assert (feats > 0).any()
        torch.testing.assert_close(loaded.encode(x), feats, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.decode(feats), sae.decode(feats), rtol=1e-5, atol=1e-5)


def test_save_load_is_bit_identical_without_a_scale(arch, tmp_path):
    sae = _trained_looking(arch, scale=1.0)
    x = _x()
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
        assert torch.equal(loaded(x), sae(x))
    for name in PARAMS:
        assert torch.equal(getattr(loaded, name), getattr(sae, name))


def test_resaving_a_loaded_sae_is_bit_identical(arch, tmp_path):
    """After the first save the scale is folded; save → load again changes no bit."""
    save_sae(_trained_looking(arch), tmp_path / "a")
    first = load_sae(tmp_path / "a")
    save_sae(first, tmp_path / "b")
    second = load_sae(tmp_path / "b")
    x = _x()
    with torch.no_grad():
        assert torch.equal(second.encode(x), first.encode(x))
        assert torch.equal(second(x), first(x))
    a, b = (
        load_file(tmp_path / "a" / WEIGHTS_FILENAME),
        load_file(tmp_path / "b" / WEIGHTS_FILENAME),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_failed_save_leaves_no_partial_files(tmp_path, monkeypatch):
    import safetensors.torch

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", explode)
    monkeypatch.setattr("saelab.atomic.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_sae(_trained_looking("topk"), tmp_path / "sae")
    assert _files(tmp_path / "sae") == set()


# ----- bad folders ------------------------------------------------------------------------------


def _saved(tmp_path: Path, arch: str = "topk") -> Path:
    return save_sae(_trained_looking(arch), tmp_path / "sae")


def _load_error(directory: Path, **kwargs) -> str:
    before = _files(directory) if directory.is_dir() else None
    with pytest.raises(SaelabError) as err:
        load_sae(directory, **kwargs)
    message = str(err.value)
    assert "\n" not in message and message.strip()
    if before is not None:
        assert _files(directory) == before, "a failed load must not write anything"
    return message


@pytest.mark.parametrize("keep", [0, 5, 0.5, -1], ids=["empty", "5-bytes", "half", "minus-1"])
def test_truncated_weights(tmp_path, keep):
    directory = _saved(tmp_path)
    path = directory / WEIGHTS_FILENAME
    size = path.stat().st_size
    os.truncate(path, {0.5: size // 2, -1: size - 1}.get(keep, keep))
    message = _load_error(directory)
    assert WEIGHTS_FILENAME in message


def test_missing_cfg(tmp_path):
    directory = _saved(tmp_path)
    (directory / CFG_FILENAME).unlink()
    assert CFG_FILENAME in _load_error(directory)
    assert CFG_FILENAME in _load_error(tmp_path / "does-not-exist")


def test_missing_weights(tmp_path):
    directory = _saved(tmp_path)
    (directory / WEIGHTS_FILENAME).unlink()
    assert WEIGHTS_FILENAME in _load_error(directory)


def test_invalid_json_cfg(tmp_path):
    directory = _saved(tmp_path)
    (directory / CFG_FILENAME).write_text('{"d_in": 12,\n "d_sae": ')
    assert "JSON" in _load_error(directory)


def test_cfg_without_integer_widths(tmp_path):
    directory = _saved(tmp_path)
    cfg = json.loads((directory / CFG_FILENAME).read_text())
    cfg["d_in"] = "12"
    (directory / CFG_FILENAME).write_text(json.dumps(cfg))
    assert "d_in" in _load_error(directory)


def test_d_in_mismatch_names_both_widths(tmp_path):
    message = _load_error(_saved(tmp_path), expected_d_in=D_IN + 4)
    assert str(D_IN) in message and str(D_IN + 4) in message


@pytest.mark.parametrize("name", PARAMS)
def test_wrong_tensor_shape(tmp_path, name):
    directory = _saved(tmp_path)
    tensors = load_file(directory / WEIGHTS_FILENAME)
    tensors[name] = torch.zeros(*[n + 1 for n in tensors[name].shape])
    save_file(tensors, directory / WEIGHTS_FILENAME)
    message = _load_error(directory)
    assert name in message and str(tuple(tensors[name].shape)) in message


def test_missing_tensor(tmp_path):
    directory = _saved(tmp_path)
    tensors = load_file(directory / WEIGHTS_FILENAME)
    del tensors["b_dec"]
    save_file(tensors, directory / WEIGHTS_FILENAME)
    assert "b_dec" in _load_error(directory)


def test_unknown_saelab_architecture_lists_choices(tmp_path):
    directory = _saved(tmp_path)
    cfg = json.loads((directory / CFG_FILENAME).read_text())
    cfg["saelab"]["architecture"] = "nope"
    (directory / CFG_FILENAME).write_text(json.dumps(cfg))
    message = _load_error(directory)
    assert "nope" in message and all(name in message for name in ARCHITECTURES)


def test_unsupported_saelens_architecture_lists_supported(tmp_path):
    directory = _saved(tmp_path)
    cfg = json.loads((directory / CFG_FILENAME).read_text())
    del cfg["saelab"]
    cfg["architecture"] = "matching_pursuit"  # a SAELens architecture saelab lacks
    (directory / CFG_FILENAME).write_text(json.dumps(cfg))
    message = _load_error(directory)
    assert "matching_pursuit" in message
    assert all(cls.saelens_architecture in message for cls in ARCHITECTURES.values())


def test_architecture_class_unknown_name_lists_choices():
    assert architecture_class("topk") is TopKSAE and architecture_class("relu") is ReLUSAE
    with pytest.raises(SaelabError) as err:
        architecture_class("nope")
    assert "\n" not in str(err.value)
    assert "nope" in str(err.value) and all(name in str(err.value) for name in ARCHITECTURES)


@pytest.mark.e2e  # the real `python -m saelab` process: a few seconds of imports
def test_cli_eval_on_truncated_folder_is_a_one_line_error(tmp_path):
    directory = _saved(tmp_path)
    path = directory / WEIGHTS_FILENAME
    os.truncate(path, path.stat().st_size // 2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "saelab", "eval", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip("\n").split("\n")
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("saelab: error:")
    assert "Traceback" not in proc.stderr and WEIGHTS_FILENAME in lines[0]
    assert _files(directory) == {CFG_FILENAME, WEIGHTS_FILENAME}  # no metrics.json written


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the result gets the mode open() would give."""
    import stat

    from saelab import atomic
    from saelab.config import SAEConfig as _Cfg
    from saelab.saes import TopKSAE as _TopK
    from saelab.saes.storage import save_sae as _save

    _save(_TopK(_Cfg(k=2), d_in=8), tmp_path / "sae")
    for name in ("cfg.json", "sae_weights.safetensors"):
        mode = stat.S_IMODE((tmp_path / "sae" / name).stat().st_mode)
        assert mode == 0o666 & ~atomic._UMASK, oct(mode)
