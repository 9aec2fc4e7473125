"""A graph's prompt as model input: BOS-prefixed token ids, checked against the context."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from saelab.errors import SaelabError
from saelab.models.loading import bos_token_id


def context_length(model: PreTrainedModel) -> int | None:
    """The model's context (positions it was built for), or None when its config says none."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_input_ids(model: PreTrainedModel, tokenizer: Any, prompt: str) -> Tensor:
    """``[1, P]``: BOS then the prompt's tokens (no other special tokens); one-line errors for
    an empty prompt or one longer than the model's context."""
    if not prompt.strip():
        raise SaelabError("the prompt is empty; pass --prompt with some text")
    ids = [bos_token_id(tokenizer), *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    context = context_length(model)
    if context is not None and len(ids) > context:
        raise SaelabError(
            f"the prompt is {len(ids)} tokens (with BOS) but the model's context is {context}; "
            "shorten the prompt"
        )
    device = next(model.parameters()).device
    return torch.tensor([ids], dtype=torch.long, device=device)


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token id decoded on its own (the text it adds)."""
    return [tokenizer.decode([i]) for i in ids]
