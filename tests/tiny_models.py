"""Tiny random Hugging Face models built from configs, one per supported family.

Shared by every test directory (`from tiny_models import build_tiny_model`); nothing is
downloaded. Widths are chosen so that d_model, d_mlp and n_heads * d_head all differ where the
family allows it, which makes a hook that reports the wrong width fail loudly.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

FAMILIES: tuple[str, ...] = ("gpt2", "gpt_neox", "llama", "gemma", "gemma2")
"""The `config.model_type` of each tiny model, in the order tests are parametrised."""

VOCAB_SIZE = 256
N_LAYERS = 3
D_MODEL = 64


def tiny_config(family: str) -> PretrainedConfig:
    """The config of the tiny model of `family` (a `config.model_type`)."""
    if family == "gpt2":
        # n_inner=None means 4 * n_embd, the real GPT-2 default.
        return GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_positions=64,
            n_embd=D_MODEL,
            n_layer=N_LAYERS,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
    if family == "gpt_neox":
        # Pythia-style parallel residual: attention and MLP both read the block input.
        return GPTNeoXConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=D_MODEL,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            intermediate_size=160,
            max_position_embeddings=64,
            use_parallel_residual=True,
        )
    # Llama-like families: grouped-query attention (as in SmolLM2) and a head width that is not
    # d_model / n_heads, so attn.hook_z is wider than the residual stream.
    common = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": D_MODEL,
        "intermediate_size": 96,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "max_position_embeddings": 64,
    }
    if family == "llama":
        return LlamaConfig(**common)
    if family == "gemma":
        return GemmaConfig(**common)
    if family == "gemma2":
        return Gemma2Config(**common, sliding_window=4, query_pre_attn_scalar=24)
    raise ValueError(f"no tiny model for family {family!r}; known: {FAMILIES}")


def build_tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM of `family`, in eval mode, the same for the same seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    # Random init leaves RMSNorm weights at exactly 0 or 1; perturb every parameter so that no
    # norm or bias is an identity that would hide a hook attached to the wrong module.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def tiny_input_ids(batch: int = 2, pos: int = 7, seed: int = 1) -> torch.Tensor:
    """Random token ids `[batch, pos]` valid for every tiny model."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (batch, pos), generator=generator)


def build_tiny_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `VOCAB_SIZE` words "w3" .. "w255".

    Ids 0, 1, 2 are `<unk>`, `<bos>` (left undeclared when `bos` is False) and `<eos>`. It has no
    pad token and adds no special tokens, like SmolLM2's.
    """
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2} | {f"w{i}": i for i in range(3, VOCAB_SIZE)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"bos_token": "<bos>"} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", **special
    )
