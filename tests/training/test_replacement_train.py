"""Replacement sets end to end on a tiny model: ``saelab train``/``sweep``/``validate`` with
``sae.layers``, the cross-layer transcoder, ``saelab eval SET_DIR`` (checked against the
one-SAE evaluation) and the bad input that must stop them with one line and nothing written."""

from __future__ import annotations

import json

import pytest

from saelab.cli import main
from saelab.config import SAEConfig
from saelab.evaluation.evaluate import evaluate_sae
from saelab.evaluation.replacement_eval import evaluate_replacement
from saelab.models.loading import load_model
from saelab.saes import TopKTranscoder, load_replacement, save_sae, write_replacement_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


class Done:
    """What a ``saelab`` command run in this process left: exit status, stdout, stderr."""

    def __init__(self, capsys, *args) -> None:
        capsys.readouterr()
        self.returncode = main(["-q", *map(str, args)])
        captured = capsys.readouterr()
        self.stdout, self.stderr = captured.out, captured.err


def one_line_error(done: Done) -> str:
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saelab: error:"), done.stderr
    return lines[0]


def _args(model_dir, words_file, out, *extra: str) -> tuple[str, ...]:
    return (
        "--model",
        str(model_dir),
        "--expansion",
        "2",
        "--k",
        "4",
        "--tokens",
        "1024",
        "--batch-size",
        "256",
        "--dataset",
        str(words_file),
        "--context",
        "32",
        "--set",
        "data.buffer_size=1024",
        "--set",
        "data.norm_estimate_tokens=512",
        *extra,
        "--out",
        str(out),
    )


@pytest.fixture(scope="module")
def per_layer_run(tiny_model_dir, words_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("replacement") / "run"
    args = _args(tiny_model_dir, words_file, out, "--arch", "topk_transcoder")
    assert main(["-q", "train", *args, "--set", "sae.layers=all"]) == 0
    return out


def test_layers_all_trains_one_transcoder_per_layer_into_one_set(per_layer_run, tiny_model_dir):
    rep = load_replacement(per_layer_run)
    assert (rep.kind, rep.layers, rep.n_layers) == ("per_layer", [0, 1, 2], 3)
    assert rep.folder.name == "replacement-topk_transcoder-x2-k4"
    model, _ = load_model(str(tiny_model_dir))
    rep.check_model(model)  # every member's hooks and widths match the model
    for layer, sae in rep.members():
        assert sae.cfg.hook == f"blocks.{layer}.ln2.hook_normalized"
        assert sae.cfg.output_hook == f"blocks.{layer}.hook_mlp_out"
        assert sae.metadata["training_tokens"] == 1024
    resolved = json.loads((per_layer_run / "resolved.json").read_text())
    assert len(resolved["hooks"]) == 6 and len(resolved["saes"]) == 3  # one pass, six hooks
    assert 'layers = "all"' in (per_layer_run / "config.toml").read_text()  # as asked


def test_eval_of_a_set_matches_the_one_sae_evaluation_for_a_single_member(
    per_layer_run, tiny_model_dir, words_file, tmp_path, capsys
):
    done = Done(capsys, "eval", per_layer_run, "--tokens", "2048")
    assert done.returncode == 0, done.stderr
    assert "spliced at once" in done.stdout
    result = json.loads(
        (load_replacement(per_layer_run).folder / "replacement_metrics.json").read_text()
    )
    assert set(result["members"]) == {"0", "1", "2"}
    assert result["mean_fvu"] == pytest.approx(
        sum(m["fvu"] for m in result["members"].values()) / 3
    )
    # Oracle: a set of one member spliced "all at once" is that transcoder spliced alone.
    rep = load_replacement(per_layer_run)
    layer, sae = rep.members()[1]
    single = tmp_path / "single"
    save_sae(sae, single / "m")
    write_replacement_manifest(
        single,
        kind="per_layer",
        model=rep.model,
        n_layers=3,
        layers=[layer],
        input_hook=rep.input_hook_template,
        output_hook=rep.output_hook_template,
        members=[(layer, "m")],
    )
    model, tokenizer = load_model(str(tiny_model_dir))
    common = {"dataset": str(words_file), "tokens": 1024, "context": 32, "progress": False}
    ours = evaluate_replacement(load_replacement(single), model, tokenizer, **common)
    metrics, _ = evaluate_sae(sae, model, tokenizer, check_reference=False, **common)
    for key in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_ablated", "kl"):
        assert ours["all_at_once"][key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
    assert ours["members"][str(layer)]["fvu"] == pytest.approx(metrics["fvu"], rel=1e-4)


def test_validate_and_sweep_accept_layers(tiny_model_dir, words_file, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'[model]\nname = "{tiny_model_dir}"\n'
        f'[data]\ndataset = "{words_file}"\ncontext = 32\nbuffer_size = 1024\n'
        "norm_estimate_tokens = 512\n[train]\ntokens = 1024\nbatch_size = 256\n"
        '[[sae]]\narchitecture = "topk_transcoder"\nlayers = [0, 2]\nexpansion = 2\nk = 4\n'
        '[[sae]]\narchitecture = "topk_clt_transcoder"\nlayers = [1, 2]\nexpansion = 2\nk = 4\n'
    )
    done = Done(capsys, "validate", toml)
    assert done.returncode == 0, done.stderr
    assert "expands to 3 SAE(s)" in done.stdout and "blocks.2.hook_mlp_out" in done.stdout
    done = Done(capsys, "sweep", toml, "--eval-tokens", "512", "--out", tmp_path / "sweep")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    hooks = ["blocks.0.ln2.hook_normalized", "blocks.2.ln2.hook_normalized"]
    assert [row["hook"] for row in summary["saes"]] == [*hooks, "blocks.1.ln2.hook_normalized"]
    # Held-out FVU in model units, for the CLT over both its output layers' scales.
    assert all(0 < row["fvu"] < 10 for row in summary["saes"])
    sets = sorted((tmp_path / "sweep").glob("replacement-*"))
    assert [load_replacement(s).layers for s in sets] == [[1, 2], [0, 2]]


def test_a_cross_layer_transcoder_trains_into_a_cross_layer_set(
    tiny_model_dir, words_file, tmp_path, capsys
):
    args = _args(tiny_model_dir, words_file, tmp_path / "clt", "--arch", "topk_clt_transcoder")
    done = Done(capsys, "train", *args, "--set", "sae.layers=1,2", "--expansion", "4")
    assert done.returncode == 0, done.stderr
    rep = load_replacement(tmp_path / "clt")
    assert (rep.kind, rep.layers, rep.d_sae(1)) == ("cross_layer", [1, 2], 128)
    assert rep.decoder(1, 2).shape == (128, 64) and rep.decoder(2, 1) is None
    model, _ = load_model(str(tiny_model_dir))
    rep.check_model(model)
    # Its scales were set per layer and folded: model-unit outputs have the MLP outputs' size.
    done = Done(capsys, "eval", tmp_path / "clt", "--tokens", "1024")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--arch", "topk", "--set", "sae.layers=all"), "only for transcoder architectures"),
        (("--arch", "topk_transcoder", "--set", "sae.layers=0,5"), "has layer 5 but the model"),
        (("--arch", "topk_transcoder", "--set", "sae.layers=0,0"), "twice"),
    ],
)
def test_bad_layers_are_one_line_errors_with_nothing_written(
    tiny_model_dir, words_file, tmp_path, extra, message, capsys
):
    out = tmp_path / "run"
    done = Done(capsys, "train", *_args(tiny_model_dir, words_file, out, *extra))
    assert message in one_line_error(done)
    assert not out.exists()


def test_a_set_whose_widths_do_not_match_the_model_is_refused(tiny_model_dir, tmp_path, capsys):
    cfg = SAEConfig(
        architecture="topk_transcoder",
        hook="blocks.0.ln2.hook_normalized",
        output_hook="blocks.0.hook_mlp_out",
        width=8,
        k=2,
    )
    save_sae(TopKTranscoder(cfg, 16, d_out=16), tmp_path / "set" / "m")
    write_replacement_manifest(
        tmp_path / "set",
        kind="per_layer",
        model=str(tiny_model_dir),
        n_layers=3,
        layers=[0],
        input_hook="blocks.{layer}.ln2.hook_normalized",
        output_hook="blocks.{layer}.hook_mlp_out",
        members=[(0, "m")],
    )
    done = Done(capsys, "eval", tmp_path / "set", "--tokens", "256")
    assert "expects width 16 at blocks.0.ln2.hook_normalized" in one_line_error(done)
    assert not (tmp_path / "set" / "replacement_metrics.json").exists()
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["m", "replacement.json"]


@pytest.mark.slow
def test_a_small_set_on_the_default_model_trains_loads_and_splices(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--model", "default", "--arch", "topk_transcoder", "--set", "sae.layers=0,1"]
    args += ["--expansion", "1", "--k", "8", "--tokens", "512", "--batch-size", "256"]
    args += ["--set", "data.buffer_size=512", "--set", "data.norm_estimate_tokens=256"]
    args += ["--context", "32", "--set", "data.model_batch_size=8", "--out", str(out)]
    assert main(["-q", "train", *args]) == 0
    rep = load_replacement(out)
    assert (rep.n_layers, rep.layers, rep.d_in, rep.d_sae(1)) == (30, [0, 1], 576, 576)
    model, tokenizer = load_model("default")
    result = evaluate_replacement(rep, model, tokenizer, tokens=256, context=32, progress=False)
    at_once = result["all_at_once"]
    assert at_once["ce_loss_clean"] <= at_once["ce_loss_spliced"]  # a 1k-token set loses some
    assert set(result["members"]) == {"0", "1"}
