"""``saelab eval``: reconstruction, sparsity and spliced-loss metrics of a saved SAE.

One pass over evaluation text computes everything: the clean forward pass captures the hook's
activations, which feed the running reconstruction sums (METHODS §6.1) and the spliced and
ablated passes (§6.2). ``metrics.json`` holds exactly :data:`METRIC_KEYS`; what else is worth
knowing about the run (tokens, model, dataset, cosine similarity) goes to ``eval_info.json``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.atomic import write_json
from saelab.data.activations import special_token_ids, token_mask
from saelab.data.text import TokenBatches
from saelab.errors import SaelabError
from saelab.evaluation.splice import SpliceSums, splice_batch
from saelab.models.hookpoints import hook_dim
from saelab.models.loading import load_model
from saelab.saes.base import SparseAutoencoder
from saelab.saes.metrics import ReconstructionStats
from saelab.saes.storage import load_sae
from saelab.saes.transcoder import Transcoder

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "l0",
    "mse",
    "fvu",
    "explained_variance",
    "gamma",
    "frac_dead",
    "frac_dense",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_ablated",
    "ce_loss_recovered",
    "delta_ce",
    "kl",
)
"""The keys of ``metrics.json``, in order."""


@torch.no_grad()
def evaluate_sae(
    sae: SparseAutoencoder,
    model,
    tokenizer,
    *,
    dataset: str = "default",
    tokens: int = 8192,
    context: int = 128,
    batch_size: int = 16,
    skip_positions: int = 1,
    seed: int = 1,
    progress: bool = True,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of ``sae`` at its hook over about ``tokens`` tokens of ``dataset``.

    A transcoder's prediction is spliced in, zero-ablated and scored at its output hook.
    Returns (metrics with exactly :data:`METRIC_KEYS`, extra information).
    """
    hook = sae.cfg.hook
    width = hook_dim(model, hook)
    if width != sae.d_in:
        raise SaelabError(
            f"SAE expects d_in={sae.d_in} but {hook} of this model has width {width}; "
            "evaluate it on the model it was trained on (--model)"
        )
    output_hook = sae.cfg.output_hook
    if output_hook is not None and (out_width := hook_dim(model, output_hook)) != sae.d_out:
        raise SaelabError(
            f"transcoder predicts d_out={sae.d_out} but {output_hook} of this model has width "
            f"{out_width}; evaluate it on the model it was trained on (--model)"
        )
    device = next(model.parameters()).device
    sae = sae.to(device).eval()
    stats = ReconstructionStats(sae.d_out, sae.d_sae)
    sums = SpliceSums()
    specials = special_token_ids(tokenizer)
    n_batches = max(1, math.ceil(tokens / (batch_size * context)))
    batches = TokenBatches(dataset, tokenizer, context=context, batch_size=batch_size, seed=seed)
    bar = tqdm(total=n_batches, disable=not progress, desc="eval", unit="batch")
    for _ in range(n_batches):
        tokens_NP = next(batches, None)
        if tokens_NP is None:
            break
        tokens_NP = tokens_NP.to(device)
        keep_NP = token_mask(tokens_NP, skip_positions, specials)

        def reconstruct(x_NPD, keep_NP=keep_NP):
            x_TD = x_NPD[keep_NP].float() * sae.activation_scale
            feats = sae.encode_normalised(x_TD)
            recon_TD = sae.decode_feats(feats) / sae.activation_scale
            x_raw_TD = x_TD / sae.activation_scale
            stats.update(x_raw_TD, recon_TD, feats.l0_per_token(), feats.fired_counts())
            recon_NPD = x_NPD.clone()
            recon_NPD[keep_NP] = recon_TD.to(x_NPD.dtype)
            return recon_NPD

        if isinstance(sae, Transcoder):
            _splice_transcoder(sae, model, tokens_NP, keep_NP, stats, sums)
        else:
            splice_batch(model, hook, tokens_NP, keep_NP, reconstruct, sums)
        bar.update(1)
        bar.set_postfix(ce_rec=f"{sums.compute()['ce_loss_recovered']:.3f}", refresh=False)
    bar.close()
    if stats.n_tokens == 0:
        raise SaelabError(f"no evaluation tokens came from {dataset!r}; pass a larger dataset")
    recon = stats.compute()
    spliced = sums.compute()
    metrics = {key: float(recon[key] if key in recon else spliced[key]) for key in METRIC_KEYS}
    info = {
        "hook": hook,
        "output_hook": output_hook,
        "tokens": stats.n_tokens,
        "context": context,
        "dataset": dataset,
        "cos_sim": recon["cos_sim"],
        "l2_ratio": recon["l2_ratio"],
        "kl_ablated": spliced["kl_ablated"],
        "dead_window_tokens": stats.n_tokens,
    }
    return metrics, info


def _splice_transcoder(
    sae: Transcoder,
    model,
    tokens_NP: torch.Tensor,
    keep_NP: torch.Tensor,
    stats: ReconstructionStats,
    sums: SpliceSums,
) -> None:
    """Splice ``ŷ(x_in)`` in place of the output hook; score it against the true activations
    there (model units)."""
    made = []

    def predict(x_in_NPD: torch.Tensor) -> torch.Tensor:
        x_TD = x_in_NPD[keep_NP].float() * sae.activation_scale
        feats = sae.encode_normalised(x_TD)
        recon_TO = sae.predict_normalised(x_TD, feats) / sae.output_scale
        made.append((feats, recon_TO))
        # Only kept positions are replaced; the rest keep the model's own activations.
        recon_NPO = x_in_NPD.new_zeros(*keep_NP.shape, sae.d_out)
        recon_NPO[keep_NP] = recon_TO.to(x_in_NPD.dtype)
        return recon_NPO

    y_NPO = splice_batch(
        model, sae.cfg.output_hook, tokens_NP, keep_NP, predict, sums, input_hook=sae.cfg.hook
    )
    feats, recon_TO = made[0]
    stats.update(y_NPO[keep_NP].float(), recon_TO, feats.l0_per_token(), feats.fired_counts())


def evaluate_sae_dir(
    sae_dir: str | Path,
    *,
    model_name: str | None = None,
    dataset: str | None = None,
    tokens: int = 8192,
    context: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Evaluate a saved SAE on its model (or ``model_name``); writes ``metrics.json`` beside it."""
    sae_dir = Path(sae_dir)
    sae = load_sae(sae_dir, device=device)
    meta = sae.metadata
    model_name = model_name or str(meta.get("model_name") or "default")
    dataset = dataset or str(meta.get("dataset_path") or "default")
    context = context or int(meta.get("context_size") or 128)
    model, tokenizer = load_model(model_name, device=device)
    metrics, info = evaluate_sae(
        sae, model, tokenizer, dataset=dataset, tokens=tokens, context=context, progress=progress
    )
    info["model"] = model_name
    write_json(sae_dir / "metrics.json", metrics)
    write_json(sae_dir / "eval_info.json", info)
    return metrics


def format_metrics_table(metrics: dict[str, float], title: str = "") -> str:
    width = max(len(k) for k in metrics)
    lines = [title] if title else []
    lines += [f"{key:<{width}}  {value:>12.6g}" for key, value in metrics.items()]
    return "\n".join(lines)
