"""Fixtures shared by every test directory. Model builders live in `tiny_models.py`."""

import random

import pytest
import torch
from transformers import PreTrainedModel

from tiny_models import FAMILIES, VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a loaded machine OpenMP threads spin-wait
    for each other (measured up to 15× slower). Modules opt in with
    ``pytest.mark.usefixtures("one_thread")``; the thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Llama and its tokenizer saved as a local model folder (for the CLI)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama").save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path
