"""The language model's loss clean, with an SAE spliced in, and with the hook zero-ablated.

Replacement happens only at kept positions (not position 0 and not special tokens); losses and
KL are averaged over the positions that were replaced, as SAELens does, so an unspliced BOS
prediction cannot dilute the damage.

* ``ce_loss_recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)``
* ``delta_ce = CE_spliced − CE_clean``
* ``kl = E_t KL(p_clean ‖ p_spliced)``

Two ways to get there, equal up to float rounding:

* :func:`splice_batch`, the plain one: three full forward passes per batch (clean, spliced,
  ablated), each with its full ``[N, P, vocab]`` logits. It stays as the reference the fast path
  is tested against.
* What ``saelab eval`` runs (:func:`clean_outputs`, :func:`variant_outputs`,
  :func:`head_losses`): the blocks before a hook compute the same thing whatever is spliced in
  there, so only the clean pass runs them; every replaced variant (one per SAE and the zeros)
  runs from the block the hook's change first reaches (:func:`~saelab.models.hookpoints.
  residual_entry`), several variants stacked in one batch; the LM head, CE and KL are computed
  on chunks of the scored positions, so no ``[tokens, vocab]`` tensor is ever whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers import PreTrainedModel

from saelab.data.activations import special_token_ids, token_mask
from saelab.data.text import TokenBatches
from saelab.models.hookpoints import model_family, residual_entry
from saelab.models.intervene import capture, final_logits, patch, run_blocks_from

SUFFIX_TOKENS_PER_PASS = 8192
"""Tokens stacked into one pass from a hook on: as many variants of a batch as fit."""

LOGIT_CHUNK_ELEMENTS = 1 << 23
"""Logits (positions × vocabulary) computed at a time by :func:`head_losses` (32 MB float32)."""


@dataclass
class SpliceSums:
    """Running sums over evaluated positions."""

    n_positions: int = 0
    ce_clean: float = 0.0
    ce_spliced: float = 0.0
    ce_ablated: float = 0.0
    kl_spliced: float = 0.0
    kl_ablated: float = 0.0

    def add(
        self,
        scored_NP: Bool[Tensor, "N P"],
        ce_clean_NP: Float[Tensor, "N P"],
        ce_spliced_NP: Float[Tensor, "N P"],
        ce_ablated_NP: Float[Tensor, "N P"],
        kl_spliced_NP: Float[Tensor, "N P"],
        kl_ablated_NP: Float[Tensor, "N P"],
    ) -> None:
        """Add one batch's per-position losses at the ``scored_NP`` positions."""
        self.add_rows(
            ce_clean_NP[scored_NP],
            ce_spliced_NP[scored_NP],
            ce_ablated_NP[scored_NP],
            kl_spliced_NP[scored_NP],
            kl_ablated_NP[scored_NP],
        )

    def add_passes(
        self,
        keep_NP: Bool[Tensor, "N P"],
        tokens_NP: Int[Tensor, "N P"],
        clean_NPV: Float[Tensor, "N P V"],
        spliced_NPV: Float[Tensor, "N P V"],
        ablated_NPV: Float[Tensor, "N P V"],
    ) -> None:
        """Add one batch from the logits of its three full passes (clean, spliced, ablated),
        scored at the replaced positions ``keep_NP`` that have a next token."""
        self.add(
            scored_positions(keep_NP),
            next_token_ce(clean_NPV, tokens_NP),
            next_token_ce(spliced_NPV, tokens_NP),
            next_token_ce(ablated_NPV, tokens_NP),
            kl_per_position(clean_NPV, spliced_NPV),
            kl_per_position(clean_NPV, ablated_NPV),
        )

    def add_rows(
        self,
        ce_clean_T: Float[Tensor, " T"],
        ce_spliced_T: Float[Tensor, " T"],
        ce_ablated_T: Float[Tensor, " T"],
        kl_spliced_T: Float[Tensor, " T"],
        kl_ablated_T: Float[Tensor, " T"],
    ) -> None:
        """Add one batch's losses at its scored positions, already picked out (:meth:`add`
        with the mask applied)."""
        self.n_positions += ce_clean_T.shape[0]
        self.ce_clean += float(ce_clean_T.sum())
        self.ce_spliced += float(ce_spliced_T.sum())
        self.ce_ablated += float(ce_ablated_T.sum())
        self.kl_spliced += float(kl_spliced_T.sum())
        self.kl_ablated += float(kl_ablated_T.sum())

    def compute(self) -> dict[str, float]:
        n = max(self.n_positions, 1)
        clean, spliced, ablated = self.ce_clean / n, self.ce_spliced / n, self.ce_ablated / n
        denominator = ablated - clean
        return {
            "ce_loss_clean": clean,
            "ce_loss_spliced": spliced,
            "ce_loss_ablated": ablated,
            "ce_loss_recovered": (ablated - spliced) / denominator if denominator else float("nan"),
            "delta_ce": spliced - clean,
            "kl": self.kl_spliced / n,
            "kl_ablated": self.kl_ablated / n,
        }


def eval_batches(
    tokenizer,
    *,
    dataset: str,
    tokens: int,
    context: int,
    batch_size: int,
    seed: int,
    skip_positions: int,
    device: torch.device | str,
) -> tuple[int, Iterator[tuple[Int[Tensor, "N P"], Bool[Tensor, "N P"]]]]:
    """How many batches cover ``tokens`` and an iterator of them from ``dataset`` on ``device``:
    ``(tokens_NP, keep_NP)``, ``keep_NP`` the positions to replace (not the first
    ``skip_positions``, not special tokens). It stops early when the text runs out."""
    specials = special_token_ids(tokenizer)
    n_batches = max(1, math.ceil(tokens / (batch_size * context)))
    batches = TokenBatches(dataset, tokenizer, context=context, batch_size=batch_size, seed=seed)

    def batches_on_device() -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(n_batches):
            tokens_NP = next(batches, None)
            if tokens_NP is None:
                return
            tokens_NP = tokens_NP.to(device)
            yield tokens_NP, token_mask(tokens_NP, skip_positions, specials)

    return n_batches, batches_on_device()


def next_token_ce(
    logits_NPV: Float[Tensor, "N P V"], tokens_NP: Int[Tensor, "N P"]
) -> Float[Tensor, "N P"]:
    """CE of predicting token t+1 at position t; the last position gets 0 (nothing to predict)."""
    ce_NP = torch.zeros(tokens_NP.shape, dtype=torch.float32, device=logits_NPV.device)
    ce_NP[:, :-1] = F.cross_entropy(
        logits_NPV[:, :-1].flatten(0, 1).float(), tokens_NP[:, 1:].flatten(), reduction="none"
    ).view(tokens_NP.shape[0], -1)
    return ce_NP


def kl_per_position(
    clean_NPV: Float[Tensor, "N P V"], other_NPV: Float[Tensor, "N P V"]
) -> Float[Tensor, "N P"]:
    """KL(p_clean ‖ p_other) at each position."""
    log_p = clean_NPV.float().log_softmax(-1)
    log_q = other_NPV.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def scored_positions(keep_NP: Bool[Tensor, "N P"]) -> Bool[Tensor, "N P"]:
    """Positions replaced and with a next token to predict (the last column has none)."""
    scored_NP = keep_NP.clone()
    scored_NP[:, -1] = False
    return scored_NP


def clean_pass(
    model: PreTrainedModel, tokens_NP: Int[Tensor, "N P"], hooks: list[str]
) -> tuple[Float[Tensor, "N P V"], dict[str, Tensor]]:
    """One unmodified forward pass: its logits and the activations at every hook in ``hooks``."""
    with capture(model, hooks, stop=False) as acts:
        logits_NPV = model(tokens_NP, use_cache=False).logits
    return logits_NPV, dict(acts)


def replaced_logits(
    model: PreTrainedModel,
    tokens_NP: Int[Tensor, "N P"],
    hook: str,
    keep_NP: Bool[Tensor, "N P"],
    new_NPD: Tensor,
) -> Float[Tensor, "N P V"]:
    """Logits with ``hook``'s activation replaced by ``new_NPD`` at the kept positions."""
    with patch(model, {hook: _replace_at(keep_NP, new_NPD)}):
        return model(tokens_NP, use_cache=False).logits


def _replace_at(keep_NP: Bool[Tensor, "N P"], new_NPD: Tensor):
    def fn(act_NPD: Tensor) -> Tensor:
        return torch.where(keep_NP[..., None], new_NPD.to(act_NPD.dtype), act_NPD)

    return fn


@torch.no_grad()
def splice_batch(
    model: PreTrainedModel,
    hook: str,
    tokens_NP: Int[Tensor, "N P"],
    keep_NP: Bool[Tensor, "N P"],
    reconstruct,
    sums: SpliceSums,
    *,
    input_hook: str | None = None,
) -> Float[Tensor, "N P D"]:
    """Run the three passes on one batch, add to ``sums``; returns the clean activations.

    ``reconstruct`` maps raw activations ``[N, P, D]`` to their reconstruction in model units.
    With ``input_hook`` (a transcoder) it gets the activations at ``input_hook`` instead and
    returns a prediction of those at ``hook``, which is what is replaced and zero-ablated. The
    clean pass captures both: the spliced pass changes nothing before ``hook``, so an input hook
    that fires earlier sees exactly the clean activations there too.
    """
    hooks = [hook] if input_hook is None else [hook, input_hook]
    clean_NPV, acts = clean_pass(model, tokens_NP, hooks)
    x_NPD = acts[hook]
    recon_NPD = reconstruct(x_NPD if input_hook is None else acts[input_hook])
    spliced_NPV = replaced_logits(model, tokens_NP, hook, keep_NP, recon_NPD)
    ablated_NPV = replaced_logits(model, tokens_NP, hook, keep_NP, torch.zeros_like(x_NPD))
    sums.add_passes(keep_NP, tokens_NP, clean_NPV, spliced_NPV, ablated_NPV)
    return x_NPD


# ----- the shared-prefix path of ``saelab eval`` -------------------------------------------------


def skips_blocks(model: PreTrainedModel) -> bool:
    """Whether variants of ``model`` can run from a hook on and get their logits from the final
    hidden states (a family saelab has a table for); otherwise each variant is a full pass."""
    return model_family(model) is not None


def hook_entries(model: PreTrainedModel, hooks: list[str]) -> dict[str, tuple[int, bool]]:
    """Per splice hook, where its variants start: (block, whether the hook's activation is the
    residual entering it); (0, False), a full pass, for models without a table."""
    if not skips_blocks(model):
        return {hook: (0, False) for hook in hooks}
    return {hook: residual_entry(model, hook) for hook in hooks}


def entry_captures(entries: dict[str, tuple[int, bool]]) -> list[str]:
    """The residuals the clean pass must also capture: the stream entering each block where a
    hook inside it (not the residual itself) is replaced."""
    starts = {start for start, direct in entries.values() if start and not direct}
    return [f"blocks.{start}.hook_resid_pre" for start in sorted(starts)]


def clean_outputs(
    model: PreTrainedModel, tokens_NP: Int[Tensor, "N P"], hooks: list[str]
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clean pass: final hidden states ``[N, P, d_model]`` (logits ``[N, P, V]`` for a
    model without a table, see :func:`skips_blocks`) and the activations at ``hooks``."""
    with capture(model, hooks, stop=False) as acts:
        if skips_blocks(model):
            out_NPX = run_blocks_from(model, tokens_NP, 0)
        else:
            out_NPX = model(tokens_NP, use_cache=False).logits
    return out_NPX, dict(acts)


def variant_outputs(
    model: PreTrainedModel,
    tokens_NP: Int[Tensor, "N P"],
    hook: str,
    entry: tuple[int, bool],
    keep_NP: Bool[Tensor, "N P"],
    acts: dict[str, Tensor],
    news: list[Tensor],
) -> list[Tensor]:
    """What :func:`clean_outputs` gives, once per variant: ``hook``'s activation replaced by
    each of ``news`` (``[N, P, D]``) at the kept positions.

    Only the blocks from ``entry`` on run (the clean ones before compute the same thing for
    every variant); variants are stacked along the batch, up to
    :data:`SUFFIX_TOKENS_PER_PASS` tokens a pass.
    """
    start, direct = entry
    fast = skips_blocks(model)
    per_pass = max(1, SUFFIX_TOKENS_PER_PASS // tokens_NP.numel()) if fast else 1
    outs: list[Tensor] = []
    for first in range(0, len(news), per_pass):
        group = news[first : first + per_pass]
        m = len(group)
        ids_NP = tokens_NP.repeat(m, 1)
        replace = _replace_at(keep_NP.repeat(m, 1), torch.cat(group))
        if not fast:
            with patch(model, {hook: replace}):
                out_NPX = model(ids_NP, use_cache=False).logits
        elif direct and start:  # the replaced activation is the residual entering `start`
            out_NPX = run_blocks_from(model, ids_NP, start, replace(acts[hook].repeat(m, 1, 1)))
        else:
            residual = acts[f"blocks.{start}.hook_resid_pre"].repeat(m, 1, 1) if start else None
            out_NPX = run_blocks_from(model, ids_NP, start, residual, patches={hook: replace})
        outs.extend(out_NPX.chunk(m))
    return outs


def head_losses(
    model: PreTrainedModel,
    clean_NPX: Tensor,
    others: list[Tensor],
    tokens_NP: Int[Tensor, "N P"],
    scored_NP: Bool[Tensor, "N P"],
) -> tuple[Float[Tensor, " T"], list[Float[Tensor, " T"]], list[Float[Tensor, " T"]]]:
    """Next-token CE of the clean pass and of each of ``others``, and KL(clean ‖ other), at the
    ``T`` scored positions (in row-major order).

    The inputs are :func:`clean_outputs` / :func:`variant_outputs` outputs: final hidden states,
    turned into logits here, :data:`LOGIT_CHUNK_ELEMENTS` at a time (or logits already).
    """
    targets_NP = torch.zeros_like(tokens_NP)
    targets_NP[:, :-1] = tokens_NP[:, 1:]
    targets_T1 = targets_NP[scored_NP][:, None]
    clean_TX = clean_NPX[scored_NP]
    others_TX = [other[scored_NP] for other in others]
    fast = skips_blocks(model)
    vocab = model.get_output_embeddings().weight.shape[0] if fast else clean_NPX.shape[-1]

    def log_probs(rows: Tensor) -> Tensor:
        return (final_logits(model, rows) if fast else rows).float().log_softmax(-1)

    n = clean_TX.shape[0]
    ce_clean_T = torch.zeros(n, device=clean_TX.device)
    ce = [torch.zeros_like(ce_clean_T) for _ in others]
    kl = [torch.zeros_like(ce_clean_T) for _ in others]
    step = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
    for a in range(0, n, step):
        b = min(a + step, n)
        log_p = log_probs(clean_TX[a:b])
        ce_clean_T[a:b] = -log_p.gather(1, targets_T1[a:b]).squeeze(1)
        p = log_p.exp()
        for j, other_TX in enumerate(others_TX):
            log_q = log_probs(other_TX[a:b])
            ce[j][a:b] = -log_q.gather(1, targets_T1[a:b]).squeeze(1)
            kl[j][a:b] = (p * (log_p - log_q)).sum(-1)
    return ce_clean_T, ce, kl
