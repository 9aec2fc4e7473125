"""``saelab bench``: one sub-command per registered suite, bench.json with seed groups and
intervals, one-line errors with nothing written for bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from saelab.cli import build_parser, main
from saelab.config import DataConfig, ModelConfig, RunConfig, SAEConfig, TrainConfig
from saelab.evaluation.bench.registry import load_suites
from saelab.training.sweep import sweep_run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def seeded_sweep(tiny_model_dir, words_file, tmp_path_factory):
    """Two TopK SAEs of the tiny Llama, each under two seeds."""
    out = tmp_path_factory.mktemp("sweep")
    cfg = RunConfig(
        model=ModelConfig(name=str(tiny_model_dir)),
        data=DataConfig(dataset=str(words_file), context=16, model_batch_size=8, buffer_size=512),
        train=TrainConfig(tokens=512, batch_size=128, lr=1e-3),
        saes=(
            SAEConfig(hook=HOOK, architecture="topk", k=4, expansion=2),
            SAEConfig(hook=HOOK, architecture="topk", k=8, expansion=2),
        ),
    )
    sweep_run(cfg, out, eval_tokens=128, seeds=2, progress=False)
    return out


@pytest.fixture
def task_file(tmp_path):
    rows = [{"text": " ".join(f"w{i + j}" for j in range(5)), "label": 1} for i in range(3, 33)]
    rows += [{"text": " ".join(f"w{200 + i + j}" for j in range(5)), "label": 0} for i in range(30)]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_registered_suite_is_a_sub_command():
    bench = next(
        a
        for a in build_parser("bench")._actions
        if getattr(a, "choices", None) and "bench" in a.choices
    ).choices["bench"]
    subs = next(a for a in bench._actions if hasattr(a, "choices") and a.choices).choices
    assert list(subs) == [*load_suites(), "all"]
    args = build_parser("bench").parse_args(["bench", "probing", "x", "--ks", "1,3", "--task", "t"])
    assert args.ks == [1, 3] and args.task == "t" and args.sae_dirs == ["x"]


def test_probing_writes_bench_json_grouped_over_seeds(seeded_sweep, task_file, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["-q", "bench", "probing", str(seeded_sweep), "--task", str(task_file)]
    argv += ["--examples", "60", "--ks", "1,2", "--context", "8", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert len(doc["saes"]) == 4 and len(doc["groups"]) == 2
    for group in doc["groups"].values():
        assert sorted(group["seeds"]) == [0, 1]
        stat = group["metrics"]["probe_sae_acc_k2"]
        assert stat["n"] == 2 and 0 <= stat["mean"] <= 1 and stat["half_width"] is not None
        full = group["metrics"]["probe_full_acc"]
        assert full["half_width"] == 0.0  # the same model activations for every seed
    assert doc["summary"]["probe_sae_acc_k1"]["seeds_per_group"] == 2
    for entry in doc["saes"].values():
        assert entry["info"]["architecture"] == "topk" and entry["info"]["hook"] == HOOK
        assert set(entry["details"]["probing"]["task"]) == {"full", "k1", "k2"}
    printed = capsys.readouterr().out
    assert "probe_sae_acc_k2" in printed and "±" in printed and str(out) in printed


def test_bad_input_is_one_line_and_writes_nothing(seeded_sweep, tmp_path, capsys):
    out = tmp_path / "bench.json"
    one_class = tmp_path / "one.jsonl"
    one_class.write_text('{"text": "w3 w4", "label": 1}\n{"text": "w5", "label": 1}\n')
    csv = tmp_path / "task.csv"
    csv.write_text("text,label\n")
    # An SAE whose hook the tiny model does not have.
    far = tmp_path / "far"
    shutil.copytree(next(p for p in seeded_sweep.iterdir() if (p / "cfg.json").exists()), far)
    cfg = json.loads((far / "cfg.json").read_text())
    cfg["saelab"]["sae"]["hook"] = cfg["metadata"]["hook_name"] = "blocks.7.hook_resid_post"
    (far / "cfg.json").write_text(json.dumps(cfg))
    cases = [
        ([str(seeded_sweep), "--task", str(one_class)], "exactly two labels"),
        ([str(seeded_sweep), "--task", str(csv)], "unknown task file format"),
        ([str(far), "--task", str(one_class)], "blocks.7.hook_resid_post"),
        ([str(seeded_sweep), "--tasks", "first_letter"], "no single-token words"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["-q", "bench", "probing", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("saelab: error:") and message in err[0], err
        assert not out.exists()
    assert main(["-q", "bench", "absorption", str(seeded_sweep), "--out", str(out)]) == 2
    assert "no single-token words" in capsys.readouterr().err
    assert not out.exists()


def test_eval_prints_intervals_over_seeds(seeded_sweep, capsys):
    assert (
        main(["-q", "eval", str(seeded_sweep), "--tokens", "64", "--summary", str(seeded_sweep)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "over seeds (mean ± 95 % interval" in printed
    table = printed.split("over seeds")[1]
    assert "(seeds: 2)" in table and "ce_loss_recovered" in table and "±" in table
