"""``saelab cache --resume`` through the real ``main()`` (in-process): Ctrl-C after two shards,
then ``--resume`` gives the cache an uninterrupted command writes; a partial folder without
``--resume`` and a resume with other arguments are one-line errors (exit status 2)."""

from __future__ import annotations

import pytest

import saelab.data.cache.writer as cache_module
from saelab.cli import main
from saelab.data.cache import PROGRESS_FILENAME

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]


def cache_args(tiny_model_dir, words_file, out, *extra):
    return [
        "-q",
        "cache",
        "--model",
        str(tiny_model_dir),
        "--hook",
        "blocks.1.hook_resid_post",
        "--tokens",
        "700",
        "--dataset",
        str(words_file),
        "--context",
        "32",
        "--model-batch-size",
        "4",
        "--shard-tokens",
        "150",
        "--out",
        str(out),
        *extra,
    ]


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saelab: error:"), lines
    return lines[0]


def test_interrupted_cache_resumes_to_the_uninterrupted_bytes(
    tiny_model_dir, words_file, tmp_path, monkeypatch, capsys
):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(cache_args(tiny_model_dir, words_file, whole)) == 0

    write_shard, written = cache_module._write_shard, []

    def ctrl_c_at_the_third_shard(path, rows):
        if path.name.startswith("shard_"):
            written.append(path.name)
            if len(written) == 3:
                raise KeyboardInterrupt
        return write_shard(path, rows)

    with monkeypatch.context() as patch:
        patch.setattr(cache_module, "_write_shard", ctrl_c_at_the_third_shard)
        assert main(cache_args(tiny_model_dir, words_file, part)) == 130
    assert (part / PROGRESS_FILENAME).is_file()
    capsys.readouterr()

    # Without --resume the partial cache is neither overwritten nor continued.
    assert main(cache_args(tiny_model_dir, words_file, part)) == 2
    assert "--resume" in one_error_line(capsys)
    # Another --tokens is named; nothing was loaded or written.
    assert main(cache_args(tiny_model_dir, words_file, part, "--resume", "--tokens", "900")) == 2
    assert "tokens=700" in one_error_line(capsys)

    assert main(cache_args(tiny_model_dir, words_file, part, "--resume")) == 0
    assert "cached 700 tokens" in capsys.readouterr().out
    files = sorted(p.name for p in whole.iterdir())
    assert sorted(p.name for p in part.iterdir()) == files
    for name in files:  # index.json (counts, scales, sha256) and every shard
        assert (part / name).read_bytes() == (whole / name).read_bytes(), name


def test_under_torchrun_only_rank_0_writes(tiny_model_dir, words_file, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(cache_args(tiny_model_dir, words_file, tmp_path / "acts")) == 0
    assert not (tmp_path / "acts").exists()
