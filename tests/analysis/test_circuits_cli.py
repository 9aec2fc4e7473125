"""``saelab circuit`` end to end on the tiny Llama with a JSONL task and saved tiny SAEs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from circuit_fixtures import make_saes, words_task

from saelab.cli import main
from saelab.config import SAEConfig
from saelab.saes import TopKSAE
from saelab.saes.storage import save_sae
from saelab_cli import run_saelab
from tiny_models import D_MODEL

pytestmark = pytest.mark.e2e

HOOK = "blocks.1.hook_resid_post"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def task_file(tmp_path) -> Path:
    task = words_task(6)
    path = tmp_path / "task.jsonl"
    rows = [
        {"prompt": p, "correct": c, "incorrect": i, "corrupted_prompt": twin}
        for p, c, i, twin in zip(
            task.prompts, task.correct, task.incorrect, task.corrupted, strict=True
        )
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_circuit_prints_top_features_and_writes_the_faithfulness_curve(
    tmp_path, tiny_model_dir, task_file
):
    meta = {"model_name": str(tiny_model_dir)}
    dirs = [save_sae(sae, tmp_path / f"sae{i}", metadata=meta) for i, sae in enumerate(make_saes())]
    out = tmp_path / "out"
    done = run_saelab(
        "circuit", "--task", task_file, "--sae", *dirs, "--k", "3", "--n-prompts", "5",
        "--method", "ig", "--ig-steps", "2", "--keep-per", "prompt", "--out", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    circuit = json.loads((out / "circuit.json").read_text())
    curve = json.loads((out / "faithfulness.json").read_text())
    assert (out / "faithfulness.png").read_bytes().startswith(PNG_MAGIC)
    assert circuit["n_prompts"] == 5 and len(circuit["top_features"]) == 3
    ies = [abs(row["ie"]) for row in circuit["top_features"]]
    assert ies == sorted(ies, reverse=True)
    assert set(circuit["metrics"]) == {"clean", "sae", "sae+error", "top-k", "top-k+error"}
    clean, with_error = circuit["metrics"]["clean"], circuit["metrics"]["sae+error"]
    assert with_error["logit_diff"] == pytest.approx(clean["logit_diff"], abs=1e-4)
    assert curve["n_features"][-1] == sum(sae.d_sae for sae in make_saes())
    assert curve["faithfulness"][0] == 0 and curve["faithfulness"][-1] == pytest.approx(1, abs=1e-3)
    first = circuit["top_features"][0]
    assert first["hook"] in done.stdout and f"{first['feature']:>8}" in done.stdout
    assert "logit_diff" in done.stdout and "faithfulness.png" in done.stdout


def test_compare_reports_every_variant_larger_l0_first(tmp_path, tiny_model_dir, task_file):
    meta = {"model_name": str(tiny_model_dir)}
    small = save_sae(
        TopKSAE(SAEConfig(hook=HOOK, k=2, expansion=2), d_in=D_MODEL, seed=0), tmp_path / "k2"
    )
    large = save_sae(
        TopKSAE(SAEConfig(hook=HOOK, k=8, expansion=2), d_in=D_MODEL, seed=1),
        tmp_path / "k8",
        metadata=meta,
    )
    out = tmp_path / "cmp"
    done = run_saelab(
        "circuit", "--task", task_file, "--sae", small, large, "--k", "2", "--compare",
        "--model", tiny_model_dir, "--out", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").read_bytes().startswith(PNG_MAGIC)
    assert [Path(s["dir"]).name for s in result["saes"]] == ["k8", "k2"]
    assert result["saes"][0]["l0_on_prompts"] == pytest.approx(8, abs=0.01)
    variants = {(v["sae"], v["variant"]): v for v in result["variants"]}
    assert len(variants) == 8
    for sae in result["saes"]:
        with_error = variants[(sae["label"], "full+error")]
        assert with_error["logit_diff"] == pytest.approx(result["clean"]["logit_diff"], abs=1e-4)
    # Keeping the top 2 of an SAE that has 2 active features changes nothing.
    k2 = result["saes"][1]["label"]
    assert variants[(k2, "top-2")]["logit_diff"] == pytest.approx(
        variants[(k2, "full")]["logit_diff"], abs=1e-5
    )
    assert "top-2+error" in done.stdout and "clean model" in done.stdout


def test_circuit_errors_are_one_line(tmp_path, tiny_model_dir, task_file, capsys):
    meta = {"model_name": str(tiny_model_dir)}
    dirs = [save_sae(sae, tmp_path / f"sae{i}", metadata=meta) for i, sae in enumerate(make_saes())]
    out = str(tmp_path / "o")
    for args, message in [
        (["--task", "ioi", "--sae", str(dirs[0])], "IOI names are single tokens"),
        (["--task", str(task_file), "--sae", *map(str, dirs), "--compare"], "two SAEs at the same"),
    ]:
        assert main(["-q", "circuit", *args, "--out", out]) == 2  # in process: no import cost
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("saelab: error:") and message in err[0]
