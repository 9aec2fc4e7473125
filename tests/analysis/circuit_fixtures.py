"""Shared pieces of the circuit tests: a tiny model with SAEs, a generic task on its tokenizer."""

from __future__ import annotations

import random

import torch

from saelab.analysis.circuits.spliced import SplicedModel
from saelab.analysis.circuits.tasks import Task, tokenize_task
from saelab.config import SAEConfig
from saelab.saes import ReLUSAE, TopKSAE
from tiny_models import D_MODEL, VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


def word(rng: random.Random) -> str:
    return f"w{rng.randrange(3, VOCAB_SIZE)}"


def words_task(n: int = 4, *, corrupted: bool = True, seed: int = 0) -> Task:
    """Prompts of 3 to 8 random words (unequal lengths), random answers, same-length twins."""
    rng = random.Random(seed)
    prompts, twins = [], []
    for i in range(n):
        length = 3 + (i * 3) % 6
        prompts.append(" ".join(word(rng) for _ in range(length)))
        twins.append(" ".join(word(rng) for _ in range(length)))
    return Task(
        name="words",
        prompts=tuple(prompts),
        correct=tuple(word(rng) for _ in range(n)),
        incorrect=tuple(word(rng) for _ in range(n)),
        corrupted=tuple(twins) if corrupted else None,
    )


def make_saes(architecture: str = "topk", hooks=HOOKS, seed: int = 0):
    """Random SAEs with non-trivial biases, so that no feature and no error term is zero."""
    saes = []
    for i, hook in enumerate(hooks):
        if architecture == "topk":
            sae = TopKSAE(SAEConfig(hook=hook, k=6, expansion=2), d_in=D_MODEL, seed=seed + i)
        else:
            sae = ReLUSAE(
                SAEConfig(hook=hook, architecture="relu", expansion=2), d_in=D_MODEL, seed=seed + i
            )
        g = torch.Generator().manual_seed(100 + seed + i)
        with torch.no_grad():
            sae.b_enc.copy_(0.1 * torch.randn(sae.d_sae, generator=g))
            sae.b_dec.copy_(0.1 * torch.randn(D_MODEL, generator=g))
        saes.append(sae.eval().requires_grad_(False))
    return saes


def setup(
    family: str = "llama",
    architecture: str = "topk",
    hooks=HOOKS,
    dtype: torch.dtype = torch.float32,
    corrupted: bool = True,
    n: int = 4,
):
    """(spliced model, batch) on a tiny model of `family`."""
    model = build_tiny_model(family).to(dtype).requires_grad_(False)
    saes = [sae.to(dtype) for sae in make_saes(architecture, hooks)]
    batch = tokenize_task(words_task(n, corrupted=corrupted), build_tiny_tokenizer())
    return SplicedModel(model, saes), batch
