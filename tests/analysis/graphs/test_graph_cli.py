"""``saelab graph`` end to end on a tiny Llama and a saved replacement set of random
transcoders: graph.json and index.html written with the scores printed, an intervention printed
next to its prediction, and bad input as one line with nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from graph_fixtures import save_tiny_set  # noqa: E402

from saelab.cli import main  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "w5 w9 w17 w33 w65"


@pytest.fixture(scope="module")
def tiny_set(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("set") / "rep"
    return save_tiny_set(build_tiny_model("llama"), folder, str(tiny_model_dir))


def _graph(tiny_set, out, *extra):
    return main(["-q", "graph", "--replacement", str(tiny_set), "--prompt", PROMPT,
                 "--out", str(out), *map(str, extra)])  # fmt: skip


def _one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("saelab: error:"), err
    return err[0]


def test_graph_writes_json_and_page_and_prints_scores(tiny_set, tmp_path, capsys):
    out = tmp_path / "g"
    assert _graph(tiny_set, out, "--target-logits", "3") == 0
    printed = capsys.readouterr().out
    assert "replacement score" in printed and "completeness score" in printed
    graph = json.loads((out / "graph.json").read_text())
    assert graph["format"] == "saelab-graph" and graph["version"] == 1
    meta = graph["metadata"]
    assert meta["prompt_tokens"][1:] == PROMPT.split(" ") or len(meta["prompt_tokens"]) == 6
    assert 0 <= meta["scores"]["replacement"] <= 1 and 0 <= meta["scores"]["completeness"] <= 1
    kinds = {n["feature_type"] for n in graph["nodes"]}
    assert kinds == {"transcoder", "mlp reconstruction error", "embedding", "logit"}
    ids = {n["node_id"] for n in graph["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in graph["links"])
    assert len([n for n in graph["nodes"] if n["feature_type"] == "logit"]) <= 3
    assert (out / "index.html").is_file()
    printed_scores = f"replacement score {meta['scores']['replacement']:.3f}"
    assert printed_scores in printed


def test_an_intervention_prints_predicted_next_to_measured(tiny_set, tmp_path, capsys):
    out = tmp_path / "g"
    assert _graph(tiny_set, out, "--target-logits", "2") == 0
    capsys.readouterr()
    graph = json.loads((out / "graph.json").read_text())
    node = next(n for n in graph["nodes"] if n["feature_type"] == "transcoder" and n["kept"])
    spec = f"{node['layer']}:{node['ctx_idx']}:{node['feature']}"
    assert _graph(tiny_set, out, "--target-logits", "2", "--ablate", spec, "--generate", "2") == 0
    printed = capsys.readouterr().out
    assert f"intervention: ablate {spec}" in printed and "predicted" in printed
    assert "generated (edited)" in printed
    again = json.loads((out / "graph.json").read_text())["metadata"]["intervention"]
    assert len(again["predicted"]) == len(again["measured"]) == 2


@pytest.mark.parametrize(
    "extra,expect",
    [
        (("--ablate", "1:2:99999"), "unknown feature 99999"),
        (("--ablate", "1:2"), "is not L:POS:ID"),
        (("--node-threshold", "1.5"), "--node-threshold must be in [0, 1]"),
        (("--edge-threshold", "-0.1"), "--edge-threshold must be in [0, 1]"),
        (("--target-logits", "w5 w9"), "is 2 tokens, not one"),
    ],
)
def test_bad_options_are_one_line_errors_and_write_nothing(
    tiny_set, tmp_path, capsys, extra, expect
):
    out = tmp_path / "g"
    line = _one_line_error(capsys, _graph(tiny_set, out, *extra))
    assert expect in line
    assert not out.exists()


def test_a_prompt_longer_than_the_context_is_refused(tiny_set, tmp_path, capsys):
    out = tmp_path / "g"
    code = main(["-q", "graph", "--replacement", str(tiny_set), "--prompt", " ".join(["w7"] * 80),
                 "--out", str(out)])  # fmt: skip
    assert "the model's context is 64" in _one_line_error(capsys, code)
    assert not out.exists()


@pytest.mark.parametrize("change", [{"hidden_size": 48}, {"num_hidden_layers": 4}])
def test_a_set_of_another_model_is_refused(tiny_set, tmp_path, capsys, change):
    from transformers import AutoModelForCausalLM

    from tiny_models import build_tiny_tokenizer, tiny_config

    other = tmp_path / "other"
    config = tiny_config("llama")
    for key, value in change.items():
        setattr(config, key, value)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    build_tiny_tokenizer().save_pretrained(other)
    out = tmp_path / "g"
    line = _one_line_error(capsys, _graph(tiny_set, out, "--model", other))
    assert "use a set trained on this model" in line
    assert not out.exists()
