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


CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--window-size=1280,900",
)
"""Flags of the headless Chromium that browser tests drive (as the dashboard's tests do)."""


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's ``chromium`` and ``chromium-driver``, ``make browser``) driven
    by Selenium for a test module, its console log kept (``driver.get_log("browser")``)."""
    import shutil
    from pathlib import Path

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(chromium).exists() and Path(driver_path).exists()):
        pytest.fail(
            "headless Chromium is missing: run `make browser` (apt-get install chromium "
            "chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to see script errors
    # An explicit driver path: Selenium Manager never tries to download a browser or driver.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()
