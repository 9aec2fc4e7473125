"""One pass over a corpus: the model up to the SAE's hook, the SAE's features, folded into
:class:`~saelab.analysis.features.running._RunningStats`, then logit effects and the token strings
stored, as :class:`~saelab.analysis.features.stats.FeatureStats`.

Sequences are packed and BOS-prefixed, and the forward pass stops at the hook. Position 0 (BOS)
and special tokens are never scored: they count nowhere, are never examples, and show activation
0 inside windows.

Example:
    >>> stats, folder = write_feature_stats("runs/demo/blocks.6.hook_resid_post-topk-x16-k32",
    ...                                     tokens=50_000)     # saved to SAE_DIR/features
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab import __version__
from saelab.analysis.features.logit_effects import final_norm, logit_effects_of
from saelab.analysis.features.running import _RunningStats
from saelab.analysis.features.stats import (
    DEFAULT_STATS_DIRNAME,
    FORMAT_VERSION,
    HIST_BINS,
    QUANTILE_BUCKETS,
    FeatureStats,
)
from saelab.data.activations import special_token_ids, token_mask
from saelab.data.text import TokenBatches
from saelab.errors import SaelabError
from saelab.models.hookpoints import hook_dim
from saelab.models.intervene import run_to_hooks
from saelab.models.loading import load_model
from saelab.outputs import check_output_location
from saelab.saes.base import SparseAutoencoder, SparseFeatureActs
from saelab.saes.storage import load_sae, read_sae_cfg

log = logging.getLogger(__name__)

SKIP_POSITIONS = 1
"""Leading positions never scored: position 0 holds BOS, the attention-sink outlier (§7.1)."""
DENSE_BUDGET = 2**25
"""Tokens × d_sae of one encoded block (a dense-output SAE's ``[tokens, d_sae]`` is 128 MiB)."""


def _decode_vocab(tokenizer: Any, ids: list[int]) -> dict[str, str]:
    """Each id's string as it reads in text (``" the"``); the raw token where one id alone is
    an incomplete UTF-8 sequence."""
    texts = tokenizer.batch_decode(
        [[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    raw = tokenizer.convert_ids_to_tokens(ids)
    return {
        str(i): (r if "\ufffd" in t and r is not None else t)
        for i, t, r in zip(ids, texts, raw, strict=True)
    }


def _resolve_inputs(
    sae_dir_or_sae: str | Path | SparseAutoencoder,
    model: Any,
    tokenizer: Any,
    data: str | None,
    device: str,
) -> tuple[SparseAutoencoder, Any, Any, str, str, str | None]:
    """(sae, model, tokenizer, model name, text spec, SAE folder) with the SAE's own model and
    text as defaults, as ``saelab eval`` resolves them."""
    if isinstance(sae_dir_or_sae, SparseAutoencoder):
        sae, sae_dir = sae_dir_or_sae, None
    else:
        sae_dir = str(sae_dir_or_sae)
        sae = load_sae(sae_dir, device=device)
    meta = sae.metadata
    model_name = model if isinstance(model, str) else str(meta.get("model_name") or "default")
    if model is None or isinstance(model, str):
        model, tokenizer = load_model(model_name, device=device)
    elif tokenizer is None:
        raise SaelabError("a model was passed without its tokenizer; pass tokenizer= as well")
    else:
        config = getattr(model, "config", None)
        model_name = str(
            getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")
        )
    text = data or str(meta.get("dataset_path") or "default")
    width = hook_dim(model, sae.cfg.hook)
    if width != sae.d_in:
        raise SaelabError(
            f"SAE expects d_in={sae.d_in} but {sae.cfg.hook} of this model has width {width}; "
            "use the model it was trained on (--model)"
        )
    return sae, model, tokenizer, model_name, text, sae_dir


@torch.no_grad()
def compute_feature_stats(
    sae_dir_or_sae: str | Path | SparseAutoencoder,
    model: Any = None,
    tokenizer: Any = None,
    *,
    data: str | None = None,
    tokens: int,
    context: int = 128,
    batch_size: int = 16,
    top_k: int = 20,
    n_quantile_examples: int = 5,
    window: tuple[int, int] = (12, 4),
    device: str = "cpu",
    seed: int = 0,
    features: slice | None = None,
    n_logits: int = 20,
    progress: bool = True,
) -> FeatureStats:
    """Statistics of every feature (or ``features``, a slice of them) over ``tokens`` tokens.

    ``sae_dir_or_sae``: a saved SAE folder or an SAE. ``model`` (a model, or a model name) and
    ``data`` (a text spec) default to the ones the SAE was trained on; a model object needs its
    ``tokenizer``. ``context`` tokens per sequence, ``batch_size`` sequences per forward pass;
    ``top_k`` examples per feature, ``n_quantile_examples`` per activation interval, each with
    ``window = (before, after)`` tokens around the ranked one; ``n_logits`` promoted and
    suppressed tokens stored. Memory: ``O(F·(K + 8·n)·W)``, independent of ``tokens``, plus the
    run's token ids (4 bytes each).

    >>> stats = compute_feature_stats("runs/demo/blocks.6.hook_resid_post-topk-x16-k32",
    ...                               tokens=50_000)
    """
    if tokens < 1 or top_k < 1 or n_quantile_examples < 1 or n_logits < 1:
        raise SaelabError("tokens, top_k, n_quantile_examples and n_logits must each be at least 1")
    if min(window) < 0:
        raise SaelabError(f"window {window} has a negative side; pass (before, after) ≥ 0")
    sae, model, tokenizer, model_name, text, sae_dir = _resolve_inputs(
        sae_dir_or_sae, model, tokenizer, data, device
    )
    run_device = next(model.parameters()).device
    sae = sae.to(run_device).eval()
    ids_F = torch.arange(sae.d_sae)[features or slice(None)]
    if len(ids_F) == 0:
        raise SaelabError(f"features={features} selects no feature of this {sae.d_sae}-wide SAE")
    stats = _RunningStats(
        len(ids_F),
        top_k=top_k,
        n_quantile=n_quantile_examples,
        window=window,
        device=run_device,
        seed=seed,
    )
    specials = special_token_ids(tokenizer)
    batches = TokenBatches(text, tokenizer, context=context, batch_size=batch_size, seed=seed)
    n_sequences = math.ceil(tokens / context)  # the last batch is cut to this many
    # Whole sequences per encode, so windows never straddle two blocks.
    seqs_per_block = max(1, DENSE_BUDGET // (context * sae.d_sae))
    column_F = None  # feature id -> its column among the selected ones (-1: not selected)
    if features is not None:
        column_F = torch.full((sae.d_sae,), -1, dtype=torch.int64, device=run_device)
        column_F[ids_F.to(run_device)] = torch.arange(len(ids_F), device=run_device)
    all_tokens: list[Tensor] = []
    bar = tqdm(
        total=n_sequences * context,
        disable=not progress,
        unit="tok",
        unit_scale=True,
        desc="features",
    )
    first_seq = 0
    while first_seq < n_sequences:
        tokens_NP = next(batches, None)
        if tokens_NP is None:
            break
        tokens_NP = tokens_NP[: n_sequences - first_seq]
        all_tokens.append(tokens_NP.to(torch.int32))
        tokens_NP = tokens_NP.to(run_device)
        keep_NP = token_mask(tokens_NP, SKIP_POSITIONS, specials)
        x_NPD = run_to_hooks(model, tokens_NP, [sae.cfg.hook])[sae.cfg.hook]
        for start in range(0, len(tokens_NP), seqs_per_block):
            keep_nP = keep_NP[start : start + seqs_per_block]
            tok_E, feat_E, value_E = _firings(sae, x_NPD[start : start + seqs_per_block], keep_nP)
            if column_F is not None:
                feat_E = column_F[feat_E]
                chosen_E = feat_E >= 0
                tok_E, feat_E, value_E = tok_E[chosen_E], feat_E[chosen_E], value_E[chosen_E]
            P = keep_nP.shape[1]
            stats.update_firings_(tok_E, feat_E, value_E, P, int(keep_nP.sum()), first_seq + start)
        first_seq += len(tokens_NP)
        bar.update(tokens_NP.numel())
        bar.set_postfix(scored=stats.n_tokens, l0=f"{stats.n_fired / max(stats.n_tokens, 1):.1f}")
    bar.close()
    if stats.n_tokens == 0:
        raise SaelabError(f"no tokens came from {text!r}; pass a larger text or more --tokens")
    directions_FD = sae.W_dec.detach()[ids_F.to(run_device)] / sae.activation_scale
    logits = logit_effects_of(directions_FD, model, n_logits)
    if logits is None:
        log.info("%s does not write to the residual stream: no logit effects", sae.cfg.hook)
        empty_F0 = torch.zeros(len(ids_F), 0)
        logits = {
            "logit_pos_ids": empty_F0.int(),
            "logit_pos": empty_F0,
            "logit_neg_ids": empty_F0.int(),
            "logit_neg": empty_F0,
        }
    tensors = _tensors_of(stats, ids_F, torch.cat(all_tokens), logits)
    used_ids = torch.cat(
        [tensors[name].reshape(-1).long() for name in ("tokens", "logit_pos_ids", "logit_neg_ids")]
    )
    norm = final_norm(model)
    meta = {
        "format_version": FORMAT_VERSION,
        "saelab_version": __version__,
        "model": model_name,
        "hook": sae.cfg.hook,
        "output_hook": sae.cfg.output_hook,
        "sae_dir": sae_dir,
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dataset": text,
        "seed": seed,
        "context": context,
        "n_sequences": int(tensors["tokens"].shape[0]),
        "tokens_read": int(tensors["tokens"].numel()),
        "n_tokens": stats.n_tokens,
        "skip_positions": SKIP_POSITIONS,
        "special_token_ids": specials,
        "top_k": top_k,
        "n_quantile_examples": n_quantile_examples,
        "window": list(window),
        "hist_bins": HIST_BINS,
        "quantile_buckets": QUANTILE_BUCKETS,
        "logit_effects": {
            "n": int(logits["logit_pos"].shape[1]),
            "final_norm": None if norm is None else type(norm).__name__,
            "how": "W_U (norm gain * decoder row), LayerNorm centring included, per-token norm "
            "scale, biases and soft-capping left out",
        },
        "vocab": _decode_vocab(tokenizer, torch.unique(used_ids).tolist()),
    }
    return FeatureStats(tensors, meta)


def _firings(
    sae: SparseAutoencoder, x_nPD: Tensor, keep_nP: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The firings (token, feature, value > 0) of the scored tokens of whole sequences, tokens
    numbered ``sequence · P + position``, sorted by (token, feature) as a dense ``nonzero`` is.

    A TopK-like SAE's (index, value) pairs are used as they come: its ``[tokens, F]`` activations
    are never made (writing and scanning them cost more than the encoder GEMM at 9k features).
    """
    row_T = keep_nP.reshape(-1).nonzero().squeeze(1)  # scored tokens' numbers in the block
    # As SparseAutoencoder.encode scales and casts, so the values are the same bits.
    x_TD = x_nPD[keep_nP].float().reshape(-1, sae.d_in).to(sae.W_enc.dtype)
    feats = sae.encode_normalised(x_TD * sae.activation_scale)
    if isinstance(feats, SparseFeatureActs):
        vals_TK = feats.vals_BK.float()
        fired_TK = vals_TK > 0
        K = vals_TK.shape[1]
        tok_E = row_T.repeat_interleave(K).view(-1, K)[fired_TK]
        feat_E = feats.idx_BK.long()[fired_TK]
        value_E = vals_TK[fired_TK]
        order_E = torch.argsort(tok_E * sae.d_sae + feat_E)
        return tok_E[order_E], feat_E[order_E], value_E[order_E]
    acts_TF = feats.to_dense().float()
    tok_E, feat_E = (acts_TF > 0).nonzero(as_tuple=True)
    return row_T[tok_E], feat_E, acts_TF[tok_E, feat_E]


def _tensors_of(
    stats: _RunningStats, ids_F: Tensor, tokens_SP: Tensor, logits: dict[str, Tensor]
) -> dict[str, Tensor]:
    """The saved tensors, on the CPU; slots that never held a firing get sequence -1."""
    F, Q = len(ids_F), QUANTILE_BUCKETS
    top, q = stats.top, stats.quantiles
    top_seq = top.seq.masked_fill(top.value <= 0, -1)
    q_seq = q.seq.masked_fill(q.key < 0, -1)
    n = q.key.shape[1]
    out = {
        "feature_ids": ids_F,
        "fired": stats.fired_F,
        "act_sum": stats.sum_F,
        "max_act": stats.max_F,
        "envelope_exp": stats.exp_F.clamp(min=-(2**31)).int(),
        "hist": stats.hist_FH,
        "top_value": top.value.clamp_min(0),
        "top_seq": top_seq.int(),
        "top_pos": top.pos.masked_fill(top_seq < 0, -1).int(),
        "top_acts": top.acts,
        "q_value": q.value.view(F, Q, n),
        "q_seq": q_seq.view(F, Q, n).int(),
        "q_pos": q.pos.masked_fill(q_seq < 0, -1).view(F, Q, n).int(),
        "q_acts": q.acts.view(F, Q, n, -1),
        "tokens": tokens_SP.int(),
        **logits,
    }
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def write_feature_stats(
    sae_dir: str | Path, out: str | Path | None = None, **kwargs: Any
) -> tuple[FeatureStats, Path]:
    """Compute the statistics of the saved SAE at ``sae_dir`` (keywords as for
    :func:`compute_feature_stats`; ``model`` may be a name) and save them to ``out``
    (default ``SAE_DIR/features``). Returns them and the folder."""
    read_sae_cfg(sae_dir)  # the input first: "not an SAE" says more than a bad default --out
    target = Path(out) if out is not None else Path(sae_dir) / DEFAULT_STATS_DIRNAME
    check_output_location(target)  # before the long part
    stats = compute_feature_stats(sae_dir, **kwargs)
    return stats, stats.save(target)
