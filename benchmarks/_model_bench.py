"""What the benchmarks that time a model share (``actgen.py``, ``eval_speed.py``): the
``--model``/``--hook``/``--threads`` arguments, a quiet set-up that loads the model, and token
batches of the default text."""

from __future__ import annotations

import argparse
import logging

import torch
from transformers.utils import logging as hf_logging

from saelab.config import SAEConfig
from saelab.data.text import TokenBatches
from saelab.models.loading import load_model


def parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every model benchmark takes; each adds its own sizes."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--hook", default=SAEConfig().hook)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    return p


def load(args: argparse.Namespace):
    """``args.threads`` torch threads, warnings only, and the (model, tokenizer) of ``--model``."""
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING)
    return load_model(args.model)


def default_batches(
    tokenizer, n: int, *, context: int, batch_size: int, seed: int
) -> list[torch.Tensor]:
    """The first ``n`` token batches ``[batch_size, context]`` of the default text."""
    text = TokenBatches("default", tokenizer, context=context, batch_size=batch_size, seed=seed)
    return [next(text) for _ in range(n)]
