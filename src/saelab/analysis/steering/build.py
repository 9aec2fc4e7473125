"""Building steering vectors (METHODS §8): CAA, ActAdd, mean-centring and SAE features.

* **caa** ``v = mean_pairs[h(q ⊕ a+)[pos] − h(q ⊕ a−)[pos]]``, ``pos`` the answer position
  (``answer_offset`` from the end; −1 = last token, −2 for "(A"-style completions).
* **actadd** ``v[t] = h(p+)[t] − h(p−)[t]`` for the T positions after BOS; the shorter prompt is
  padded with spaces (or the pad token where a space is no single token); added front-aligned.
* **mean** ``v = mean_t h(target) − mean_t h(general)``, means over kept positions (BOS, padding
  and special tokens excluded).
* **sae-feature** ``v = u·d_i`` (``d_i`` the raw decoder row in model units) and **sae-clamp**
  (``h ← h + (c·u − f_i(h))·d_i``), both :func:`sae_vector`, ``u`` the unit of
  :data:`~saelab.analysis.steering.config.SAE_UNITS`: ``max_act`` the feature's largest
  activation: ``max_act`` when given, else from saved feature statistics (``SAE_DIR/features``
  or ``stats``; see :mod:`~saelab.analysis.steering.units`), else measured on the general text
  (``source["max_act_source"]`` says which: ``given``, ``stats`` or ``measured``),
  ``resid_norm`` ``mean‖h‖/‖d_i‖`` so that c = 1 adds a vector as long as the mean residual,
  ``activation`` 1. Both steer at the SAE's own hook, in model units.

Each method's builder registers itself (:func:`~.registry.register_method`), and
:func:`build_vector` builds the one a :class:`~.config.SteerVectorConfig` names.

Example:
    >>> vector = caa_vector(model, tokenizer, read_pairs("pairs.jsonl"), "blocks.6.hook_resid_post")
    >>> vector = build_vector(model, tokenizer, SteerVectorConfig(method="mean", target="dogs.txt"))
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import PreTrainedModel

from saelab.analysis.steering.data import (
    ContrastPair,
    TextRows,
    encode,
    length_mask,
    pad_id,
    prompt_ids,
    read_pairs,
    read_text_rows,
    right_pad,
)
from saelab.analysis.steering.registry import builder_for, register_method
from saelab.analysis.steering.units import find_stats_dir, stats_max_act
from saelab.analysis.steering.vectors import (
    SteeringVector,
    check_fits,
    decoder_row,
    model_label,
)
from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.models.intervene import run_to_hooks
from saelab.models.loading import bos_token_id
from saelab.saes.base import SparseAutoencoder
from saelab.saes.storage import load_sae

if TYPE_CHECKING:  # at run time the config imports this module (to learn the methods)
    from saelab.analysis.steering.config import SteerVectorConfig

log = logging.getLogger(__name__)

BATCH_ROWS = 16
"""Sequences per forward pass while building."""
SAE_METHODS = ("sae-feature", "sae-clamp")
"""The methods that steer with an SAE feature (:func:`sae_vector`)."""


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def _acts(
    model: PreTrainedModel, ids_NP: Tensor, lengths_N: Tensor, hook: str
) -> Float[Tensor, "N P D"]:
    """Float32 activations at ``hook`` of right-padded rows; the model stops after the hook."""
    device = _device(model)
    mask_NP = length_mask(lengths_N, ids_NP.shape[1]).long()
    acts = run_to_hooks(model, ids_NP.to(device), [hook], attention_mask=mask_NP.to(device))
    return acts[hook].float()


def _acts_at(
    model: PreTrainedModel,
    sequences: Sequence[list[int]],
    positions: Sequence[int],
    hook: str,
    pad: int,
) -> Float[Tensor, "N D"]:
    """The activation at ``positions[i]`` of ``sequences[i]``, computed in batches."""
    rows = []
    for start in range(0, len(sequences), BATCH_ROWS):
        ids_NP, lengths_N = right_pad(sequences[start : start + BATCH_ROWS], pad)
        acts_NPD = _acts(model, ids_NP, lengths_N, hook)
        at_N = torch.tensor(positions[start : start + BATCH_ROWS], device=acts_NPD.device)
        rows.append(acts_NPD[torch.arange(len(at_N), device=at_N.device), at_N])
    return torch.cat(rows)


def caa_vector(
    model: PreTrainedModel,
    tokenizer: Any,
    pairs: Sequence[ContrastPair],
    hook: str,
    *,
    answer_offset: int = -1,
    model_name: str | None = None,
    source: dict[str, Any] | None = None,
) -> SteeringVector:
    """Contrastive activation addition: the mean over ``pairs`` of the activation difference
    at the answer position (``answer_offset`` from the end of prompt + completion).

    Positives and negatives run as two separate lists in the same batches, so swapping them
    gives exactly the negated vector.
    """
    if not pairs:
        raise SaelabError("CAA needs at least one prompt pair")
    pad = pad_id(tokenizer)
    sides = []
    for side in ("positive", "negative"):
        sequences = [prompt_ids(tokenizer, p.prompt, getattr(p, side))[0] for p in pairs]
        positions = [len(s) + answer_offset for s in sequences]
        for i, (seq, at) in enumerate(zip(sequences, positions, strict=True)):
            if at < 1:
                raise SaelabError(
                    f"pair {i} ({side}) has {len(seq) - 1} tokens after BOS, too few for answer "
                    f"offset {answer_offset}; use a smaller offset or longer completions"
                )
        sides.append(_acts_at(model, sequences, positions, hook, pad))
    diff_ND = sides[0] - sides[1]
    details = {"pairs": len(pairs), "answer_offset": answer_offset, **(source or {})}
    return SteeringVector(
        diff_ND.mean(0).cpu(), hook, "caa", model_name or model_label(model), details
    )


def actadd_vector(
    model: PreTrainedModel,
    tokenizer: Any,
    positive: str,
    negative: str,
    hook: str,
    *,
    model_name: str | None = None,
) -> SteeringVector:
    """ActAdd: ``h(p+)[t] − h(p−)[t]`` for each position t after BOS; ``[T, D]``.

    The shorter prompt is padded at the end with space tokens, as Turner et al. do (with the
    pad token where a space is not a single token).
    """
    pos, neg = encode(tokenizer, positive), encode(tokenizer, negative)
    space = encode(tokenizer, " ")
    filler = space[0] if len(space) == 1 else pad_id(tokenizer)
    length = max(len(pos), len(neg))
    if length == 0:
        raise SaelabError("ActAdd needs at least one token in --positive or --negative")
    bos = bos_token_id(tokenizer)
    rows = [[bos, *ids, *[filler] * (length - len(ids))] for ids in (pos, neg)]
    ids_NP = torch.tensor(rows)
    acts_NPD = _acts(model, ids_NP, torch.full((2,), length + 1), hook)
    vector_TD = (acts_NPD[0, 1:] - acts_NPD[1, 1:]).cpu()
    details = {
        "positive": positive,
        "negative": negative,
        "positive_tokens": len(pos),
        "negative_tokens": len(neg),
        "pad_token_id": filler,
    }
    return SteeringVector(vector_TD, hook, "actadd", model_name or model_label(model), details)


def mean_activation(model: PreTrainedModel, rows: TextRows, hook: str) -> Float[Tensor, " D"]:
    """The mean activation at ``hook`` over the kept positions of ``rows`` (float64 sums)."""
    total_D, count = None, 0
    for ids_NP, lengths_N, keep_NP in rows.batches(BATCH_ROWS):
        kept_TD = _acts(model, ids_NP, lengths_N, hook)[keep_NP.to(_device(model))].double()
        total_D = kept_TD.sum(0) if total_D is None else total_D + kept_TD.sum(0)
        count += kept_TD.shape[0]
    if not count:
        raise SaelabError(f"no tokens to average in {rows.source!r}; pass more text")
    return (total_D / count).float().cpu()


def mean_centred_vector(
    model: PreTrainedModel,
    tokenizer: Any,
    target: str | Sequence[str],
    hook: str,
    *,
    general: str | Sequence[str] = "default",
    tokens: int = 4096,
    context: int = 128,
    seed: int = 0,
    model_name: str | None = None,
) -> SteeringVector:
    """Mean-centring: mean activation over ``target`` text minus that over ``general`` text.

    Both are text specs or lists of strings, read as :func:`read_text_rows` does (``tokens``
    tokens each, rows of ``context``).
    """
    means, details = [], {}
    for name, text in (("target", target), ("general", general)):
        rows = read_text_rows(text, tokenizer, tokens=tokens, context=context, seed=seed)
        means.append(mean_activation(model, rows, hook))
        details[name] = rows.source
        details[f"{name}_tokens"] = rows.n_tokens
    vector_D = means[0] - means[1]
    return SteeringVector(vector_D, hook, "mean", model_name or model_label(model), details)


def feature_statistics(
    model: PreTrainedModel,
    sae: SparseAutoencoder,
    feature: int,
    rows: TextRows,
) -> dict[str, float]:
    """``max_act`` (largest activation of ``feature``) and ``resid_norm`` (mean ‖h‖) over the
    kept positions of ``rows`` at the SAE's hook."""
    max_act, norm_sum, count = 0.0, 0.0, 0
    for ids_NP, lengths_N, keep_NP in rows.batches(BATCH_ROWS):
        kept_TD = _acts(model, ids_NP, lengths_N, sae.cfg.hook)[keep_NP.to(_device(model))]
        with torch.no_grad():
            acts_T = sae.encode(kept_TD)[:, feature]
        max_act = max(max_act, float(acts_T.max()) if acts_T.numel() else 0.0)
        norm_sum += float(kept_TD.double().norm(dim=-1).sum())
        count += kept_TD.shape[0]
    return {"max_act": max_act, "resid_norm": norm_sum / max(count, 1), "tokens": count}


def sae_vector(
    model: PreTrainedModel,
    tokenizer: Any,
    sae: SparseAutoencoder | str | Path,
    feature: int,
    *,
    method: str = "sae-feature",
    units: str = "max_act",
    general: str | Sequence[str] = "default",
    tokens: int = 4096,
    context: int = 128,
    seed: int = 0,
    model_name: str | None = None,
    max_act: float | None = None,
    stats: str | Path | None = None,
    sae_dir: str | Path | None = None,
) -> SteeringVector:
    """An SAE feature as a steering vector at the SAE's hook, in model units (see the module
    doc for ``units``): ``sae-feature`` holds ``u·d_i``; ``sae-clamp`` holds ``d_i`` (clamping
    feature i to ``c·u``, the error term kept) with ``u`` in ``source["unit_scale"]``.

    ``sae`` is an SAE or its folder. The folder (``sae_dir`` for an SAE already loaded from one)
    is recorded so the vector can be traced back; an sae-clamp vector can be saved only when it
    records one. ``max_act`` overrides the unit; ``stats`` names a folder of feature statistics
    to read it from (default: ``SAE_DIR/features`` when it holds them).

    Example:
        >>> sae_vector(model, tokenizer, "runs/demo/SAE", 3589, units="resid_norm").norm
    """
    if method not in SAE_METHODS:
        raise SaelabError(
            f"an SAE vector's method is one of {', '.join(SAE_METHODS)}, not {method!r}"
        )
    if not isinstance(sae, SparseAutoencoder):
        sae_dir = sae
        sae = load_sae(str(Path(sae).expanduser().resolve()), device=str(_device(model)))
    sae_dir = None if sae_dir is None else str(Path(sae_dir).expanduser().resolve())
    d_D = decoder_row(sae, feature)
    hook = check_fits(model, SteeringVector(d_D, sae.cfg.hook, method, model_label(model)))
    details: dict[str, Any] = {"sae": sae_dir, "feature": feature, "units": units}
    unit = 1.0
    stats_dir = find_stats_dir(sae_dir, stats) if units == "max_act" else None
    if units == "max_act" and max_act is not None:
        unit = details["max_act"] = float(max_act)
        details["max_act_source"] = "given"
    elif units == "max_act" and stats_dir is not None:
        details.update(stats_max_act(stats_dir, sae, feature, sae_dir=sae_dir))
        unit = details["max_act"]
    elif units != "activation":
        rows = read_text_rows(general, tokenizer, tokens=tokens, context=context, seed=seed)
        measured = feature_statistics(model, sae.to(_device(model)), feature, rows)
        details.update(general=rows.source, **measured)
        if units == "max_act":
            details["max_act_source"] = "measured"
            if measured["max_act"] <= 0:
                raise SaelabError(
                    f"feature {feature} never fired on {measured['tokens']} tokens of "
                    f"{rows.source!r}; use --sae-units resid_norm or activation, or more --tokens"
                )
            unit = measured["max_act"]
        else:
            unit = measured["resid_norm"] / float(d_D.norm())
    # Feature activation per unit of coefficient: c·unit is the value added or clamped to.
    details["unit_scale"] = unit
    name = model_name or model_label(model)
    if method == "sae-clamp":
        return SteeringVector(d_D.cpu(), hook, method, name, details, sae=sae)
    return SteeringVector((unit * d_D).cpu(), hook, method, name, details)


sae_feature_vector = partial(sae_vector, method="sae-feature")
"""An SAE feature's decoder direction ``u·d_i``: :func:`sae_vector` of method ``sae-feature``."""
sae_clamp_vector = partial(sae_vector, method="sae-clamp")
"""Clamping an SAE feature to ``c·u`` (``h + (c·u − f_i(h))·d_i``): :func:`sae_vector` of
method ``sae-clamp``."""


def _hook_of(cfg: SteerVectorConfig) -> str:
    return cfg.hook or SAEConfig().hook


@register_method("caa")
def _build_caa(model, tokenizer, cfg: SteerVectorConfig, model_name: str | None) -> SteeringVector:
    return caa_vector(
        model,
        tokenizer,
        read_pairs(cfg.pairs),
        _hook_of(cfg),
        answer_offset=cfg.answer_offset,
        model_name=model_name,
        source={"pairs_file": str(cfg.pairs)},
    )


@register_method("actadd")
def _build_actadd(
    model, tokenizer, cfg: SteerVectorConfig, model_name: str | None
) -> SteeringVector:
    return actadd_vector(
        model, tokenizer, cfg.positive, cfg.negative, _hook_of(cfg), model_name=model_name
    )


@register_method("mean")
def _build_mean(model, tokenizer, cfg: SteerVectorConfig, model_name: str | None) -> SteeringVector:
    return mean_centred_vector(
        model,
        tokenizer,
        cfg.target,
        _hook_of(cfg),
        general=cfg.general,
        tokens=cfg.tokens,
        context=cfg.context,
        seed=cfg.seed,
        model_name=model_name,
    )


@register_method(*SAE_METHODS)
def _build_sae(model, tokenizer, cfg: SteerVectorConfig, model_name: str | None) -> SteeringVector:
    sae = load_sae(str(Path(cfg.sae).expanduser().resolve()), device=str(_device(model)))
    if cfg.hook is not None and cfg.hook != sae.cfg.hook:
        raise SaelabError(
            f"the SAE was trained at {sae.cfg.hook}, and SAE features steer at their own hook "
            f"(not {cfg.hook}); drop --hook, or add --transfer-layers to try other layers"
        )
    return sae_vector(
        model,
        tokenizer,
        sae,
        cfg.feature,
        method=cfg.method,
        units=cfg.sae_units,
        general=cfg.general,
        tokens=cfg.tokens,
        context=cfg.context,
        seed=cfg.seed,
        model_name=model_name,
        max_act=cfg.max_act,
        stats=cfg.stats,
        sae_dir=cfg.sae,
    )


def build_vector(
    model: PreTrainedModel,
    tokenizer: Any,
    cfg: SteerVectorConfig,
    model_name: str | None = None,
) -> SteeringVector:
    """The vector ``cfg`` describes, built on ``model`` (recorded as ``model_name``)."""
    vector = builder_for(cfg.method)(model, tokenizer, cfg, model_name)
    check_fits(model, vector)
    log.info(
        "built a %s vector at %s: shape %s, norm %.4g",
        vector.method,
        vector.hook,
        tuple(vector.vector.shape),
        vector.norm,
    )
    return vector
