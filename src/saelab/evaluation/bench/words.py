"""Word tokens of a model's own vocabulary: single tokens that are a space and a lower-case
ASCII word (``" house"``), the material of the first-letter tasks (absorption, probing)."""

from __future__ import annotations

import random
import string
from typing import Any

from saelab.errors import SaelabError

LETTERS = string.ascii_lowercase


def word_tokens(tokenizer: Any, *, min_length: int = 3) -> dict[str, int]:
    """``{word: token id}`` for every token that decodes to ``" " + word`` with ``word`` lower-case
    ASCII letters, at least ``min_length`` of them, in id order. One-line error when the
    tokenizer has none (a word-level toy vocabulary, say)."""
    vocab = tokenizer.get_vocab()
    candidates = []
    for piece, token_id in vocab.items():
        # Byte-level BPE marks a leading space with "Ġ", SentencePiece with "▁".
        if piece[:1] in ("Ġ", "▁"):
            word = piece[1:]
            if len(word) >= min_length and word.isascii() and word.isalpha() and word.islower():
                candidates.append((token_id, word))
    found: dict[str, int] = {}
    for token_id, word in sorted(candidates):
        if tokenizer.decode([token_id]) == " " + word and word not in found:
            found[word] = token_id
    if not found:
        raise SaelabError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has no "
            "single-token words (' word'); the first-letter tasks need a subword vocabulary"
        )
    return found


def sample_words(words: dict[str, int], n: int, seed: int) -> list[str]:
    """``n`` of ``words`` (all when fewer), drawn with ``seed``, in a fixed order."""
    names = sorted(words)
    rng = random.Random(seed)
    return sorted(rng.sample(names, min(n, len(names))))
