"""Resuming an interrupted activation cache: interrupted at every kind of point (before a shard,
between a shard and its progress record, before the index), then resumed, it must be byte for
byte the cache of an uninterrupted run; wrong arguments, damaged files and folders in the wrong
state are one-line errors."""

from __future__ import annotations

import json

import pytest

import saelab.data.cache.writer as cache_module
from saelab.data.cache import INDEX_FILENAME, PROGRESS_FILENAME, write_activation_cache
from saelab.errors import SaelabError
from tiny_models import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]
# 8 sequences of 16 tokens keep ~110 rows per model batch: shards of 128 straddle batches (rows
# are pending between shards) and shards of 50 are several per batch.
SETTINGS = {"context": 16, "model_batch_size": 8, "seed": 3, "norm_estimate_tokens": 300}


class Interrupted(Exception):
    """Stands for the process being killed at that point."""


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def write(model, tokenizer, words_file, out, **changes):
    options = {
        "tokens": 600,
        "shard_tokens": 128,
        "dataset": str(words_file),
        **SETTINGS,
        **changes,
    }
    return write_activation_cache(
        model, tokenizer, HOOKS, out, model_name="tiny-llama", progress=False, **options
    )


def folder_bytes(out):
    """Every file of the folder by name (no progress or temp files may be left)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(model, tokenizer, words_file, tmp_path_factory):
    """One uninterrupted cache per (shard_tokens, dtype)."""
    made = {}

    def get(shard_tokens, dtype):
        if (shard_tokens, dtype) not in made:
            out = tmp_path_factory.mktemp("whole") / "acts"
            write(model, tokenizer, words_file, out, shard_tokens=shard_tokens, dtype=dtype)
            made[shard_tokens, dtype] = folder_bytes(out)
        return made[shard_tokens, dtype]

    return get


def interrupt_at(monkeypatch, what: str, nth: int) -> None:
    """Raise on the ``nth`` (from 1) write of ``what``: "shard" (before a shard file is written),
    "progress" (after a shard, before its progress record) or "index" (after every shard)."""
    calls = {"n": 0}

    def counted(name: str) -> None:
        if name.startswith(what if what != "index" else INDEX_FILENAME):
            calls["n"] += 1
            if calls["n"] == nth:
                raise Interrupted(f"{what} #{nth}")

    write_shard, write_json = cache_module._write_shard, cache_module.write_json

    def shard_then(path, rows):
        counted(path.name)
        return write_shard(path, rows)

    def json_then(path, obj):
        counted(path.name)
        return write_json(path, obj)

    monkeypatch.setattr(cache_module, "_write_shard", shard_then)
    monkeypatch.setattr(cache_module, "write_json", json_then)


@pytest.mark.parametrize(
    ("stops", "shard_tokens", "dtype"),
    [
        ([("shard", 2)], 128, "float32"),  # 1 shard done, rows pending
        ([("progress", 3)], 128, "float32"),  # shard 2 on disk but not recorded
        ([("index", 1)], 128, "float32"),  # every shard done
        ([("shard", 2), ("shard", 3), ("progress", 2)], 50, "bfloat16"),  # resumed, stopped again
    ],
)
def test_resumed_cache_is_byte_identical_to_an_uninterrupted_one(
    model, tokenizer, words_file, tmp_path, monkeypatch, uninterrupted, stops, shard_tokens, dtype
):
    out = tmp_path / "acts"
    for i, (what, nth) in enumerate(stops):
        with monkeypatch.context() as patch:
            interrupt_at(patch, what, nth)
            with pytest.raises(Interrupted):
                write(
                    model, tokenizer, words_file, out, shard_tokens=shard_tokens, dtype=dtype,
                    resume=i > 0,
                )  # fmt: skip
        assert (out / PROGRESS_FILENAME).is_file() and not (out / INDEX_FILENAME).exists()
    index = write(
        model, tokenizer, words_file, out, shard_tokens=shard_tokens, dtype=dtype, resume=True
    )
    assert index.count == 600
    # index.json (shards, counts, scales, checksums) and every shard equal, nothing else left.
    assert folder_bytes(out) == uninterrupted(shard_tokens, dtype)


def stopped_cache(model, tokenizer, words_file, out, monkeypatch):
    """A cache interrupted after 2 of its 5 shards."""
    with monkeypatch.context() as patch:
        interrupt_at(patch, "shard", 3)
        with pytest.raises(Interrupted):
            write(model, tokenizer, words_file, out)
    return out


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"tokens": 700}, "tokens=600"),
        ({"seed": 4}, "seed=3"),
        ({"shard_tokens": 100}, "shard_tokens=128"),
        ({"dtype": "bfloat16"}, "dtype='float32'"),
    ],
)
def test_resume_with_other_arguments_names_the_one_that_differs(
    model, tokenizer, words_file, tmp_path, monkeypatch, change, named
):
    out = stopped_cache(model, tokenizer, words_file, tmp_path / "acts", monkeypatch)
    with pytest.raises(SaelabError) as exc:
        write(model, tokenizer, words_file, out, resume=True, **change)
    (key, value), = change.items()  # fmt: skip
    assert named in one_line(exc) and f"{key}={value!r}" in one_line(exc)
    assert "same arguments" in one_line(exc)


def test_damaged_or_missing_files_stop_the_resume_naming_them(
    model, tokenizer, words_file, tmp_path, monkeypatch
):
    out = stopped_cache(model, tokenizer, words_file, tmp_path / "acts", monkeypatch)
    shard = out / "shard_00001.safetensors"
    good = shard.read_bytes()
    damaged = bytearray(good)
    damaged[-10] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    with pytest.raises(SaelabError) as exc:
        write(model, tokenizer, words_file, out, resume=True)
    assert "shard_00001.safetensors fails its sha256" in one_line(exc)
    shard.unlink()
    with pytest.raises(SaelabError, match="shard_00001.safetensors is missing"):
        write(model, tokenizer, words_file, out, resume=True)
    shard.write_bytes(good)
    pending = json.loads((out / PROGRESS_FILENAME).read_text())["pending"]["file"]
    (out / pending).unlink()
    with pytest.raises(SaelabError, match=f"{pending} is missing"):
        write(model, tokenizer, words_file, out, resume=True)


def test_folder_state_decides_what_is_allowed(model, tokenizer, words_file, tmp_path, monkeypatch):
    out = stopped_cache(model, tokenizer, words_file, tmp_path / "acts", monkeypatch)
    with pytest.raises(SaelabError) as exc:
        write(model, tokenizer, words_file, out)  # unfinished, no resume: not overwritten
    assert "unfinished" in one_line(exc) and "--resume" in one_line(exc)
    with pytest.raises(SaelabError, match="nothing to resume"):
        write(model, tokenizer, words_file, tmp_path / "empty", resume=True)
    write(model, tokenizer, words_file, out, resume=True)
    with pytest.raises(SaelabError, match="complete activation cache; nothing to resume"):
        write(model, tokenizer, words_file, out, resume=True)
    (out / PROGRESS_FILENAME).write_text("{not json")  # as if killed before removing it
    with pytest.raises(SaelabError, match="already holds an activation cache"):
        write(model, tokenizer, words_file, out)
