"""Logit effects of feature directions: each decoder row through the final norm's gain and the
unembedding, the tokens it promotes and suppresses most.

Example:
    >>> effects = logit_effects_of(sae.W_dec[:8], model, n=10)
    >>> effects["logit_pos_ids"].shape, effects["logit_neg"].shape       # [8, 10] each
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

LOGIT_CHUNK = 256
"""Features whose logit effects ``[chunk, vocab]`` are computed at once."""


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied to the residual stream before the unembedding: the last direct child of
    the base model whose class name ends in ``Norm`` (``ln_f``, ``norm``, ``final_layer_norm``)."""
    base = getattr(model, "base_model", model)
    norms = [m for m in base.children() if type(m).__name__.endswith("Norm")]
    return norms[-1] if norms else None


def norm_gain(norm: nn.Module, d: int) -> Float[Tensor, " D"]:
    """The norm's elementwise gain, measured by running it: on a ±1 probe (mean 0, RMS 1) every
    LayerNorm / RMSNorm variant (Gemma's ``1 + w`` included) returns ``gain · probe + bias``, up to
    a factor ``1/sqrt(1 + eps)``; the bias cancels between the probe and its negative."""
    param = next(norm.parameters(), None)
    probe_D = torch.ones(d, device=param.device if param is not None else "cpu")
    probe_D[1::2] = -1
    probe_D = probe_D.to(param.dtype if param is not None else torch.float32)
    with torch.no_grad():
        gain_D = (norm(probe_D[None]) - norm(-probe_D[None]))[0] / 2 * probe_D
    return gain_D.float()


@torch.no_grad()
def logit_effects_of(
    directions_FD: Float[Tensor, "F D"], model: nn.Module, n: int
) -> dict[str, Tensor] | None:
    """Top ``n`` promoted and suppressed tokens of each direction written to the residual stream.

    Effect = ``W_U (g ⊙ c(d))``, ``g`` the final norm's gain and ``c`` its centring (LayerNorm
    only). The norm's division by each token's own scale is left out: it is positive and the same
    for every vocabulary entry, so the ranking is exact and values are logits per unit of
    activation at unit residual norm. Biases and Gemma2's final soft-capping (monotone) are
    ignored. ``None`` when the directions do not live in the unembedding's input space.
    """
    unembed = model.get_output_embeddings()
    if unembed is None or unembed.weight.shape[1] != directions_FD.shape[1]:
        return None
    W_VD = unembed.weight.detach().float()
    dirs_FD = directions_FD.detach().float().to(W_VD.device)
    norm = final_norm(model)
    if norm is not None:
        if isinstance(norm, nn.LayerNorm):
            dirs_FD = dirs_FD - dirs_FD.mean(-1, keepdim=True)
        dirs_FD = dirs_FD * norm_gain(norm, dirs_FD.shape[1]).to(W_VD.device)
    n = min(n, W_VD.shape[0])
    parts: dict[str, list[Tensor]] = {k: [] for k in ("pos_ids", "pos", "neg_ids", "neg")}
    for start in range(0, len(dirs_FD), LOGIT_CHUNK):
        effect_CV = dirs_FD[start : start + LOGIT_CHUNK] @ W_VD.T
        top, top_ids = effect_CV.topk(n, dim=1)
        low, low_ids = effect_CV.topk(n, dim=1, largest=False)
        for key, value in zip(parts, (top_ids, top, low_ids, low), strict=True):
            parts[key].append(value.cpu())
    out = {f"logit_{k}": torch.cat(v) for k, v in parts.items()}
    out["logit_pos_ids"] = out["logit_pos_ids"].int()
    out["logit_neg_ids"] = out["logit_neg_ids"].int()
    return out
