"""Text sources to tokenised, BOS-prefixed, packed sequences of a fixed context length.

A *spec* names where the text comes from:

- `"default"`: the embedded corpus (`saelab.data.corpus`), always available offline;
- a local `.txt`, `.jsonl` or `.parquet` file, or a directory of them;
- anything else is a Hugging Face dataset: `name`, `name:config`, either with an optional
  `@split` suffix (default `train`), streamed with `datasets`.

Documents are shuffled deterministically by `seed`, tokenised, joined with the tokenizer's EOS
token and cut into rows that each start with BOS:

    >>> batches = TokenBatches("default", tokenizer, context=128, batch_size=32, seed=0)
    >>> tokens = next(batches)  # LongTensor [32, 128], tokens[:, 0] == BOS
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from saelab.data.corpus import default_documents
from saelab.errors import MissingPackageError, SaelabError
from saelab.models.loading import bos_token_id as bos_token_id_of

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEXT_FIELD = "text"
DEFAULT_SPLIT = "train"
# Same buffer size as the `datasets` streaming shuffle, so local and hub sources mix alike.
SHUFFLE_BUFFER_DOCUMENTS = 10_000
# A .txt file without blank lines is cut into documents of this many lines.
TXT_LINES_PER_DOCUMENT = 50
# Documents handed to the tokenizer per call: one call per document is several times slower.
DOCUMENTS_PER_TOKENIZER_CALL = 64
PARQUET_ROWS_PER_READ = 1024

_USE_INSTEAD = "pass a local .txt/.jsonl/.parquet file or 'default'"


# ---------------------------------------------------------------- documents


def iter_documents(spec: str, seed: int = 0) -> Iterator[str]:
    """Documents (strings) from `spec`, shuffled deterministically by `seed`.

    Local files are shuffled through a buffer of 10,000 documents so large files stream in
    bounded memory; the order of files in a directory is shuffled too.
    """
    if spec == "default":
        return _iter_default_epochs(seed)
    path = Path(spec).expanduser()
    if path.exists():
        return _iter_local(path, seed)
    if _looks_like_path(spec):
        raise SaelabError(f"no such file or directory: {spec}; check the path, or {_USE_INSTEAD}")
    name, config, split = parse_hf_spec(spec)
    return _iter_hf_dataset(name, config, split, seed)


def _iter_default_epochs(seed: int) -> Iterator[str]:
    """The embedded corpus, reshuffled each epoch, without end: a long run on the default text
    repeats it (with a warning) rather than stopping."""
    documents = default_documents()
    for epoch in itertools.count():
        if epoch == 1:
            logger.warning("the default corpus was used up; repeating it (epoch 2 onwards)")
        order = list(range(len(documents)))
        random.Random(seed + 1_000_003 * epoch).shuffle(order)
        yield from (documents[i] for i in order)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`name[:config][@split]` → (name, config or None, split).

    >>> parse_hf_spec("allenai/c4:en@validation")
    ('allenai/c4', 'en', 'validation')
    """
    rest, _, split = spec.partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise SaelabError(f"empty dataset name in {spec!r}; write it as name[:config][@split]")
    return name, config or None, split or DEFAULT_SPLIT


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(LOCAL_SUFFIXES) or spec.startswith(("/", "~", "."))


def _iter_local(path: Path, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise SaelabError(
                f"directory {path} holds no .txt, .jsonl or .parquet files; "
                f"point at a directory of such files or at one file"
            )
        rng.shuffle(files)
    elif path.suffix in LOCAL_SUFFIXES:
        files = [path]
    else:
        raise SaelabError(
            f"cannot read {path}: unknown suffix {path.suffix!r}; "
            f"use a .txt, .jsonl or .parquet file or a directory of them"
        )
    for file in files:
        _check_columns(file)  # fail now, not after the first file has been consumed
    documents = (doc for file in files for doc in _read_file(file))
    return _shuffle_buffered(documents, rng, SHUFFLE_BUFFER_DOCUMENTS)


def _check_columns(file: Path) -> None:
    if file.suffix == ".parquet":
        columns = _parquet_file(file).schema_arrow.names
        if TEXT_FIELD not in columns:
            raise SaelabError(
                f"{file} has no {TEXT_FIELD!r} column (columns: {', '.join(columns)}); "
                f"rename the text column to {TEXT_FIELD!r}"
            )


def _read_file(file: Path) -> Iterator[str]:
    if file.suffix == ".txt":
        return _read_txt(file)
    if file.suffix == ".jsonl":
        return _read_jsonl(file)
    return _read_parquet(file)


def _read_txt(file: Path) -> Iterator[str]:
    """Documents separated by blank lines; runs longer than 50 lines are cut every 50 lines."""
    lines: list[str] = []
    with file.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line)
                if len(lines) < TXT_LINES_PER_DOCUMENT:
                    continue
            if lines:
                yield "".join(lines).strip("\n")
                lines = []
    if lines:
        yield "".join(lines).strip("\n")


def _read_jsonl(file: Path) -> Iterator[str]:
    # As .txt files: bytes that are not UTF-8 become U+FFFD (a binary file then fails as JSON).
    with file.open(encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SaelabError(
                    f"{file}:{line_number} is not valid JSON ({e.msg}); write one object per line"
                ) from None
            if not isinstance(record, dict) or TEXT_FIELD not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise SaelabError(
                    f"{file}:{line_number} has no {TEXT_FIELD!r} field (keys: {keys}); "
                    f"store each document's text under {TEXT_FIELD!r}"
                )
            text = record[TEXT_FIELD]
            if isinstance(text, str) and text:
                yield text


def _parquet_file(file: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises ArrowInvalid and others for damaged files
        raise SaelabError(
            f"cannot read {file} as parquet ({_first_line(e)}); check the file"
        ) from e


def _read_parquet(file: Path) -> Iterator[str]:
    # Batches of rows rather than the whole table, so a large file streams in bounded memory.
    batches = _parquet_file(file).iter_batches(
        batch_size=PARQUET_ROWS_PER_READ, columns=[TEXT_FIELD]
    )
    for batch in batches:
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text:
                yield text


def _shuffle_buffered(items: Iterable[str], rng: random.Random, buffer_size: int) -> Iterator[str]:
    """Yield `items` in a random order, holding at most `buffer_size` of them at once.

    Streams that fit in the buffer come out fully shuffled.
    """
    buffer: list[str] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _iter_hf_dataset(name: str, config: str | None, split: str, seed: int) -> Iterator[str]:
    """Stream the text column of a Hugging Face dataset (hub name or local dataset folder)."""
    try:
        import datasets
    except ImportError as e:
        raise MissingPackageError(
            f"reading the dataset {name!r} needs the datasets package; "
            f"run `pip install datasets` or {_USE_INSTEAD}"
        ) from e
    # `datasets` may only contact the hub once iteration starts, so the first example is
    # fetched here too, where failures can be reported in one line.
    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
        dataset = dataset.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER_DOCUMENTS)
        examples = iter(dataset)
        first = next(examples, None)
    except Exception as e:
        raise SaelabError(
            f"could not load dataset {name!r} from the Hugging Face hub ({_first_line(e)}); "
            f"{_USE_INSTEAD}"
        ) from e
    if first is None:
        return iter(())
    column = _text_column(first, name)
    logger.info("streaming column %r of dataset %r (split %r)", column, name, split)
    return _texts_of(first, examples, column)


def _texts_of(first: dict, examples: Iterator[dict], column: str) -> Iterator[str]:
    for example in itertools.chain([first], examples):
        text = example.get(column)
        if isinstance(text, str) and text:
            yield text


def _text_column(example: dict, name: str) -> str:
    if TEXT_FIELD in example:
        return TEXT_FIELD
    for key, value in example.items():
        if isinstance(value, str):
            return key
    raise SaelabError(
        f"dataset {name!r} has no text column (columns: {', '.join(example)}); "
        f"use a dataset with a {TEXT_FIELD!r} column"
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------- tokens


def pack_tokens(
    documents: Iterable[str],
    tokenizer: Any,
    *,
    bos_token_id: int,
    context: int = 128,
    batch_size: int = 32,
) -> Iterator[Int[Tensor, "batch ctx"]]:
    """Tokenise `documents` and pack them into `[batch_size, context]` int64 batches.

    Documents are joined into one stream with the tokenizer's EOS token after each (when it has
    one), the stream is cut into pieces of `context - 1` tokens, and BOS is put in front of
    each piece, so every row starts with BOS and no text token is lost or repeated. Tokens left
    over at the end that do not fill a whole batch are dropped.
    """
    _check_sizes(context, batch_size)
    return _packed_batches(documents, tokenizer, bos_token_id, context, batch_size)


def _packed_batches(
    documents: Iterable[str], tokenizer: Any, bos_token_id: int, context: int, batch_size: int
) -> Iterator[Int[Tensor, "batch ctx"]]:
    eos_token_id = getattr(tokenizer, "eos_token_id", None)
    piece = context - 1  # text tokens per row, after BOS
    pending: list[int] = []  # tokenised text not yet in a row
    rows: list[Tensor] = []  # finished rows [n, context] not yet in a batch
    n_rows = 0
    for group in _groups(documents, DOCUMENTS_PER_TOKENIZER_CALL):
        for ids in _tokenize(tokenizer, group):
            pending.extend(ids)
            if eos_token_id is not None:
                pending.append(eos_token_id)
        n_new = len(pending) // piece
        if n_new == 0:
            continue
        text_BP = torch.tensor(pending[: n_new * piece], dtype=torch.long).view(n_new, piece)
        del pending[: n_new * piece]
        bos_B1 = torch.full((n_new, 1), bos_token_id, dtype=torch.long)
        rows.append(torch.cat([bos_B1, text_BP], dim=1))
        n_rows += n_new
        if n_rows < batch_size:
            continue
        all_rows = torch.cat(rows)
        n_full = n_rows // batch_size * batch_size
        yield from all_rows[:n_full].split(batch_size)
        rows = [all_rows[n_full:]]
        n_rows -= n_full


def _groups(items: Iterable[str], size: int) -> Iterator[list[str]]:
    group: list[str] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: long documents are expected here and are cut into rows afterwards, so the
    # "sequence longer than model_max_length" warning would be noise.
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return encoded["input_ids"]


def _check_sizes(context: int, batch_size: int) -> None:
    if context < 2:
        raise SaelabError(
            f"context is {context} but must be at least 2 (BOS plus one text token); "
            f"set a larger context"
        )
    if batch_size < 1:
        raise SaelabError(f"batch_size is {batch_size} but must be at least 1; set it to 1 or more")


class TokenBatches:
    """A resumable stream of `[batch_size, context]` token batches from a text spec.

    Iterating continues from the current position (iterating twice does not restart the
    stream), and stops when the text runs out. `batches_yielded` is that position: batches
    returned plus batches skipped, so a resumed run passes it back as `start_batch`.

    >>> batches = TokenBatches("default", tokenizer, context=64, batch_size=8, seed=0)
    >>> first = next(batches)            # LongTensor [8, 64]
    >>> resumed = TokenBatches("default", tokenizer, context=64, batch_size=8, seed=0,
    ...                        start_batch=batches.batches_yielded)

    Data-parallel training gives each of ``world_size`` processes every ``world_size``-th packed
    row, starting at row ``rank``: together the processes see exactly the rows of one process
    (row ``i`` goes to rank ``i mod world_size``), each in batches of ``batch_size`` rows, and
    ``batches_yielded`` counts this rank's batches. Every rank tokenises the whole text (cheap
    next to the model) so that the rows it keeps are cut exactly as in a single process.
    """

    def __init__(
        self,
        spec: str,
        tokenizer: Any,
        context: int = 128,
        batch_size: int = 32,
        seed: int = 0,
        bos_token_id: int | None = None,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_sizes(context, batch_size)
        if not 0 <= rank < world_size:
            raise SaelabError(f"rank is {rank} but must be in [0, world_size={world_size})")
        self.spec = spec
        self.tokenizer = tokenizer
        self.context = context
        self.batch_size = batch_size
        self.seed = seed
        self.bos_token_id = bos_token_id_of(tokenizer) if bos_token_id is None else bos_token_id
        self.rank = rank
        self.world_size = world_size
        self.batches_yielded = 0
        # The source is opened now so a wrong path or dataset name fails before a model loads;
        # tokenising starts only at the first batch.
        packed = pack_tokens(
            iter_documents(spec, seed),
            tokenizer,
            bos_token_id=self.bos_token_id,
            context=context,
            batch_size=batch_size * world_size,
        )
        # One packed batch of world_size × batch_size rows holds this rank's next batch_size
        # rows; a single process keeps the packed batches as they are.
        self._batches = (
            packed
            if world_size == 1
            else (rows_NP[rank::world_size].contiguous() for rows_NP in packed)
        )
        self._batches_to_discard = 0
        self.skip(start_batch)

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> Int[Tensor, "batch ctx"]:
        self._discard_skipped()
        batch = next(self._batches)  # StopIteration: the text has run out
        self.batches_yielded += 1
        return batch

    def skip(self, n_batches: int) -> TokenBatches:
        """Move the position `n_batches` batches on; returns self.

        The skipped batches are tokenised and discarded when the next batch is read, so
        skipping itself is instant.
        """
        if n_batches < 0:
            raise SaelabError(f"cannot skip {n_batches} batches; pass 0 or more")
        self._batches_to_discard += n_batches
        self.batches_yielded += n_batches
        return self

    def _discard_skipped(self) -> None:
        while self._batches_to_discard > 0:
            if next(self._batches, None) is None:
                raise SaelabError(
                    f"the text of {self.spec!r} ran out before batch {self.batches_yielded} "
                    f"while skipping to a resume position; resume with the same spec and seed"
                )
            self._batches_to_discard -= 1
