"""The real ``saelab convert`` command, run as a subprocess: saelab → sparsify/dictionary_learning
→ saelab gives the same reconstructions, and bad input is one stderr line with exit status 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saelab.config import SAEConfig
from saelab.saes import ReLUSAE, SparseAutoencoder, TopKSAE
from saelab.saes.storage import load_sae, save_sae
from saelab_cli import run_saelab

pytestmark = pytest.mark.e2e

D_IN, WIDTH, K = 16, 48, 6
HOOK = "blocks.1.hook_resid_post"


def saelab(*args: str | Path) -> subprocess.CompletedProcess:
    return run_saelab(*args, timeout=300)


def trained_looking(arch: str) -> SparseAutoencoder:
    """Random weights and biases everywhere, and a non-unit activation scale (folded on save)."""
    cls = {"topk": TopKSAE, "relu": ReLUSAE}[arch]
    sae = cls(SAEConfig(architecture=arch, width=WIDTH, k=K, hook=HOOK), D_IN, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    sae.activation_scale.fill_(0.4)
    return sae


@pytest.mark.parametrize(
    ("arch", "layout", "files"),
    [
        ("topk", "sparsify", {"cfg.json", "sae.safetensors"}),
        ("relu", "dictionary_learning", {"config.json", "ae.safetensors"}),
    ],
)
def test_convert_there_and_back_keeps_reconstructions(arch, layout, files, tmp_path):
    save_sae(trained_looking(arch), tmp_path / "src", metadata={"model_name": "tiny"})
    there = saelab("convert", tmp_path / "src", tmp_path / layout, "--to", layout)
    assert there.returncode == 0, there.stderr
    assert f"(saelens) to {tmp_path / layout} ({layout})" in there.stdout
    assert {p.name for p in (tmp_path / layout).iterdir()} == files
    back = saelab("convert", tmp_path / layout, tmp_path / "back", "--to", "saelens")
    assert back.returncode == 0, back.stderr
    assert f"({layout}) to" in back.stdout

    source, again = load_sae(tmp_path / "src"), load_sae(tmp_path / "back")
    x = 3.0 * torch.randn(32, D_IN, generator=torch.Generator().manual_seed(1)) + 1.0
    with torch.no_grad():
        assert torch.equal(again(x), source(x))
        assert torch.equal(again.encode(x), source.encode(x))
    assert (again.architecture, again.cfg.hook, again.metadata["model_name"]) == (
        arch,
        HOOK,
        "tiny",
    )


def _pickle_only(folder: Path) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    (folder / "ae.pt").write_bytes(b"\x80\x02}q\x00.")  # never opened


def _shape_mismatch(folder: Path) -> None:
    save_sae(trained_looking("topk"), folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_in": D_IN + 1}))


def _corrupt(folder: Path) -> None:
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "k": K, "num_latents": WIDTH}))
    save_file({"b_dec": torch.zeros(D_IN)}, folder / "sae.safetensors")
    data = (folder / "sae.safetensors").read_bytes()
    (folder / "sae.safetensors").write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    "unknown layout": (lambda folder: folder.mkdir(), "sparsify", "no SAE found in"),
    "pickle only": (_pickle_only, "saelens", "is a pickle, which saelab never loads"),
    "shape mismatch": (_shape_mismatch, "sparsify", "has shape"),
    "corrupt weights": (_corrupt, "saelens", "corrupt or truncated"),
    "relu to sparsify": (
        lambda folder: save_sae(trained_looking("relu"), folder),
        "sparsify",
        "only TopK",
    ),
}


def _check_refused(tmp_path: Path, returncode: int, stderr: str, message: str) -> None:
    assert returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saelab: error: "), stderr
    assert message in lines[0]
    assert not (tmp_path / "dst").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no staging folder left


@pytest.mark.parametrize("case", ["unknown layout", "pickle only"])
def test_bad_input_is_one_line_and_exit_status_2(case, tmp_path):
    make, to, message = BAD_INPUTS[case]
    make(tmp_path / "src")
    done = saelab("convert", tmp_path / "src", tmp_path / "dst", "--to", to)
    _check_refused(tmp_path, done.returncode, done.stderr, message)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_every_bad_input_through_the_cli_entry_point(case, tmp_path, capsys):
    """The same contract for every case, in-process (a subprocess each would cost seconds)."""
    from saelab.cli import main

    make, to, message = BAD_INPUTS[case]
    make(tmp_path / "src")
    returncode = main(["-q", "convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", to])
    _check_refused(tmp_path, returncode, capsys.readouterr().err, message)
