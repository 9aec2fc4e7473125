"""What steering reads: contrastive prompt pairs, BOS-prefixed prompts, and text cut into rows.

Every sequence steering builds starts with BOS, like the packed training data, and prompts and
completions are tokenised separately and joined, so a completion's tokens are the same whether it
is used to build a vector or scored.

Example:
    >>> pairs = read_pairs("pairs.jsonl")          # [ContrastPair(prompt, positive, negative)]
    >>> rows = read_text_rows("default", tokenizer, tokens=2048, context=128)
    >>> rows.ids_NP.shape, int(rows.keep_NP.sum())  # (n_rows, <= 128), 2048
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from saelab.data.activations import special_token_ids, token_mask
from saelab.data.text import iter_documents
from saelab.errors import SaelabError
from saelab.models.loading import bos_token_id

log = logging.getLogger(__name__)

PAIR_KEYS = (("positive", "negative"), ("target", "contrast"))
"""Accepted names of a pair's two completions: CAA's, or the scoring file's."""
_DOCUMENTS_PER_CALL = 64  # documents per tokenizer call (one call per document is slower)


@dataclass(frozen=True)
class ContrastPair:
    """A prompt with a completion to steer towards and one to steer away from."""

    prompt: str
    positive: str
    """Built from: the behaviour wanted (CAA); scored as the target completion."""
    negative: str
    """Built from: the behaviour not wanted (CAA); scored as the contrast completion."""


def read_pairs(path: str | Path) -> list[ContrastPair]:
    """Pairs from a .jsonl file of ``{"prompt", "positive", "negative"}`` (or ``"target"``,
    ``"contrast"``) lines. Blank lines are skipped; anything else gives a one-line error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SaelabError(f"no such file: {path}; pass a .jsonl file of prompt pairs")
    pairs = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    pairs.append(_pair_of(_json_line(line, path, number), path, number))
    except UnicodeDecodeError as e:
        raise SaelabError(
            f"{path} is not UTF-8 text (byte {e.start}); pass a .jsonl file"
        ) from None
    if not pairs:
        raise SaelabError(f"{path} holds no pairs; write one JSON object per line")
    return pairs


def _json_line(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise SaelabError(
            f"{path}:{number} is not valid JSON ({e.msg}); write one object per line"
        ) from None


def _pair_of(record: Any, path: Path, number: int) -> ContrastPair:
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        for good, bad in PAIR_KEYS:
            if isinstance(record.get(good), str) and isinstance(record.get(bad), str):
                return ContrastPair(record["prompt"], record[good], record[bad])
    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
    raise SaelabError(
        f"{path}:{number} needs string fields prompt, positive, negative (or prompt, target, "
        f"contrast); it has: {keys}"
    )


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, prompt: str, completion: str = "") -> tuple[list[int], int]:
    """``[BOS] + prompt + completion`` ids and the prompt's length (BOS included)."""
    ids = [bos_token_id(tokenizer), *encode(tokenizer, prompt)]
    return ids + encode(tokenizer, completion), len(ids)


def pad_id(tokenizer: Any) -> int:
    """The id right-padding uses; padded positions are masked out of every result."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, bos_token_id(tokenizer)):
        if token_id is not None:
            return int(token_id)
    return 0  # pragma: no cover - bos_token_id raises first


def right_pad(
    sequences: Sequence[Sequence[int]], pad: int
) -> tuple[Int[Tensor, "N P"], Int[Tensor, " N"]]:
    """Sequences padded on the right to one length, and their lengths. Causal attention means a
    real position never sees the padding after it, so its activations are those of the sequence
    alone."""
    lengths_N = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids_NP = torch.full((len(sequences), int(lengths_N.max())), pad, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids_NP[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids_NP, lengths_N


def length_mask(lengths_N: Int[Tensor, " N"], width: int) -> Bool[Tensor, "N P"]:
    """True at the real (not padded) positions of right-padded rows."""
    return torch.arange(width, device=lengths_N.device)[None] < lengths_N[:, None]


@dataclass
class TextRows:
    """Text as BOS-prefixed rows, right-padded, and which positions count."""

    ids_NP: Int[Tensor, "N P"]
    lengths_N: Int[Tensor, " N"]
    keep_NP: Bool[Tensor, "N P"]
    """Positions whose activations and predictions count: not BOS, not padding, not special."""
    source: str
    """The text spec (or ``"<N texts>"``) the rows came from."""

    @property
    def n_tokens(self) -> int:
        return int(self.keep_NP.sum())

    def batches(self, rows: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(ids_NP, lengths_N, keep_NP)`` of ``rows`` rows at a time, trimmed to their width."""
        for start in range(0, self.ids_NP.shape[0], rows):
            lengths_N = self.lengths_N[start : start + rows]
            width = int(lengths_N.max())
            yield (
                self.ids_NP[start : start + rows, :width],
                lengths_N,
                self.keep_NP[start : start + rows, :width],
            )


def read_text_rows(
    source: str | Sequence[str],
    tokenizer: Any,
    *,
    tokens: int,
    context: int = 128,
    seed: int = 0,
) -> TextRows:
    """``tokens`` text tokens from ``source`` as rows of at most ``context`` tokens (BOS first).

    ``source`` is a text spec (``default``, a .txt/.jsonl/.parquet file or folder, a hub
    dataset; shuffled by ``seed``) or a list of strings (used in order). Each document is cut
    into rows of ``context - 1`` tokens, each behind its own BOS, so short texts lose nothing;
    the last row is cut so that exactly ``tokens`` tokens are read, unless the text runs out
    first (``n_tokens`` says how many were read).
    """
    if context < 2:
        raise SaelabError(f"context is {context} but must be at least 2 (BOS plus one token)")
    documents = iter(source) if not isinstance(source, str) else iter_documents(source, seed)
    label = source if isinstance(source, str) else f"<{len(source)} texts>"
    bos, piece = bos_token_id(tokenizer), context - 1
    rows: list[list[int]] = []
    left = tokens
    for ids in _tokenised(documents, tokenizer):
        for start in range(0, len(ids), piece):
            chunk = ids[start : start + min(piece, left)]
            rows.append([bos, *chunk])
            left -= len(chunk)
            if left == 0:
                break
        if left == 0:
            break
    if not rows:
        raise SaelabError(f"no text came from {label!r}; pass a text source with some text in it")
    if left > 0:  # expected of a short file or list of texts; the count is recorded anyway
        log.info("%s ran out after %d of %d tokens", label, tokens - left, tokens)
    ids_NP, lengths_N = right_pad(rows, pad_id(tokenizer))
    keep_NP = token_mask(ids_NP, 1, special_token_ids(tokenizer))
    keep_NP &= length_mask(lengths_N, ids_NP.shape[1])
    return TextRows(ids_NP, lengths_N, keep_NP, label)


def _tokenised(documents: Iterable[str], tokenizer: Any) -> Iterator[list[int]]:
    """Token ids of each document, the tokenizer called on a group of documents at a time."""
    group: list[str] = []
    for document in documents:
        group.append(document)
        if len(group) == _DOCUMENTS_PER_CALL:
            yield from _encode_all(tokenizer, group)
            group = []
    if group:
        yield from _encode_all(tokenizer, group)


def _encode_all(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: long documents are expected; they are cut into rows afterwards.
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return encoded["input_ids"]
