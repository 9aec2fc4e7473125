"""``saelab steer`` end to end on a tiny random Llama: build, sweep, transfer, generate, reuse the
saved vector, clamp an SAE feature, and one-line errors."""

from __future__ import annotations

import json

import pytest
from steering_fixtures import HOOK, tiny_sae

from saelab.analysis.steering.score import SWEEP_KEYS
from saelab.analysis.steering.vectors import load_vector
from saelab.cli import main
from saelab.saes.storage import save_sae
from saelab_cli import run_saelab
from tiny_models import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

PAIRS = [
    {"prompt": "w10 w11 w12", "positive": " w5", "negative": " w6"},
    {"prompt": "w20 w21", "positive": " w7 w8", "negative": " w9"},
]


def steer(*args, tiny_model_dir, words_file):
    return run_saelab(
        "steer",
        "--model",
        tiny_model_dir,
        "--neutral",
        words_file,
        "--neutral-tokens",
        "64",
        *args,
        env={"OMP_NUM_THREADS": "1"},
        timeout=120,
    )


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("steer") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def test_caa_sweep_with_transfer_and_generation(tmp_path, tiny_model_dir, words_file, pairs_file):
    other = tmp_path / "tiny-gemma"
    build_tiny_model("gemma", seed=5).save_pretrained(other)
    build_tiny_tokenizer().save_pretrained(other)
    out = tmp_path / "out"
    done = steer(
        "--method", "caa", "--pairs", pairs_file, "--hook", HOOK, "--coefs=-4,0,4",
        "--transfer-layers", "0-2", "--transfer-model", other,
        "--generate", "w5 w6", "--max-new-tokens", "4", "--out", out,
        tiny_model_dir=tiny_model_dir, words_file=words_file,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "in-sample" in done.stdout and "retained at layer" in done.stdout
    assert "c=     +4:" in done.stdout
    result = json.loads((out / "steer.json").read_text())
    assert [row["coef"] for row in result["sweep"]] == [-4.0, 0.0, 4.0]
    assert all(result["sweep"][1][key] == 0.0 for key in SWEEP_KEYS)
    assert result["transfer"]["layers"]["cells"][1]["retained"] == [1.0, None, 1.0]
    assert len(result["transfer"]["model"]["retained"]) == 3
    assert len(result["generations"]) == 3 and result["neutral"]["tokens"] == 64
    assert (out / "steer.png").stat().st_size > 0
    assert load_vector(out / "vector").method == "caa"

    # The saved vector, loaded again, scores exactly as it did when it was built.
    again = steer(
        "--vector", out / "vector", "--eval", pairs_file, "--coefs", "4", "--out", tmp_path / "re",
        tiny_model_dir=tiny_model_dir, words_file=words_file,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    rerun = json.loads((tmp_path / "re" / "steer.json").read_text())["sweep"][0]
    assert rerun == result["sweep"][2]


def steer_in_process(*args, tiny_model_dir, words_file) -> int:
    """The same command through ``saelab.cli.main`` in this process (no interpreter start-up)."""
    argv = ["-q", "steer", "--model", tiny_model_dir, "--neutral", words_file, *args]
    return main([str(a) for a in [*argv, "--neutral-tokens", "64"]])


@pytest.mark.usefixtures("one_thread")
def test_sae_clamp_at_the_sae_hook(tmp_path, tiny_model_dir, words_file, pairs_file):
    save_sae(tiny_sae(), tmp_path / "sae")
    status = steer_in_process(
        "--method", "sae-clamp", "--sae", tmp_path / "sae", "--feature", "3",
        "--general", words_file, "--tokens", "200", "--eval", pairs_file, "--coefs", "0", "2",
        "--out", tmp_path / "out",
        tiny_model_dir=tiny_model_dir, words_file=words_file,
    )  # fmt: skip
    assert status == 0
    result = json.loads((tmp_path / "out" / "steer.json").read_text())
    assert result["hook"] == HOOK and result["vector"]["source"]["units"] == "max_act"
    assert result["vector"]["source"]["max_act"] > 0
    assert load_vector(tmp_path / "out" / "vector").sae is not None


@pytest.mark.usefixtures("one_thread")
def test_errors_are_one_line(tmp_path, tiny_model_dir, words_file, pairs_file, capsys):
    for args, expected in [
        (["--method", "caa", "--pairs", pairs_file, "--hook", "blocks.9.hook_resid_post"],
         "blocks.9.hook_resid_post"),
        (["--coefs", "1"], "--method"),
        (["--vector", tmp_path, "--hook", HOOK], "--hook chooses"),
        (["--method", "actadd", "--positive", "w5", "--negative", "w6", "--positions", "all",
          "--hook", HOOK], "front-aligned"),
    ]:  # fmt: skip
        status = steer_in_process(
            *args, "--out", tmp_path, tiny_model_dir=tiny_model_dir, words_file=words_file
        )
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("saelab: error:")
        assert expected in lines[0]
