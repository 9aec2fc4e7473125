"""Running sums that turn into reconstruction and sparsity metrics (METHODS §2.3, §6.1, §6.3).

Everything is a global sum over all tokens seen, in float64, turned into ratios at the end: FVU
against the *dataset* mean, γ from global sums (not a mean of per-batch ratios), densities from
firing counts. Used by the trainer (windowed) and by ``saelab eval`` (whole run); it lives
beside the SAEs because both sit downstream of it.

Definitions (t tokens, x input, x̂ reconstruction, μ dataset mean of x):

* ``l0``  = E_t #{i : f_i > 0}
* ``mse`` = E_t ‖x − x̂‖²  (summed over d_in)
* ``fvu`` = Σ‖x − x̂‖² / Σ‖x − μ‖²,  with Σ‖x − μ‖² = Σ‖x‖² − n‖μ‖²
* ``explained_variance`` = 1 − Σ_d Var_t(x − x̂)_d / Σ_d Var_t(x)_d  (residual centred too, so a
  constant offset is not counted; ``1 − fvu`` counts it)
* ``gamma`` = Σ‖x̂‖² / Σ x·x̂  (relative reconstruction bias; 1 is unbiased, < 1 shrinkage)
* ``frac_dead``  = share of features that never fired on the evaluated tokens
* ``frac_dense`` = share of features firing on more than 10 % of tokens
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

DENSE_THRESHOLD = 0.1
"""Features firing on more than this fraction of tokens count as dense / high-frequency."""

DENSITY_EPS = 1e-10
"""Added before log10 so that dead features get a finite log density."""

_CHUNK_ELEMENTS = 1 << 18
"""Elements per float64 block in :meth:`ReconstructionStats.update` (2 MiB, stays in cache)."""
_GPU_CHUNK_ELEMENTS = 1 << 25
"""On a GPU small chunks only add kernel launches (measured: 36 chunks of a 16k batch took more
time than the SAE's whole forward and backward); one chunk up to 256 MiB of float64."""


class ReconstructionStats:
    """Global sums over every token passed to :meth:`update`."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        self.d_in = d_in
        self.d_sae = d_sae
        self.reset()

    def reset(self) -> None:
        f64 = torch.float64
        self.n_tokens = 0
        self.sum_l0 = 0.0
        self.sum_x_D = torch.zeros(self.d_in, dtype=f64)
        self.sum_err_D = torch.zeros(self.d_in, dtype=f64)
        self.sum_sq_x = 0.0
        self.sum_sq_recon = 0.0
        self.sum_sq_err = 0.0
        self.sum_dot = 0.0
        self.sum_cos = 0.0
        self.sum_l2_ratio = 0.0
        self.fired_F = torch.zeros(self.d_sae, dtype=torch.int64)

    @torch.no_grad()
    def update(
        self,
        x_BD: Float[Tensor, "B D"],
        recon_BD: Float[Tensor, "B D"],
        l0_B: Int[Tensor, " B"],
        fired_F: Int[Tensor, " F"],
    ) -> None:
        x_BD, recon_BD = x_BD.detach(), recon_BD.detach()
        device = x_BD.device
        # float64 a block of rows at a time: the same sums, without float64 copies of the whole
        # batch (each a fresh allocation that costs a page fault per 4 KiB on first touch). The
        # sums are taken where the batch lives and only they cross to the CPU, in one copy: on a
        # GPU, moving the batch itself cost more than the rest of the training step.
        chunk = _CHUNK_ELEMENTS if device.type == "cpu" else _GPU_CHUNK_ELEMENTS
        rows = max(1, chunk // max(self.d_in, 1))
        sums = torch.zeros(7 + 2 * self.d_in, dtype=torch.float64, device=device)
        sums_6, sum_x_D, sum_err_D = sums[:6], sums[7 : 7 + self.d_in], sums[7 + self.d_in :]
        for start in range(0, x_BD.shape[0], rows):
            x = x_BD[start : start + rows].to(torch.float64)
            recon = recon_BD[start : start + rows].to(torch.float64)
            err = x - recon
            x_norm = x.norm(dim=-1)
            recon_norm = recon.norm(dim=-1)
            dot_B = torch.linalg.vecdot(x, recon)
            sum_x_D += x.sum(0)
            sum_err_D += err.sum(0)
            sums_6 += torch.stack(
                [
                    x_norm.pow(2).sum(),
                    recon_norm.pow(2).sum(),
                    err.pow(2).sum(),
                    dot_B.sum(),
                    (dot_B / (x_norm * recon_norm).clamp_min(1e-12)).sum(),
                    (recon_norm / x_norm.clamp_min(1e-12)).sum(),
                ]
            )
        sums[6] = l0_B.sum()
        sums = sums.cpu()
        sq_x, sq_recon, sq_err, dot, cos, l2_ratio, l0 = sums[:7].tolist()
        self.sum_x_D += sums[7 : 7 + self.d_in]
        self.sum_err_D += sums[7 + self.d_in :]
        self.n_tokens += x_BD.shape[0]
        self.sum_l0 += l0
        self.sum_sq_x += sq_x
        self.sum_sq_recon += sq_recon
        self.sum_sq_err += sq_err
        self.sum_dot += dot
        self.sum_cos += cos
        self.sum_l2_ratio += l2_ratio
        self.fired_F += fired_F.detach().to("cpu", torch.int64)

    # ----- as one vector (sums over processes) -------------------------------------------------

    _SCALARS = (
        "n_tokens",
        "sum_l0",
        "sum_sq_x",
        "sum_sq_recon",
        "sum_sq_err",
        "sum_dot",
        "sum_cos",
        "sum_l2_ratio",
    )
    _VECTORS = ("sum_x_D", "sum_err_D", "fired_F")

    def to_flat(self) -> Float[Tensor, " N"]:
        """Every sum in one float64 vector `[8 + 2·d_in + d_sae]`, so that summing vectors
        (an all-reduce) sums the statistics; :meth:`from_flat_` reads one back."""
        scalars = torch.tensor([getattr(self, n) for n in self._SCALARS], dtype=torch.float64)
        return torch.cat([scalars, *(getattr(self, n).double() for n in self._VECTORS)])

    def from_flat_(self, flat: Float[Tensor, " N"]) -> ReconstructionStats:
        """Set every sum from a :meth:`to_flat` vector (counts rounded back to integers)."""
        for name, value in zip(self._SCALARS, flat[: len(self._SCALARS)].tolist(), strict=True):
            setattr(self, name, round(value) if name == "n_tokens" else value)
        offset = len(self._SCALARS)
        for name in self._VECTORS:
            vector = getattr(self, name)
            part = flat[offset : offset + vector.numel()].to(vector.device)
            vector.copy_(part if vector.is_floating_point() else part.round())
            offset += vector.numel()
        return self

    # ----- results ----------------------------------------------------------------------------

    def _n(self) -> int:
        return max(self.n_tokens, 1)

    def total_variance(self) -> float:
        """Σ_t ‖x_t − μ‖² with μ the mean of the tokens seen."""
        n = self._n()
        return self.sum_sq_x - float(self.sum_x_D.pow(2).sum()) / n

    def feature_density(self) -> Float[Tensor, " F"]:
        return self.fired_F.double() / self._n()

    def log10_feature_density(self) -> Float[Tensor, " F"]:
        return torch.log10(self.feature_density() + DENSITY_EPS)

    def compute(self) -> dict[str, float]:
        n = self._n()
        total_var = self.total_variance()
        residual_var = self.sum_sq_err - float(self.sum_err_D.pow(2).sum()) / n
        density = self.feature_density()
        nan = float("nan")
        return {
            "l0": self.sum_l0 / n,
            "mse": self.sum_sq_err / n,
            "fvu": self.sum_sq_err / total_var if total_var > 0 else nan,
            "explained_variance": 1 - residual_var / total_var if total_var > 0 else nan,
            "gamma": self.sum_sq_recon / self.sum_dot if self.sum_dot != 0 else nan,
            "cos_sim": self.sum_cos / n,
            "l2_ratio": self.sum_l2_ratio / n,
            "frac_dead": float((self.fired_F == 0).double().mean()),
            "frac_dense": float((density > DENSE_THRESHOLD).double().mean()),
        }


FREQ_THRESHOLDS = {"freq_over_1_percent": 0.01, "freq_over_10_percent": 0.1}
"""SAEBench's high-frequency counts: the share of features with density above each threshold."""


def frequency_metrics(density_F: Float[Tensor, " F"]) -> dict[str, float]:
    """``freq_over_1_percent`` and ``freq_over_10_percent`` of feature densities (METHODS §6.3)."""
    return {
        name: float((density_F > threshold).double().mean())
        for name, threshold in FREQ_THRESHOLDS.items()
    }


@torch.no_grad()
def max_decoder_cos(W_dec_FD: Float[Tensor, "F D"], chunk: int = 1024) -> float:
    """max_i max_{j≠i} |cos(d_i, d_j)| over decoder rows (SAEBench's max decoder cosine).

    Rows are compared ``chunk`` at a time against all others, so memory stays at
    ``chunk × F`` floats rather than ``F × F`` (16k features would need 1 GiB at once).
    A zero row has cosine 0 with everything. Fewer than two rows give 0.
    """
    n_features = W_dec_FD.shape[0]
    if n_features < 2:
        return 0.0
    unit_FD = W_dec_FD.float() / W_dec_FD.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best = 0.0
    for start in range(0, n_features, chunk):
        cos_CF = (unit_FD[start : start + chunk] @ unit_FD.T).abs()
        rows = torch.arange(cos_CF.shape[0], device=cos_CF.device)
        cos_CF[rows, rows + start] = 0.0  # a row's cosine with itself is not a duplicate
        best = max(best, float(cos_CF.max()))
    return best
