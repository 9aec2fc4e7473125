"""Activations from a running model: tokens → one forward pass → ``{hook: [batch, d_in]}``.

:class:`ActivationStream` runs the model on packed token batches, captures every requested hook in
the same forward pass (stopping after the deepest one), drops position 0 (BOS, an attention-sink
outlier whose norm dwarfs the rest) and any other special tokens, scales each hook's activations
by one dataset-wide scalar so that E‖x‖ = √d_in, and serves shuffled batches from a buffer that
is refilled when half of it has been served.

Its ``state_dict`` (buffer, pending rows, RNG, token position, scales) makes resumes exact.

In data-parallel training each process has its own stream over its share of the text
(``TokenBatches(rank=, world_size=)``); ``sum_over_ranks`` sums the norm statistics over the
processes, so every process gets the one scale of all their first rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from saelab.data.scale import activation_scale, norm_sum
from saelab.data.shuffle import ShuffleBuffer
from saelab.errors import SaelabError
from saelab.models.intervene import run_to_hooks

log = logging.getLogger(__name__)


def special_token_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sorted(i for i in ids if i is not None)


def token_mask(
    tokens_NP: Int[Tensor, "N P"], skip_positions: int, special_ids: list[int]
) -> torch.BoolTensor:
    """True where a position's activation is kept: not in the first ``skip_positions`` and
    not a special token (BOS, EOS, padding)."""
    keep_NP = torch.ones_like(tokens_NP, dtype=torch.bool)
    keep_NP[:, :skip_positions] = False
    if special_ids:
        keep_NP &= ~torch.isin(tokens_NP, torch.tensor(special_ids, device=tokens_NP.device))
    return keep_NP


@torch.no_grad()
def model_activations(
    model: PreTrainedModel,
    tokens_NP: Int[Tensor, "N P"],
    hooks: list[str],
    keep_NP: torch.BoolTensor,
) -> dict[str, Float[Tensor, "T D"]]:
    """Kept positions' activations for each hook, flattened to ``[tokens, d]``, float32."""
    device = next(model.parameters()).device
    acts = run_to_hooks(model, tokens_NP.to(device), hooks)
    keep = keep_NP.to(device)
    return {hook: acts[hook][keep].float() for hook in hooks}


class ActivationStream:
    """Shuffled, normalised activation batches for one or several hooks of one model.

    Example::

        tokens = TokenBatches("default", tokenizer, context=128, batch_size=32)
        stream = ActivationStream(model, tokens, ["blocks.6.hook_resid_post"], batch_size=4096)
        batch = next(iter(stream))["blocks.6.hook_resid_post"]   # [4096, 576], E‖x‖ ≈ 24
    """

    def __init__(
        self,
        model: PreTrainedModel,
        token_batches: Any,
        hooks: list[str],
        *,
        batch_size: int = 4096,
        buffer_size: int = 65_536,
        skip_positions: int = 1,
        special_ids: list[int] | None = None,
        norm_estimate_tokens: int = 32_768,
        scales: dict[str, float] | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        sum_over_ranks: Callable[[Tensor], Tensor] | None = None,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.token_batches = token_batches
        self.hooks = list(hooks)
        self.batch_size = batch_size
        self.skip_positions = skip_positions
        if special_ids is None:
            tokenizer = getattr(token_batches, "tokenizer", None)
            special_ids = special_token_ids(tokenizer) if tokenizer is not None else []
        self.special_ids = special_ids
        self.norm_estimate_tokens = norm_estimate_tokens
        self.sum_over_ranks = sum_over_ranks
        """Sums a tensor over the data-parallel processes (None: this process alone)."""
        self.scales: dict[str, float] = dict(scales or {})
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.buffer = ShuffleBuffer(batch_size, buffer_size, seed, self.device)
        """Normalised rows waiting to be served, shuffled."""
        self.progress = progress
        """Show a bar while the buffer is (re)filled: the model runs, nothing else moves."""
        self._tokens_iter: Iterator[Tensor] | None = None
        self._pending: dict[str, Tensor] = {}

    # ----- filling ----------------------------------------------------------------------------

    def _tokens(self) -> Iterator[Tensor]:
        if self._tokens_iter is None:
            self._tokens_iter = iter(self.token_batches)
        return self._tokens_iter

    def _next_rows(self, n: int) -> dict[str, Tensor]:
        """``n`` fresh activation rows per hook (raw model units), running the model as needed."""
        chunks = {h: [self._pending[h]] if h in self._pending else [] for h in self.hooks}
        have = chunks[self.hooks[0]][0].shape[0] if chunks[self.hooks[0]] else 0
        bar = tqdm(
            total=n,
            initial=min(have, n),
            desc="activations" if not self.buffer.rows else "refill",
            unit="row",
            unit_scale=True,
            leave=False,
            dynamic_ncols=True,
            disable=not self.progress or have >= n,
        )
        with bar:
            while have < n:
                tokens_NP = next(self._tokens(), None)
                if tokens_NP is None:
                    raise SaelabError(
                        "the text ran out while filling the activation buffer; use a larger "
                        "dataset, fewer --tokens or a smaller buffer"
                    )
                keep_NP = token_mask(tokens_NP, self.skip_positions, self.special_ids)
                acts = model_activations(self.model, tokens_NP, self.hooks, keep_NP)
                for hook in self.hooks:
                    chunks[hook].append(acts[hook].to(self.device))
                kept = int(keep_NP.sum())
                bar.update(min(kept, n - have))
                have += kept
        rows, self._pending = {}, {}
        for hook in self.hooks:
            joined = torch.cat(chunks[hook])
            rows[hook], self._pending[hook] = joined[:n], joined[n:]
        return rows

    def _estimate_scales(self, rows: dict[str, Tensor]) -> None:
        hooks = [hook for hook in self.hooks if hook not in self.scales]
        if not hooks:
            return
        # Σ‖x‖ and the row count of each hook; summed over the processes of a data-parallel
        # run, they give every process the same scale.
        first = [rows[hook][: self.norm_estimate_tokens] for hook in hooks]
        sums_H2 = torch.tensor([[norm_sum(r), r.shape[0]] for r in first], dtype=torch.float64)
        if self.sum_over_ranks is not None:
            sums_H2 = self.sum_over_ranks(sums_H2)
        for hook, (total, count) in zip(hooks, sums_H2.tolist(), strict=True):
            self.scales[hook] = activation_scale(total, count, rows[hook].shape[-1], hook)
            log.info("activation scale for %s: %.4g", hook, self.scales[hook])

    def _refill(self) -> None:
        rows = self._next_rows(self.buffer.space())
        if not self.buffer.rows:
            self._estimate_scales(rows)
        # In place: the rows are this refill's own (the pending rest is a separate slice).
        self.buffer.refill({h: rows[h].mul_(self.scales[h]) for h in self.hooks})

    # ----- serving ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Float[Tensor, "B D"]]]:
        while True:
            if self.buffer.due:
                self._refill()
            yield self.buffer.take(self.batch_size)

    def first_rows(self, n: int) -> dict[str, Tensor]:
        """Raw (unscaled) activations without disturbing the stream: for quick checks."""
        return self._next_rows(n)

    # ----- resume -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "hooks": self.hooks,
            "scales": dict(self.scales),
            **self.buffer.state_dict(),  # buffer, served, generator
            "pending": {h: p.cpu() for h, p in self._pending.items()},
            "token_batches": int(self.token_batches.batches_yielded),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["hooks"]) != self.hooks:
            raise SaelabError(
                f"checkpoint stream has hooks {state['hooks']}, this run has {self.hooks}"
            )
        self.scales = {h: float(s) for h, s in state["scales"].items()}
        self.buffer.load_state_dict(state)
        self._pending = {h: p.to(self.device) for h, p in state["pending"].items()}
        self.token_batches.skip(int(state["token_batches"]) - self.token_batches.batches_yielded)
        self._tokens_iter = None
