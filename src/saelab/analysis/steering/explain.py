"""A steering vector in an SAE's feature basis (``saelab steer --explain-with SAE_DIR``).

Two decompositions of a vector ``v`` (model units, at the SAE's hook):

* **encode**: ``f = SAE.encode(v)``, the features the SAE reads in ``v``; feature ``i`` carries
  ``f_i·d_i`` (``d_i`` its decoder row in model units), the SAE's own bias not counted.
* **least squares**: the minimum-norm ``c`` with ``Σ_i c_i d_i = v`` (``torch.linalg.lstsq`` on
  the decoder rows; exact whenever the rows span the space, as in any SAE wider than its input).

For each, the top features by ``|⟨c_i d_i, v⟩|`` with their densities, and the share of ``v``
carried by dense features (density above 10 % and above 1 %): ``⟨v_S, v⟩/‖v‖²`` with
``v_S = Σ_{i∈S} c_i d_i`` (the shares of a partition of the features add up to the share of the
whole decomposition, 1 for an exact one) and ``‖v_S‖/‖v‖``. Densities come from the SAE's
feature statistics (``SAE_DIR/features``) when present, else its stored log10 densities
(``sparsity.safetensors``), else they are measured on general text.

Example:
    >>> sae = load_sae("runs/demo/blocks.6.hook_resid_post-topk-x16-k32")
    >>> density_F, source = feature_densities(sae, "runs/demo/...")
    >>> explanation = explain_vector(vector.vector, sae, density_F, top=10)
    >>> explanation["encode"]["dense_share"]["0.1"]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from saelab.analysis.features import FeatureStats
from saelab.analysis.steering.data import length_mask, read_text_rows
from saelab.analysis.steering.units import find_stats_dir
from saelab.errors import SaelabError
from saelab.models.intervene import run_to_hooks
from saelab.saes.base import SparseAutoencoder
from saelab.saes.storage import load_log10_density

log = logging.getLogger(__name__)

DENSE_THRESHOLDS = (0.1, 0.01)
"""Densities above which a feature counts as dense (10 %) and as frequent (1 %)."""

DECOMPOSITIONS = ("encode", "lstsq")
"""The two decompositions of :func:`explain_vector`."""

ACTIVE_REL = 1e-5
"""A coefficient counts as active above this fraction of the largest one."""

MEASURE_ROWS = 16
"""Sequences per forward pass when densities are measured."""


def decoder_rows(sae: SparseAutoencoder) -> Float[Tensor, "F D"]:
    """Every feature's decoder row in model units (what ``f_i = 1`` adds to the output)."""
    if sae.d_out != sae.d_in:
        raise SaelabError(
            f"the SAE at {sae.cfg.hook} is a transcoder (it writes {sae.cfg.output_hook}); "
            "explain vectors with an SAE that reconstructs its own hook"
        )
    return (sae.W_dec / sae.activation_scale).detach().float()


@torch.no_grad()
def measure_densities(
    sae: SparseAutoencoder,
    model,
    tokenizer,
    *,
    general: str | Sequence[str] = "default",
    tokens: int = 4096,
    context: int = 128,
    seed: int = 0,
) -> Float[Tensor, " F"]:
    """Each feature's firing rate over ``tokens`` kept tokens of ``general`` at its hook."""
    rows = read_text_rows(general, tokenizer, tokens=tokens, context=context, seed=seed)
    device = next(model.parameters()).device
    fired_F = torch.zeros(sae.d_sae, dtype=torch.float64)
    count = 0
    for ids_NP, lengths_N, keep_NP in rows.batches(MEASURE_ROWS):
        mask_NP = length_mask(lengths_N, ids_NP.shape[1]).long().to(device)
        acts = run_to_hooks(model, ids_NP.to(device), [sae.cfg.hook], attention_mask=mask_NP)
        kept_TD = acts[sae.cfg.hook].float()[keep_NP.to(device)]
        fired_F += (sae.encode(kept_TD) > 0).double().sum(0).cpu()
        count += kept_TD.shape[0]
    if not count:
        raise SaelabError(f"no tokens to measure densities on in {rows.source!r}; pass more text")
    return fired_F / count


def feature_densities(
    sae: SparseAutoencoder,
    sae_dir: str | Path | None = None,
    *,
    stats: str | Path | None = None,
    model=None,
    tokenizer=None,
    **measure: Any,
) -> tuple[Float[Tensor, " F"], str]:
    """(density per feature, where it came from: ``stats``, ``sparsity`` or ``measured``).

    The SAE's feature statistics (``stats``, default ``SAE_DIR/features``) first, then its
    stored log10 densities, else measured with ``model`` (``measure`` goes to
    :func:`measure_densities`).
    """
    stats_dir = find_stats_dir(sae_dir, stats)
    if stats_dir is not None:
        feature_stats = FeatureStats.load(stats_dir)
        if feature_stats.n_features == sae.d_sae and int(feature_stats.n_tokens) > 0:
            density_F = torch.zeros(sae.d_sae, dtype=torch.float64)
            density_F[feature_stats.feature_ids.long()] = feature_stats.density.double()
            return density_F, "stats"
        log.warning("the statistics in %s do not cover every feature; not used", stats_dir)
    if sae_dir is not None:
        log10_F = load_log10_density(sae_dir)
        if log10_F is not None and log10_F.numel() == sae.d_sae:
            # The stored value is log10(density + 1e-10): a dead feature comes back as 1e-10.
            return torch.pow(10.0, log10_F.double()), "sparsity"
    if model is None:
        raise SaelabError(
            "the SAE has no stored densities (no features/ statistics, no sparsity.safetensors); "
            "pass the model so that they are measured"
        )
    return measure_densities(sae, model, tokenizer, **measure), "measured"


def _coefficients(
    vector_D: Float[Tensor, " D"], sae: SparseAutoencoder, rows_FD: Float[Tensor, "F D"], how: str
) -> Float[Tensor, " F"]:
    if how == "encode":
        with torch.no_grad():
            return sae.encode(vector_D[None].to(sae.W_enc.dtype))[0].double().cpu()
    if how == "lstsq":
        # Minimum-norm c with rows_FDᵀ c = v (an underdetermined system when F > D).
        a_DF = rows_FD.double().T.cpu()
        return torch.linalg.lstsq(a_DF, vector_D.double().cpu()[:, None], driver="gelsd")[0][:, 0]
    raise SaelabError(f"decomposition must be one of {', '.join(DECOMPOSITIONS)}, got {how!r}")


def dense_parts(
    coef_F: Float[Tensor, " F"],
    rows_FD: Float[Tensor, "F D"],
    density_F: Float[Tensor, " F"],
    threshold: float,
) -> Float[Tensor, " D"]:
    """``Σ c_i d_i`` over the features with density above ``threshold`` (model units)."""
    dense_F = density_F.double().cpu() > threshold
    return coef_F[dense_F] @ rows_FD.double().cpu()[dense_F]


def explain_vector(
    vector: Float[Tensor, "*T D"],
    sae: SparseAutoencoder,
    density_F: Float[Tensor, " F"],
    *,
    top: int = 10,
    thresholds: Sequence[float] = DENSE_THRESHOLDS,
) -> dict[str, Any]:
    """Both decompositions of ``vector`` (a per-position vector is summed over positions): for
    each, the top ``top`` features, the share carried by dense features per threshold, and how
    well the decomposition reconstructs the vector (``recon_rel_error``)."""
    vector_D = vector.detach().reshape(-1, vector.shape[-1]).sum(0).double().cpu()
    if vector_D.shape[0] != sae.d_in:
        raise SaelabError(
            f"the vector has width {vector_D.shape[0]} but the SAE at {sae.cfg.hook} reads "
            f"{sae.d_in}; explain it with an SAE of the vector's model and hook"
        )
    if density_F.numel() != sae.d_sae:
        raise SaelabError(f"{density_F.numel()} densities for an SAE of {sae.d_sae} features")
    rows_FD = decoder_rows(sae).double().cpu()
    norm_sq = float(vector_D.pow(2).sum())
    norm = norm_sq**0.5
    density_F = density_F.double().cpu()
    out: dict[str, Any] = {"norm": norm, "d_sae": sae.d_sae, "hook": sae.cfg.hook}
    for how in DECOMPOSITIONS:
        coef_F = _coefficients(vector_D.float(), sae, rows_FD.float(), how)
        parts_FD = coef_F[:, None] * rows_FD
        along_F = parts_FD @ vector_D / max(norm_sq, 1e-30)  # each feature's share of v
        recon_D = parts_FD.sum(0)
        order = along_F.abs().argsort(descending=True)[: min(top, sae.d_sae)]
        shares, norm_shares = {}, {}
        for threshold in thresholds:
            part_D = dense_parts(coef_F, rows_FD, density_F, threshold)
            shares[str(threshold)] = float(part_D @ vector_D) / max(norm_sq, 1e-30)
            norm_shares[str(threshold)] = float(part_D.norm()) / max(norm, 1e-30)
        out[how] = {
            "features": [
                {
                    "feature": int(i),
                    "coef": float(coef_F[i]),
                    "share": float(along_F[i]),
                    "density": float(density_F[i]),
                }
                for i in order.tolist()
            ],
            # Float rounding leaves tiny coefficients on features that are off in exact maths.
            "active": int((coef_F.abs() > ACTIVE_REL * float(coef_F.abs().max())).sum()),
            "dense_share": shares,
            "dense_norm_share": norm_shares,
            "explained_share": float(recon_D @ vector_D) / max(norm_sq, 1e-30),
            "recon_rel_error": float((recon_D - vector_D).norm()) / max(norm, 1e-30),
        }
    return out


def explain_with(
    vector: Float[Tensor, "*T D"],
    sae_dir: str | Path,
    model,
    tokenizer,
    *,
    hook: str | None = None,
    top: int = 10,
    **measure: Any,
) -> dict[str, Any]:
    """:func:`explain_vector` with the SAE saved at ``sae_dir`` and its densities
    (:func:`feature_densities`); ``hook`` is the vector's, warned about when it is not the
    SAE's."""
    from saelab.saes.storage import load_sae

    device = str(next(model.parameters()).device)
    sae = load_sae(str(Path(sae_dir).expanduser().resolve()), device=device)
    if hook is not None and hook != sae.cfg.hook:
        log.warning("the vector is at %s, the SAE at %s: explained anyway", hook, sae.cfg.hook)
    density_F, source = feature_densities(sae, sae_dir, model=model, tokenizer=tokenizer, **measure)
    result = explain_vector(vector, sae, density_F, top=top)
    return {"sae": str(sae_dir), "density_source": source, **result}


def format_explanation(explanation: dict[str, Any]) -> str:
    """Per decomposition: the dense shares, then one line per top feature."""
    lines = [
        f"explained with {explanation['sae']} ({explanation['d_sae']} features, densities from "
        f"{explanation['density_source']}), vector norm {explanation['norm']:.4g}"
    ]
    for how in DECOMPOSITIONS:
        part = explanation[how]
        dense = ", ".join(
            f"density > {float(t):.0%}: {s:+.3f} (norm {part['dense_norm_share'][t]:.3f})"
            for t, s in part["dense_share"].items()
        )
        lines.append(
            f"{how}: {part['active']} features, explains {part['explained_share']:.3f} "
            f"(error {part['recon_rel_error']:.3g}); dense share {dense}"
        )
        lines.append(f"  {'feature':>8}  {'coef':>10}  {'share':>8}  {'density':>9}")
        for row in part["features"]:
            lines.append(
                f"  {row['feature']:>8}  {row['coef']:>10.4g}  {row['share']:>+8.3f}  "
                f"{row['density']:>9.2%}"
            )
    return "\n".join(lines)
