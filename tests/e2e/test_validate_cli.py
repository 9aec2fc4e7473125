"""``saelab validate RUN.toml``: a run file checked (fields, architectures, hooks against the
model's modules on the meta device) without reading weights; problems are one line, exit 2."""

from __future__ import annotations

import pytest

from saelab.cli import main

pytestmark = pytest.mark.e2e

RUN = """
[model]
name = "{model}"
[train]
tokens = 100000
batch_size = 1000
[[sae]]
hook = "blocks.1.hook_resid_post"
k = 8
expansion = 4
[[sae]]
architecture = "topk_transcoder"
hook = "blocks.1.ln2.hook_normalized"
output_hook = "blocks.1.hook_mlp_out"
"""

SPARSEST = '\n[[sae]]\narchitecture = "sparsest"\nhook = "blocks.0.hook_resid_post"\n'


def run_file(tmp_path, tiny_model_dir, extra=""):
    path = tmp_path / "run.toml"
    path.write_text(RUN.format(model=tiny_model_dir) + extra)
    return path


def test_a_valid_file_prints_its_saes_hooks_widths_and_budget(tmp_path, tiny_model_dir, capsys):
    path = run_file(tmp_path, tiny_model_dir)
    assert main(["-q", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no problem found" in out and "no weights read" in out
    assert "100,000 tokens per SAE in 100 steps" in out and "2 SAE(s)" in out
    assert "topk at blocks.1.hook_resid_post (width 64), d_sae 256" in out
    assert "blocks.1.ln2.hook_normalized (width 64) -> blocks.1.hook_mlp_out (width 64)" in out


def test_flags_and_set_apply_as_for_train(tmp_path, tiny_model_dir, capsys):
    path = run_file(tmp_path, tiny_model_dir)
    argv = ["-q", "validate", str(path), "--tokens", "2e4", "--set", "train.batch_size=100"]
    assert main(argv) == 0
    assert "20,000 tokens per SAE in 200 steps of 100" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "extra", "expected"),
    [
        (["--hook", "blocks.9.hook_resid_post"], "", "blocks.9.hook_resid_post"),
        ([], SPARSEST, "unknown SAE architecture 'sparsest'"),
        ([], "\n[data]\ncontxt = 64\n", "unknown field(s) contxt in [data]"),
        (["--set", "train.tokens=0"], "", "train.tokens must be positive"),
    ],
    ids=["unknown hook", "unknown architecture", "unknown field", "bad value"],
)
def test_each_problem_is_one_line_and_exit_2(
    tmp_path, tiny_model_dir, capsys, args, extra, expected
):
    path = run_file(tmp_path, tiny_model_dir, extra=extra)
    assert main(["-q", "validate", str(path), *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saelab: error:"), captured.err
    assert expected in lines[0]
    assert captured.out == ""
