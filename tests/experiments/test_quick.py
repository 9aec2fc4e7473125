"""Every founding-notes experiment (``experiments/``) in its ``--quick`` mode: tiny random
models or synthetic data, seconds each. Each script asserts its by-construction invariants
itself (an ``AssertionError`` fails the test); here the files it must leave are checked, and a
few invariants again from ``result.json``. Never a verdict: tiny sizes say nothing about a
claim."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
NAMES = (
    "gamma_from_sums",
    "resample_warmup",
    "mean_centring",
    "dense_features",
    "keep_topk_per_prompt",
    "layer_transfer",
    "ce_sanity",
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def run_quick(name: str, out: Path) -> dict:
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        module = importlib.import_module(name)
        module.main(["--quick", "--out", str(out)])
    finally:
        sys.path.remove(str(EXPERIMENTS))
    result = json.loads((out / "result.json").read_text())
    png = out / f"{name}.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["experiment"] == name and result["mode"] == "quick"
    assert result["seeds"] == [0, 1]
    assert result["verdict"].startswith("quick run (tiny sizes)")
    assert not list(out.glob(".*result.json*")), "a temp file of the atomic write was left"
    return result


def test_every_experiment_has_a_quick_test():
    scripts = {p.stem for p in EXPERIMENTS.glob("*.py")} - {"common"}
    assert scripts == set(NAMES)


def test_gamma_from_sums_equals_gamma_fitted(tmp_path):
    numbers = run_quick("gamma_from_sums", tmp_path)["numbers"]
    assert numbers["max_rel_diff"] < 1e-6
    for row in numbers["per_architecture"].values():
        assert row["gamma_sums"] == pytest.approx(row["gamma_fitted"], rel=1e-6)


def test_resample_warmup_variants_agree_until_the_first_resample(tmp_path):
    curves = run_quick("resample_warmup", tmp_path)["numbers"]["curves"]
    plain, warm = curves["no_warmup"][0], curves["warmup"][0]
    first = plain["resamples"][0]
    until = [i for i, step in enumerate(plain["step"]) if step <= first]
    assert [plain["fvu"][i] for i in until] == [warm["fvu"][i] for i in until]


def test_mean_centring_writes_every_vector_share(tmp_path):
    numbers = run_quick("mean_centring", tmp_path)["numbers"]
    assert set(numbers["kl"]) == {"raw", "centred", "raw_minus_dense", "raw_minus_frequent"}
    # The centred vector of identical sets being 0 is asserted inside the script.
    assert all(r["density_source"] == "sparsity" for r in numbers["per_seed"])


def test_dense_features_eta_squared_is_a_share(tmp_path):
    per_hook = run_quick("dense_features", tmp_path)["numbers"]["per_hook"]
    rows = [r for entries in per_hook.values() for e in entries for r in e["dense"]]
    assert rows and all(0 <= r["eta2_token"] <= 1 + 1e-9 for r in rows)


def test_keep_topk_per_prompt_scores_every_variant(tmp_path):
    numbers = run_quick("keep_topk_per_prompt", tmp_path)["numbers"]
    assert set(numbers["per_seed"]) == {"ioi", "default-text"}
    assert all(len(rows) == 2 for rows in numbers["per_seed"].values())


def test_layer_transfer_own_layer_retains_everything(tmp_path):
    retained = run_quick("layer_transfer", tmp_path)["numbers"]["retained_variance"]
    assert [retained[i][i]["mean"] for i in range(len(retained))] == [1.0] * len(retained)


def test_ce_sanity_norm_warning_fires(tmp_path):
    numbers = run_quick("ce_sanity", tmp_path)["numbers"]
    assert numbers["warning_fired"]["SAE of another layer (norm 5x off)"]
    assert not numbers["warning_fired"]["correct"]
