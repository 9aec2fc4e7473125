"""Steering a model while it scores or generates: a vector added at a hook, inside a `with`.

Positions (:data:`~saelab.analysis.steering.config.STEERING_POSITIONS`) are absolute indices in
the sequence, BOS at 0:

* ``all``: every position but BOS (``h[t] += c·v`` for t ≥ 1);
* ``after_prompt``: positions t ≥ prompt length, i.e. the tokens the model writes (CAA's rule).
  The first of them is predicted *from* the last prompt position, which is not steered, so a
  one-token completion's probability does not move; ``all`` moves it;
* ``front``: an ActAdd vector ``[T, D]``, row t added at position t + 1.

With a KV cache, each generation step's forward pass sees only its new positions; the steering
reads the cache's length before each pass to know where those positions are, so generating with a
cache and recomputing the whole sequence at each step steer the same tokens.

``sae-clamp`` vectors set feature i to ``c·u`` with the error term kept:
``h ← h + (c·u − f_i(h))·d_i`` (so coefficient 0 ablates the feature; the clean model is the
baseline, not coefficient 0).

Example:
    >>> with steer(model, vector, 4.0):
    ...     logits = model(input_ids).logits
    >>> text = generate(model, tokenizer, "I think that", Steering(vector, 4.0))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedModel

from saelab.analysis.steering.config import STEERING_POSITIONS
from saelab.analysis.steering.data import pad_id, prompt_ids
from saelab.analysis.steering.vectors import SteeringVector, check_fits
from saelab.errors import SaelabError
from saelab.models.intervene import patch


def default_positions(vector: SteeringVector) -> str:
    """``front`` for a per-position (ActAdd) vector, else ``all``."""
    return "front" if vector.per_position else "all"


def check_positions(vector: SteeringVector, positions: str) -> None:
    if positions not in STEERING_POSITIONS:
        raise SaelabError(
            f"positions must be one of {', '.join(STEERING_POSITIONS)}, got {positions!r}"
        )
    if vector.per_position != (positions == "front"):
        raise SaelabError(
            "an ActAdd vector (one row per position) is added front-aligned: use positions "
            "'front' with it, and 'all' or 'after_prompt' with one-row vectors"
            if vector.per_position
            else f"positions 'front' needs an ActAdd vector; this one is {vector.method}"
        )


@dataclass(frozen=True)
class Steering:
    """One intervention: ``vector`` times ``coef`` at ``positions`` of ``hook``.

    ``hook`` defaults to the vector's own; another hook of the same width moves it (transfer).
    """

    vector: SteeringVector
    coef: float
    positions: str | None = None
    hook: str | None = None

    def applied(
        self, model: PreTrainedModel, prompt_lens: int | Tensor | None = None
    ) -> contextlib.AbstractContextManager[None]:
        return steer(
            model,
            self.vector,
            self.coef,
            positions=self.positions,
            hook=self.hook,
            prompt_lens=prompt_lens,
        )


class _Offsets:
    """The absolute position of the first token of the forward pass under way.

    Read from the KV cache the model is given (its length before the pass): 0 without one.
    """

    def __init__(self) -> None:
        self.start = 0

    def before_forward(self, _: Any, args: tuple, kwargs: dict) -> None:
        # transformers 5 calls it `cache`; earlier versions `past_key_values`.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.start = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0


@contextmanager
def steer(
    model: PreTrainedModel,
    vector: SteeringVector,
    coef: float,
    *,
    positions: str | None = None,
    hook: str | None = None,
    prompt_lens: int | Int[Tensor, " batch"] | None = None,
) -> Iterator[None]:
    """Add ``coef · vector`` at ``hook`` (default: the vector's) during the forward passes in
    the block, at ``positions`` (default :func:`default_positions`); ``after_prompt`` needs the
    prompt length (BOS included), one int or one per row.

    Example:
        >>> with steer(model, vector, 8.0, positions="after_prompt", prompt_lens=5):
        ...     out = model.generate(input_ids, max_new_tokens=20)
    """
    positions = positions or default_positions(vector)
    check_positions(vector, positions)
    if positions == "after_prompt" and prompt_lens is None:
        raise SaelabError("positions 'after_prompt' needs the prompt length (prompt_lens)")
    hook = check_fits(model, vector, hook)
    offsets = _Offsets()
    edit = _clamp_edit if vector.is_clamp else _add_edit

    def steered(act_BPD: Tensor) -> Tensor:
        pos_P = offsets.start + torch.arange(act_BPD.shape[1], device=act_BPD.device)
        return edit(act_BPD, pos_P, vector, coef, positions, prompt_lens)

    with ExitStack() as stack:
        handle = model.register_forward_pre_hook(offsets.before_forward, with_kwargs=True)
        stack.callback(handle.remove)
        stack.enter_context(patch(model, {hook: steered}))
        yield


def _mask(act_BPD: Tensor, pos_P: Tensor, positions: str, prompt_lens: Any) -> Tensor:
    """``[B, P]`` True where a one-row vector is added."""
    if positions == "all":
        return (pos_P >= 1)[None].expand(act_BPD.shape[0], -1)
    lens_B = torch.as_tensor(prompt_lens, device=act_BPD.device).reshape(-1, 1)
    return (pos_P[None] >= lens_B).expand(act_BPD.shape[0], -1)


def _add_edit(
    act_BPD: Tensor,
    pos_P: Tensor,
    vector: SteeringVector,
    coef: float,
    positions: str,
    prompt_lens: Any,
) -> Tensor:
    v = vector.vector.to(act_BPD.device, act_BPD.dtype)
    if positions == "front":
        row_P = pos_P - 1
        inside_P = (row_P >= 0) & (row_P < v.shape[0])
        delta_PD = torch.zeros(act_BPD.shape[1:], dtype=act_BPD.dtype, device=act_BPD.device)
        delta_PD[inside_P] = v[row_P[inside_P]]
        return act_BPD + coef * delta_PD
    scale_BP = coef * _mask(act_BPD, pos_P, positions, prompt_lens).to(act_BPD.dtype)
    return act_BPD + scale_BP[..., None] * v


def _clamp_edit(
    act_BPD: Tensor,
    pos_P: Tensor,
    vector: SteeringVector,
    coef: float,
    positions: str,
    prompt_lens: Any,
) -> Tensor:
    sae, feature = vector.sae, int(vector.source["feature"])
    if sae is None:
        raise SaelabError("this sae-clamp vector has no SAE; load it with load_vector")
    value = coef * float(vector.source.get("unit_scale", 1.0))
    with torch.no_grad():
        f_BP = sae.encode(act_BPD)[..., feature].to(act_BPD.dtype)
    mask_BP = _mask(act_BPD, pos_P, positions, prompt_lens).to(act_BPD.dtype)
    d_D = vector.vector.to(act_BPD.device, act_BPD.dtype)
    return act_BPD + ((value - f_BP) * mask_BP)[..., None] * d_D


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    input_ids: Int[Tensor, "1 P"],
    steering: Steering | None = None,
    *,
    max_new_tokens: int = 30,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    pad_token_id: int | None = None,
) -> Int[Tensor, "1 P_out"]:
    """``model.generate`` (KV cache, greedy unless ``sample``) on one prompt, steered from its
    first position; the prompt length for ``after_prompt`` is ``input_ids``' length."""
    context = steering.applied(model, input_ids.shape[1]) if steering else contextlib.nullcontext()
    options: dict[str, Any] = {"do_sample": sample}
    if sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # a checkpoint's sampling defaults would only earn warnings under greedy decoding
        options.update(temperature=None, top_p=None, top_k=None)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    with context, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            **options,
        )


def generate(
    model: PreTrainedModel,
    tokenizer: Any,
    prompt: str,
    steering: Steering | None = None,
    **options: Any,
) -> str:
    """The continuation of ``prompt`` (BOS-prefixed) under ``steering``; options as for
    :func:`generate_ids`.

    Example:
        >>> generate(model, tokenizer, "My favourite animal is", Steering(vector, 6.0))
    """
    ids, _ = prompt_ids(tokenizer, prompt)
    input_ids = torch.tensor([ids])
    out = generate_ids(model, input_ids, steering, pad_token_id=pad_id(tokenizer), **options)
    return tokenizer.decode(out[0, len(ids) :].cpu(), skip_special_tokens=True)
