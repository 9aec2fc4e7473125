"""The language model's loss clean, with an SAE spliced in, and with the hook zero-ablated.

For each token batch three full forward passes run (the LM head is needed for CE): clean (which
also captures the hook's activations), spliced (activations replaced by the SAE reconstruction)
and ablated (replaced by zeros). Replacement happens only at kept positions (not position 0 and
not special tokens); losses and KL are averaged over the positions that were replaced, as
SAELens does, so an unspliced BOS prediction cannot dilute the damage.

* ``ce_loss_recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)``
* ``delta_ce = CE_spliced − CE_clean``
* ``kl = E_t KL(p_clean ‖ p_spliced)``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers import PreTrainedModel

from saelab.models.intervene import capture, patch


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
        self.n_positions += int(scored_NP.sum())
        self.ce_clean += float(ce_clean_NP[scored_NP].sum())
        self.ce_spliced += float(ce_spliced_NP[scored_NP].sum())
        self.ce_ablated += float(ce_ablated_NP[scored_NP].sum())
        self.kl_spliced += float(kl_spliced_NP[scored_NP].sum())
        self.kl_ablated += float(kl_ablated_NP[scored_NP].sum())

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
    sums.add(
        scored_positions(keep_NP),
        next_token_ce(clean_NPV, tokens_NP),
        next_token_ce(spliced_NPV, tokens_NP),
        next_token_ce(ablated_NPV, tokens_NP),
        kl_per_position(clean_NPV, spliced_NPV),
        kl_per_position(clean_NPV, ablated_NPV),
    )
    return x_NPD
