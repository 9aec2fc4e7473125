"""Fixtures shared by every test directory. Model builders live in `tiny_models.py`."""

import random

import pytest
from transformers import PreTrainedModel

from tiny_models import FAMILIES, VOCAB_SIZE, build_tiny_model


@pytest.fixture(params=FAMILIES)
def tiny_model(request: pytest.FixtureRequest) -> PreTrainedModel:
    """A fresh tiny random causal LM of each supported family in turn (eval mode)."""
    return build_tiny_model(request.param)


@pytest.fixture(scope="session")
def words_file(tmp_path_factory: pytest.TempPathFactory):
    """A .txt corpus of 300 documents of 400 random words that the tiny tokenizer knows."""
    rng = random.Random(0)
    docs = [" ".join(f"w{rng.randrange(3, VOCAB_SIZE)}" for _ in range(400)) for _ in range(300)]
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text("\n\n".join(docs))
    return path
