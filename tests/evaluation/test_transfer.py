"""Layer transfer: an SAE evaluated at other layers of the same hook type, on a tiny Llama."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.evaluation.evaluate import evaluate_sae
from saelab.evaluation.transfer import (
    PLOTTED_KEYS,
    TRANSFER_KEYS,
    format_transfer_table,
    parse_layers,
    sae_at_layer,
    transfer_matrix,
    transfer_saes,
)
from saelab.models.hookpoints import hook_at_layer
from saelab.saes import TopKSAE
from saelab.saes.storage import save_sae
from saelab_cli import run_saelab
from tiny_models import N_LAYERS, build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

HOOK = "blocks.1.hook_resid_post"
EVAL = {"tokens": 256, "context": 32, "check_reference": False}


def tiny_sae(hook: str = HOOK) -> TopKSAE:
    return TopKSAE(SAEConfig(hook=hook, k=8, expansion=2), d_in=64, seed=0)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_model_dir, words_file) -> Path:
    meta = {"model_name": str(tiny_model_dir), "dataset_path": str(words_file), "context_size": 32}
    return save_sae(tiny_sae(), tmp_path_factory.mktemp("sae") / "sae", metadata=meta)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("2-10", list(range(2, 11))),
        ("2,4,6", [2, 4, 6]),
        ("3", [3]),
        ("0-2, 5", [0, 1, 2, 5]),
        ("4,2,2", [2, 4]),
        ("0", [0]),
    ],
)
def test_parse_layers_matches_a_naive_expansion(spec, expected):
    naive = set()
    for item in spec.split(","):
        lo, _, hi = item.strip().partition("-")
        naive.update(range(int(lo), int(hi or lo) + 1))
    assert parse_layers(spec) == sorted(naive) == expected


@pytest.mark.parametrize("spec", ["", "a", "2-", "3-1", "1..3", "-1", "2;4"])
def test_parse_layers_rejects_bad_specs_in_one_line(spec):
    with pytest.raises(SaelabError) as err:
        parse_layers(spec)
    assert "\n" not in str(err.value)


def test_moved_sae_shares_weights_and_keeps_the_original_hook():
    sae = tiny_sae()
    moved = sae_at_layer(sae, 2)
    assert moved.cfg.hook == "blocks.2.hook_resid_post" == hook_at_layer(HOOK, 2)
    assert sae.cfg.hook == HOOK
    assert moved.W_enc is sae.W_enc and moved.W_dec is sae.W_dec
    assert moved.cfg.k == sae.cfg.k


def test_hooks_without_a_layer_index_are_rejected_in_one_line():
    model = build_tiny_model("llama")
    sae = tiny_sae(hook="model.embed_tokens")
    with pytest.raises(SaelabError, match="no layer index") as err:
        transfer_matrix([sae], model, build_tiny_tokenizer(), [0], progress=False)
    assert "\n" not in str(err.value)


def test_layers_outside_the_model_name_the_valid_range():
    model = build_tiny_model("llama")
    with pytest.raises(SaelabError, match=f"0-{N_LAYERS - 1}") as err:
        transfer_matrix([tiny_sae()], model, build_tiny_tokenizer(), [1, 7], progress=False)
    assert "\n" not in str(err.value) and "7" in str(err.value)


def test_diagonal_equals_evaluate_sae_and_other_layers_differ(words_file):
    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    sae = tiny_sae()
    layers = list(range(N_LAYERS))
    result = transfer_matrix(
        [sae],
        model,
        tokenizer,
        layers,
        dataset=str(words_file),
        progress=False,
        tokens=256,
        context=32,
    )
    own, _ = evaluate_sae(sae, model, tokenizer, dataset=str(words_file), progress=False, **EVAL)
    cells = result["saes"][0]["cells"]
    assert [cell["layer"] for cell in cells] == layers
    assert {k: cells[1][k] for k in TRANSFER_KEYS} == {k: own[k] for k in TRANSFER_KEYS}
    for other in (cells[0], cells[2]):
        assert other["fvu"] != own["fvu"]
        assert other["ce_loss_recovered"] != own["ce_loss_recovered"]
    # Each off-diagonal cell is exactly the SAE evaluated with its hook moved there.
    moved, _ = evaluate_sae(
        sae_at_layer(sae, 2), model, tokenizer, dataset=str(words_file), progress=False, **EVAL
    )
    assert cells[2]["fvu"] == moved["fvu"]
    assert sae.cfg.hook == HOOK


def test_transfer_saes_writes_json_and_non_blank_heatmaps(sae_dir, tmp_path):
    out = tmp_path / "transfer"
    result = transfer_saes([sae_dir, sae_dir], "0-2", out=out, progress=False, tokens=256)
    saved = json.loads((out / "transfer.json").read_text())
    assert saved == result
    assert saved["layers"] == [0, 1, 2]
    assert saved["metrics"] == list(TRANSFER_KEYS)
    assert len(saved["saes"]) == 2
    for row in saved["saes"]:
        assert row["hook"] == HOOK and row["layer"] == 1
        assert [cell["layer"] for cell in row["cells"]] == [0, 1, 2]
        for cell in row["cells"]:
            assert set(cell) == {"layer", *TRANSFER_KEYS}
            assert all(isinstance(cell[k], float) for k in TRANSFER_KEYS)
    # The same SAE twice gives identical rows: every cell is deterministic.
    assert saved["saes"][0]["cells"] == saved["saes"][1]["cells"]
    for metric in PLOTTED_KEYS:
        with Image.open(out / f"transfer_{metric}.png") as png:
            width, height = png.size
            pixels = torch.from_numpy(np.asarray(png.convert("L"), dtype=np.float32))
        assert width > 200 and height > 150
        assert pixels.std() > 0
        table = format_transfer_table(result, metric)
        assert len(table.splitlines()) == 3 and table.count("*") == 2
    assert not list(out.glob(".*.tmp"))


def saelab(*args: str | Path) -> subprocess.CompletedProcess:
    return run_saelab(*args, env={"OMP_NUM_THREADS": "1"}, timeout=120)


@pytest.mark.e2e
def test_cli_transfer_runs_and_bad_layers_are_one_line(
    sae_dir, tiny_model_dir, words_file, tmp_path
):
    common = ("--model", tiny_model_dir, "--out", tmp_path)
    done = saelab("transfer", sae_dir, "--layers", "0,2", *common, "--tokens", 128)
    assert done.returncode == 0, done.stderr
    assert "fvu" in done.stdout and "ce_loss_recovered" in done.stdout
    assert (tmp_path / "transfer.json").is_file()
    bad = saelab("transfer", sae_dir, "--layers", "0-9", *common)
    assert bad.returncode == 2
    error = bad.stderr.strip().splitlines()[-1]
    assert error.startswith("saelab: error:") and "0-2" in error
