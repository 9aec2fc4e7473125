"""Activation cache on a tiny random Llama: the writer against ActivationStream and a direct
oracle, the reader's shuffling, epochs and exact resume, and one-line errors for bad caches."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save

from saelab.data.activations import ActivationStream
from saelab.data.cache import (
    INDEX_FILENAME,
    ActivationCacheStream,
    read_cache_index,
    write_activation_cache,
)
from saelab.data.text import TokenBatches
from saelab.errors import SaelabError
from saelab.training.checkpoint import load_state, save_state
from tiny_models import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

HOOK = "blocks.1.hook_resid_post"
SAME = "blocks.2.hook_resid_pre"  # the same tensor as HOOK: equal rows prove row alignment
MLP = "blocks.0.hook_mlp_out"
HOOKS = [HOOK, SAME, MLP]
TOKENS = 600
NORM_ROWS = 200
TEXT = {"context": 16, "model_batch_size": 8, "seed": 0}


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def cache(model, tokenizer, words_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "acts"
    write_activation_cache(
        model,
        tokenizer,
        HOOKS,
        out,
        tokens=TOKENS,
        model_name="tiny-llama",
        dataset=str(words_file),
        shard_tokens=128,
        norm_estimate_tokens=NORM_ROWS,
        progress=False,
        **TEXT,
    )
    return out


@pytest.fixture
def cache_copy(cache, tmp_path):
    """A private copy to damage."""
    return shutil.copytree(cache, tmp_path / "acts")


def shard_rows(cache_dir, hook):
    """Every cached row of ``hook`` in index order (raw model units)."""
    index = read_cache_index(cache_dir)
    return torch.cat([load_file(cache_dir / s.file)[hook] for s in index.shards])


def as_multiset(rows):
    """Rows sorted lexicographically, with their multiplicities."""
    return torch.unique(rows, dim=0, return_counts=True)


def same_multiset(a, b):
    (ua, ca), (ub, cb) = as_multiset(a), as_multiset(b)
    return ua.shape == ub.shape and torch.equal(ua, ub) and torch.equal(ca, cb)


def take(stream, n_batches, hook=HOOK):
    return torch.cat([b[hook].clone() for _, b in zip(range(n_batches), stream, strict=False)])


# ----- writer ---------------------------------------------------------------------------------


def test_index_records_counts_shards_and_provenance(cache, words_file):
    raw = json.loads((cache / INDEX_FILENAME).read_text())
    assert raw["count"] == TOKENS and raw["hooks"] == HOOKS
    assert [s["count"] for s in raw["shards"]] == [128, 128, 128, 128, 88]
    assert raw["d_in"] == {HOOK: 64, SAME: 64, MLP: 64}
    assert raw["dtype"] == "float32" and raw["context"] == 16 and raw["seed"] == 0
    assert raw["dataset"] == str(words_file.resolve()) and raw["model"] == "tiny-llama"
    assert all(len(s["sha256"]) == 64 for s in raw["shards"])
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [INDEX_FILENAME] + [s["file"] for s in raw["shards"]]
    )  # no temp files left behind


def test_rows_are_the_kept_positions_and_aligned_across_hooks(cache, model, tokenizer, words_file):
    rows = shard_rows(cache, HOOK)
    assert torch.equal(rows, shard_rows(cache, SAME))
    # Oracle: the model run directly on the same token batches, BOS and EOS positions dropped.
    batches = TokenBatches(str(words_file), tokenizer, context=16, batch_size=8, seed=0)
    expected = []
    while sum(r.shape[0] for r in expected) < TOKENS:
        tokens_NP = next(batches)
        keep = (tokens_NP != 1) & (tokens_NP != 2)
        keep[:, 0] = False
        expected.append(model(tokens_NP, output_hidden_states=True).hidden_states[2][keep])
    torch.testing.assert_close(rows, torch.cat(expected)[:TOKENS], rtol=1e-5, atol=1e-5)


def test_scales_are_sqrt_d_over_the_mean_norm_of_the_first_rows(cache):
    index = read_cache_index(cache)
    for hook in HOOKS:
        first = shard_rows(cache, hook)[:NORM_ROWS].double()
        expected = math.sqrt(64) / first.norm(dim=-1).mean().item()
        assert index.scales[hook] == pytest.approx(expected, rel=1e-9)


def test_rows_read_back_equal_the_activation_stream(cache, model, tokenizer, words_file):
    tokens = TokenBatches(str(words_file), tokenizer, batch_size=8, context=16, seed=0)
    stream = ActivationStream(
        model, tokens, [HOOK], batch_size=8, buffer_size=TOKENS, norm_estimate_tokens=NORM_ROWS
    )
    next(iter(stream))  # the first fill holds exactly the first TOKENS rows, normalised
    reader = ActivationCacheStream(cache, [HOOK], batch_size=100, buffer_size=256)
    assert reader.scales[HOOK] == pytest.approx(stream.scales[HOOK], rel=1e-5)
    served = take(reader, TOKENS // 100)
    expected = stream.buffer.rows[HOOK]
    key = torch.randn(64, dtype=torch.float64)  # a random projection orders rows uniquely
    got = served[(served.double() @ key).argsort()]
    want = expected[(expected.double() @ key).argsort()]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_cache_stores_the_rounded_rows_and_the_float32_scale(
    cache, model, tokenizer, words_file, tmp_path
):
    index = write_activation_cache(
        model,
        tokenizer,
        [HOOK],
        tmp_path / "bf16",
        tokens=NORM_ROWS,
        model_name="tiny-llama",
        dataset=str(words_file),
        norm_estimate_tokens=NORM_ROWS,
        dtype="bfloat16",
        progress=False,
        **TEXT,
    )
    rows = shard_rows(tmp_path / "bf16", HOOK)
    assert rows.dtype == torch.bfloat16
    assert torch.equal(rows, shard_rows(cache, HOOK)[:NORM_ROWS].to(torch.bfloat16))
    assert index.scales[HOOK] == read_cache_index(cache).scales[HOOK]
    served = take(ActivationCacheStream(tmp_path / "bf16", batch_size=50), 4)
    assert served.dtype == torch.float32
    assert same_multiset(served, rows.float() * index.scales[HOOK])


def test_writer_refuses_a_finished_cache_and_clears_an_unfinished_one(
    cache, model, tokenizer, words_file, tmp_path
):
    with pytest.raises(SaelabError, match="already holds an activation cache"):
        write_activation_cache(model, tokenizer, [HOOK], cache, tokens=10, model_name="m")
    out = tmp_path / "half"
    out.mkdir()
    (out / "shard_00007.safetensors").write_bytes(b"left over by a killed writer")
    write_activation_cache(
        model,
        tokenizer,
        [HOOK],
        out,
        tokens=50,
        model_name="m",
        dataset=str(words_file),
        progress=False,
        **TEXT,
    )
    assert sorted(p.name for p in out.iterdir()) == [INDEX_FILENAME, "shard_00000.safetensors"]


def test_unknown_hook_fails_before_anything_is_written(model, tokenizer, tmp_path):
    with pytest.raises(SaelabError, match="blocks.9.hook_resid_post"):
        write_activation_cache(
            model,
            tokenizer,
            ["blocks.9.hook_resid_post"],
            tmp_path / "c",
            tokens=10,
            model_name="m",
        )
    assert not (tmp_path / "c").exists()


# ----- reader ---------------------------------------------------------------------------------


def test_each_epoch_serves_every_row_once_in_a_new_order(cache):
    # 80 does not divide 600: one batch straddles the two epochs.
    stream = ActivationCacheStream(cache, batch_size=80, buffer_size=256, epochs=2)
    held = []
    rows, same = [], []
    for _, batch in zip(range(2 * TOKENS // 80), stream, strict=False):
        rows.append(batch[HOOK].clone())
        same.append(batch[SAME].clone())
        held.append(stream.buffer.rows[HOOK].shape[0])
    served = torch.cat(rows)
    assert torch.equal(served, torch.cat(same))  # one permutation for every hook
    assert max(held) <= 256  # bounded memory: never more than one buffer
    everything = shard_rows(cache, HOOK) * stream.scales[HOOK]
    first, second = served[:TOKENS], served[TOKENS:]
    assert same_multiset(first, everything) and same_multiset(second, everything)
    assert not torch.equal(first, second)
    with pytest.raises(SaelabError, match=r"holds 600 tokens \(2 epochs: 1,200\)"):
        next(iter(stream))


def test_shuffling_is_deterministic_by_seed(cache):
    def first_batches(seed):
        return take(ActivationCacheStream(cache, [HOOK], batch_size=64, seed=seed), 5)

    assert torch.equal(first_batches(0), first_batches(0))
    assert not torch.equal(first_batches(0), first_batches(1))
    # Shards are read in a different order in different epochs.
    stream = ActivationCacheStream(cache, [HOOK], epochs=8)
    orders = {tuple(stream._shard_order(e)) for e in range(8)}
    assert len(orders) > 1 and all(sorted(o) == list(range(5)) for o in orders)


def test_state_dict_resumes_the_exact_same_batches_across_an_epoch(cache, tmp_path):
    def make():
        return ActivationCacheStream(cache, batch_size=64, buffer_size=256, epochs=2)

    stream = make()
    batches = iter(stream)
    for _ in range(7):
        next(batches)
    save_state(tmp_path, "stream", stream.state_dict())  # as checkpoints store it
    expected = [next(batches) for _ in range(9)]  # rows 448..1024: past the epoch end at 600

    resumed = make()
    resumed.load_state_dict(load_state(tmp_path, "stream"))
    for want, (_, got) in zip(expected, zip(range(9), resumed, strict=False), strict=True):
        for hook in HOOKS:
            torch.testing.assert_close(got[hook], want[hook], rtol=0, atol=0)


def test_data_parallel_ranks_take_their_slices_of_the_single_process_batches(cache):
    """Each of 2 ranks serves its half of every batch one process would serve; an uneven
    split is a one-line error."""
    single = take(ActivationCacheStream(cache, batch_size=64, buffer_size=256), 9)
    halves = [
        take(ActivationCacheStream(cache, batch_size=64, buffer_size=256, rank=r, world_size=2), 9)
        for r in range(2)
    ]
    assert all(h.shape == (9 * 32, 64) for h in halves)
    together = torch.stack([h.view(9, 32, 64) for h in halves], dim=1).reshape(-1, 64)
    assert torch.equal(together, single)
    with pytest.raises(SaelabError, match="batch of 64 cannot be split evenly over 3 processes"):
        ActivationCacheStream(cache, batch_size=64, rank=0, world_size=3)


def test_state_of_another_cache_is_refused(cache, cache_copy):
    index = json.loads((cache_copy / INDEX_FILENAME).read_text())
    index["shards"] = index["shards"][:-1]
    index["count"] -= 88
    (cache_copy / INDEX_FILENAME).write_text(json.dumps(index))
    other = ActivationCacheStream(cache_copy)
    with pytest.raises(SaelabError, match="same --activations"):
        other.load_state_dict(ActivationCacheStream(cache).state_dict())


def test_running_out_says_how_many_tokens_the_cache_holds(cache):
    stream = ActivationCacheStream(cache, batch_size=128)
    with pytest.raises(SaelabError, match="holds 600 tokens but training needs 1,000"):
        stream.check_tokens(1000)
    stream.check_tokens(600)
    with pytest.raises(SaelabError, match="holds 600 tokens"):
        take(stream, 5)  # 640 rows


# ----- damaged caches -------------------------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_flipped_bytes_fail_the_checksum_naming_the_shard(cache_copy):
    path = cache_copy / "shard_00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data: the header still parses
    path.write_bytes(bytes(data))
    stream = ActivationCacheStream(cache_copy, batch_size=100)
    with pytest.raises(SaelabError) as exc:
        take(stream, TOKENS // 100)
    assert "shard_00002.safetensors" in one_line(exc) and "checksum" in one_line(exc)


def test_truncated_shard_is_named_when_the_stream_is_made(cache_copy):
    path = cache_copy / "shard_00003.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(SaelabError) as exc:
        ActivationCacheStream(cache_copy)
    assert "shard_00003.safetensors" in one_line(exc) and "truncated" in one_line(exc)


def test_damaged_header_and_missing_shard_are_named(cache_copy):
    path = cache_copy / "shard_00001.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"####"  # the JSON header no longer parses; the size is unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(SaelabError) as exc:
        ActivationCacheStream(cache_copy)
    assert "shard_00001.safetensors" in one_line(exc) and "corrupt" in one_line(exc)
    path.unlink()
    with pytest.raises(SaelabError, match="shard_00001.safetensors is missing"):
        ActivationCacheStream(cache_copy)


def replace_shard(cache_dir, name, tensors):
    """Swap in a well-formed shard with other content, its index entry updated to match."""
    import hashlib

    data = save(tensors)
    (cache_dir / name).write_bytes(data)
    index = json.loads((cache_dir / INDEX_FILENAME).read_text())
    for shard in index["shards"]:
        if shard["file"] == name:
            shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (cache_dir / INDEX_FILENAME).write_text(json.dumps(index))


@pytest.mark.parametrize("damage", ["wrong hooks", "wrong d_in"])
def test_shard_that_does_not_match_the_index_is_named(cache_copy, damage):
    name = "shard_00004.safetensors"
    tensors = load_file(cache_copy / name)
    if damage == "wrong hooks":
        tensors["blocks.0.hook_resid_pre"] = tensors.pop(MLP)
    else:
        tensors[MLP] = tensors[MLP][:, :32].contiguous()
    replace_shard(cache_copy, name, tensors)
    with pytest.raises(SaelabError) as exc:
        ActivationCacheStream(cache_copy)
    assert name in one_line(exc)
    assert ("blocks.0.hook_resid_pre" if damage == "wrong hooks" else "[88, 64]") in one_line(exc)


def test_hook_not_in_the_cache_lists_the_cached_ones(cache):
    with pytest.raises(SaelabError) as exc:
        ActivationCacheStream(cache, [HOOK, "blocks.2.hook_mlp_out"])
    message = one_line(exc)
    assert "blocks.2.hook_mlp_out" in message and all(h in message for h in HOOKS)


def test_folder_without_index_is_not_a_cache(tmp_path):
    with pytest.raises(SaelabError, match="not an activation cache"):
        ActivationCacheStream(tmp_path)
    (tmp_path / INDEX_FILENAME).write_text("{not json")
    with pytest.raises(SaelabError, match="not a saelab activation cache index"):
        ActivationCacheStream(tmp_path)
