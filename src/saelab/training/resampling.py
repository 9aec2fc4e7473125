"""Dead-feature resampling (Bricken et al. 2023, "Towards Monosemanticity"; METHODS §1.1).

After every ``train.resample_every_steps`` steps (up to ``train.resample_until_frac`` of the run),
each feature that has not fired in the last ``train.resample_window_tokens`` tokens gets a new
direction. An input the SAE reconstructs badly, drawn without replacement with probability ∝ its
squared loss ``ℓ_j²``, ``ℓ_j = ‖x_j − x̂(x_j)‖²`` (``train.resample_weighting``), becomes

* its decoder row: ``W_dec[i] = u_j = x_j / ‖x_j‖``;
* its encoder column: ``W_enc[:, i] = 0.2 · mean_{alive a} ‖W_enc[:, a]‖ · u_j``;
* ``b_enc[i] = 0``; ``b_dec`` is untouched;

and Adam's ``exp_avg`` and ``exp_avg_sq`` are zeroed for exactly those entries. The learning rate
then warms up again from 0.1× (:func:`~saelab.training.schedules.resample_lr_multiplier`).

Where the candidate inputs come from. The paper scores 819,200 fresh inputs with the current
model. Holding that many (1.9 GB at d_in 576), whether as batches pulled ahead of the trainer or
as a reservoir of recent batches, and checkpointing them for an exact resume, would cost far more
than the SAE itself. Instead the training batches of the last ``ceil(resample_sample_tokens /
batch_size)`` steps before each resample are scored by the reconstruction their training step
computed anyway, and streamed through a weighted reservoir (:class:`InputReservoir`). Each input
gets the key ``log w_j − log E_j`` with ``E_j ~ Exp(1)`` (Gumbel-top-k); the ``n`` largest keys of
a stream are a draw of ``n`` without replacement, one at a time with probability ∝ ``w``
(Efraimidis & Spirakis 2006): what ``torch.multinomial(w, n)`` would draw from all the inputs at
once, in ``d_sae × d_in`` memory. The price: an input's loss comes from the model of the step that
saw it, at most that many steps before the resample (200 of 25,000 steps in the paper's setting).
Those batches are trained on as usual; nothing extra is taken from the stream.

Units: inputs are the trainer's normalised activations. When the architecture subtracts ``b_dec``
before encoding, the new direction is ``x_j − b_dec`` (the current ``b_dec``, normalised): that
is what the encoder sees, and what the decoder adds onto ``b_dec``. Otherwise it is ``x_j``.

Deliberate readings of the pitfalls in METHODS §1.1: the weighting is the literal ``ℓ²`` by
default (``loss`` weights by ``ℓ`` itself, ``uniform`` ignores it; dictionary_learning uses the
unsquared norm ``‖x − x̂‖``); the encoder column is built from the *unit* input
(dictionary_learning skips that normalisation); every event is logged; PyTorch's Adam keeps one
step counter per parameter, so bias correction is not restarted with the moments (as in every
reference implementation). The learning-rate warm-up restarts only for an SAE that had features
resampled.

Data-parallel training: each process offers its share of the batch, with the noise of those
rows in the whole batch's draw (``row_offset``, ``total_rows``), and keeps its own reservoir. At a
resample the processes gather their top ``n`` keys and inputs and take the top ``n`` of those:
the ``n`` largest keys of everything offered, as one process would have drawn them.

Example::

    resampler = FeatureResampler(train_cfg, sae, seed=0)
    for step in range(total):                  # what Trainer does
        out = sae.training_step(x_BD)          # ... backward, optimiser step ...
        resampler.offer_(step, x_BD, out.recon_BD)
        if resample_due(step + 1, train_cfg):
            resampler.resample_(step + 1, sae, optimizer, tokens_since_fired_F)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from saelab.config import TrainConfig
from saelab.errors import SaelabError
from saelab.saes.base import SparseAutoencoder
from saelab.training.schedules import resample_lr_multiplier

log = logging.getLogger(__name__)

ENCODER_NORM_FACTOR = 0.2
"""New encoder columns get this times the mean norm of the alive features' encoder columns."""

LOSS_EXPONENTS = {"loss_squared": 2.0, "loss": 1.0, "uniform": 0.0}
"""``train.resample_weighting`` (one of ``saelab.config.RESAMPLE_WEIGHTINGS``) → the power of the
per-input loss that weights its chance."""

_RESAMPLED_PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")
"""The parameters resampling knows how to treat; an SAE with others is refused."""


# ----- when ---------------------------------------------------------------------------------------


def resample_due(step: int, cfg: TrainConfig) -> bool:
    """Whether to resample once ``step`` optimiser steps are done (never after the last one)."""
    every = cfg.resample_every_steps
    return (
        every > 0
        and step > 0
        and step % every == 0
        and step <= cfg.resample_until_frac * cfg.steps
        and step < cfg.steps
    )


def sample_steps(cfg: TrainConfig) -> int:
    """Training steps before each resample whose inputs are candidates (at most an interval)."""
    wanted = math.ceil(cfg.resample_sample_tokens / cfg.batch_size)
    return max(1, min(wanted, cfg.resample_every_steps))


def collects_at(step: int, cfg: TrainConfig) -> bool:
    """Whether the step with 0-based index ``step`` offers its inputs as candidates: it is one
    of the :func:`sample_steps` steps just before a due resample."""
    if cfg.resample_every_steps <= 0:
        return False
    event = (step // cfg.resample_every_steps + 1) * cfg.resample_every_steps
    return resample_due(event, cfg) and step >= event - sample_steps(cfg)


# ----- which inputs -------------------------------------------------------------------------------


def input_log_weights(loss_B: Float[Tensor, " B"], weighting: str) -> Float[Tensor, " B"]:
    """``log w`` of each input: ``power · log ℓ`` (``−inf`` for a zero loss, never chosen), or 0
    for ``uniform``."""
    power = LOSS_EXPONENTS[weighting]
    if power == 0:
        return torch.zeros_like(loss_B, dtype=torch.float32)
    log_w_B = power * loss_B.float().log()
    return torch.nan_to_num(log_w_B, nan=-math.inf, posinf=math.inf)


class InputReservoir:
    """A weighted sample without replacement over a stream of inputs, in ``capacity`` rows.

    Keeps the ``capacity`` inputs with the largest Gumbel keys ``log w − log E``; the first ``n``
    of them (:meth:`sample`) are distributed as ``n`` successive draws ∝ ``w`` without
    replacement from everything offered. Inputs of weight 0 are never returned.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys_C: Tensor | None = None
        self.x_CD: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys_C is None else int(torch.isfinite(self.keys_C).sum())

    @torch.no_grad()
    def offer_(
        self,
        x_BD: Float[Tensor, "B D"],
        log_weight_B: Float[Tensor, " B"],
        generator: torch.Generator,
        noise_rows: tuple[int, int] | None = None,
    ) -> None:
        """Consider a batch of inputs. ``generator`` (CPU) draws the keys' noise, so a seeded run
        draws the same noise on any device (and never waits on the device to do so).
        ``noise_rows = (offset, total)``: the batch is rows ``offset …`` of a batch of ``total``
        whose noise ``generator`` draws (one share of a data-parallel batch)."""
        batch = x_BD.shape[0]
        offset, total = noise_rows or (0, batch)
        noise_B = torch.empty(total, dtype=torch.float64).exponential_(generator=generator)
        noise_B = noise_B[offset : offset + batch]
        noise_B.clamp_min_(1e-300)  # a zero would make a key +inf (or NaN for zero weight)
        keys_B = log_weight_B.to(x_BD.device, torch.float64) - noise_B.to(x_BD.device).log()
        if self.keys_C is None or self.x_CD is None:
            self.keys_C = torch.full(
                (self.capacity,), -math.inf, dtype=torch.float64, device=x_BD.device
            )
            self.x_CD = x_BD.new_zeros(self.capacity, x_BD.shape[1], dtype=torch.float32)
        all_keys = torch.cat([self.keys_C, keys_B])
        kept = torch.zeros(all_keys.numel(), dtype=torch.bool, device=all_keys.device)
        kept[all_keys.topk(self.capacity).indices] = True
        # As many stored rows drop out as batch rows come in; the newcomers take their slots.
        free_slots = (~kept[: self.capacity]).nonzero().squeeze(-1)
        entering = kept[self.capacity :].nonzero().squeeze(-1)
        self.keys_C[free_slots] = keys_B[entering]
        self.x_CD[free_slots] = x_BD[entering].detach().float()

    def sample(self, n: int) -> Float[Tensor, "N D"]:
        """Up to ``n`` chosen inputs, most strongly chosen first (fewer if fewer have weight)."""
        if self.keys_C is None or self.x_CD is None or n <= 0:
            return torch.zeros(0, 0)
        top_keys, top_idx = self.keys_C.topk(min(n, self.capacity))
        return self.x_CD[top_idx[torch.isfinite(top_keys)]]

    def top(self, n: int, d_in: int) -> tuple[Float[Tensor, " N"], Float[Tensor, "N D"]]:
        """The ``n`` largest keys and their inputs, padded with ``−inf`` keys (and zero rows) to
        exactly ``n``, so that processes can gather them with one fixed shape."""
        keys_N = torch.full((n,), -math.inf, dtype=torch.float64)
        x_ND = torch.zeros(n, d_in)
        if self.keys_C is not None and self.x_CD is not None and n > 0:
            keys_N, x_ND = keys_N.to(self.keys_C.device), x_ND.to(self.x_CD.device)
            top_keys, top_idx = self.keys_C.topk(min(n, self.capacity))
            keys_N[: top_keys.numel()] = top_keys
            x_ND[: top_keys.numel()] = self.x_CD[top_idx]
        return keys_N, x_ND

    def clear_(self) -> None:
        self.keys_C = self.x_CD = None

    def state_dict(self) -> dict[str, Any]:
        return {"keys": self.keys_C, "x": self.x_CD}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        keys, x = state.get("keys"), state.get("x")
        self.keys_C = None if keys is None else keys.to(device)
        self.x_CD = None if x is None else x.to(device)


# ----- the change to the weights ------------------------------------------------------------------


def check_resamplable(sae: SparseAutoencoder) -> None:
    """Refuse SAEs whose per-feature state resampling would leave inconsistent."""
    extra = sorted(n for n, _ in sae.named_parameters() if n not in _RESAMPLED_PARAMETERS)
    # A transcoder's decoder writes another hook: an input is no direction for it.
    predicts_other = getattr(sae.cfg, "output_hook", None) is not None
    if extra or sae.b_enc is None or predicts_other:
        what = f"parameters {', '.join(extra)}" if extra else "no b_enc or a separate output"
        raise SaelabError(
            f"dead-feature resampling supports SAEs with only W_enc, b_enc, W_dec and b_dec; "
            f"{sae.architecture} has {what}; set train.resample_every_steps = 0"
        )


@torch.no_grad()
def resample_features_(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    dead_F: Bool[Tensor, " F"],
    inputs_ND: Float[Tensor, "N D"],
) -> Int[Tensor, " R"]:
    """Give the dead features new directions from ``inputs_ND`` (normalised units, in order) and
    zero their Adam moments; returns the indices of the ``R = min(#dead, N)`` features changed
    (the first ``R`` dead ones)."""
    dead_idx = dead_F.nonzero().squeeze(-1)
    n = min(dead_idx.numel(), inputs_ND.shape[0])
    idx = dead_idx[:n]
    if n == 0:
        return idx
    x_ND = inputs_ND[:n].to(sae.W_dec.device, sae.W_dec.dtype)
    # What the encoder sees: centred by b_dec when the architecture subtracts it.
    directions_ND = sae.sae_input(x_ND)
    directions_ND = directions_ND / directions_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    enc_norms_F = sae.W_enc.norm(dim=0)
    alive_F = ~dead_F
    # With no alive feature there is no reference scale; all features' norms stand in.
    ref_norm = enc_norms_F[alive_F].mean() if bool(alive_F.any()) else enc_norms_F.mean()
    sae.W_dec[idx] = directions_ND
    sae.W_enc[:, idx] = (ENCODER_NORM_FACTOR * ref_norm * directions_ND).T
    sae.b_enc[idx] = 0
    for param, dim in ((sae.W_enc, 1), (sae.b_enc, 0), (sae.W_dec, 0)):
        zero_adam_moments_(optimizer, param, idx, dim)
    return idx


def zero_adam_moments_(
    optimizer: torch.optim.Optimizer, param: Tensor, idx: Int[Tensor, " R"], dim: int
) -> None:
    """Zero Adam's running moments of ``param`` at ``idx`` along ``dim``; nothing else."""
    state = optimizer.state.get(param)
    if not state:
        return  # no step taken yet: the moments do not exist
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, idx.to(state[key].device), 0)


# ----- one SAE's resampling state -----------------------------------------------------------------


class FeatureResampler:
    """Collects candidate inputs before each due step, resamples, and says the LR factor.

    ``seed`` fixes which inputs are drawn; it, the last resample step and the reservoir are the
    whole state (:meth:`state_dict`), so a resumed run resamples exactly as an uninterrupted one.
    """

    def __init__(self, cfg: TrainConfig, sae: SparseAutoencoder, seed: int) -> None:
        if cfg.resample_every_steps > 0:
            check_resamplable(sae)
        self.cfg = cfg
        self.seed = int(seed)
        self.reservoir = InputReservoir(sae.d_sae)
        self.last_resample_step: int | None = None
        """The step count at which features were last resampled (None: never)."""

    def lr_multiplier(self, step: int) -> float:
        """Learning-rate factor for the step with 0-based index ``step``."""
        since = None if self.last_resample_step is None else step - self.last_resample_step
        return resample_lr_multiplier(since, self.cfg.resample_lr_warmup_steps)

    @torch.no_grad()
    def offer_(
        self,
        step: int,
        x_BD: Float[Tensor, "B D"],
        recon_BD: Float[Tensor, "B D"],
        *,
        row_offset: int = 0,
        total_rows: int | None = None,
    ) -> None:
        """Offer the batch of step ``step`` (0-based) with the reconstruction its training step
        made; does nothing outside the sampling window before a due resample. A data-parallel
        process offers rows ``row_offset …`` of a batch of ``total_rows``."""
        if not collects_at(step, self.cfg):
            return
        loss_B = (x_BD.float() - recon_BD.detach().float()).pow(2).sum(-1)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2**63)
        log_w_B = input_log_weights(loss_B, self.cfg.resample_weighting)
        rows = x_BD.shape[0]
        total = rows if total_rows is None else total_rows
        self.reservoir.offer_(x_BD, log_w_B, generator, noise_rows=(row_offset, total))

    def resample_(
        self,
        step: int,
        sae: SparseAutoencoder,
        optimizer: torch.optim.Optimizer,
        tokens_since_fired_F: Int[Tensor, " F"],
        gather: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, int]:
        """Resample the features dead by the resampling window; the changed ones count as just
        fired. Returns ``n_dead`` and ``n_resampled``. ``gather`` (data-parallel training)
        concatenates a tensor's rows over the processes, whose candidates then compete."""
        dead_F = tokens_since_fired_F >= self.cfg.resample_window_tokens
        n_dead = int(dead_F.sum())
        if gather is None or n_dead == 0:
            inputs_ND = self.reservoir.sample(n_dead)
        else:
            keys_N, x_ND = self.reservoir.top(n_dead, sae.d_in)
            keys_all, x_all = gather(keys_N.to(sae.W_dec.device)), gather(x_ND.to(sae.W_dec.device))
            top_keys, top_idx = keys_all.topk(min(n_dead, keys_all.numel()))
            inputs_ND = x_all[top_idx[torch.isfinite(top_keys)]]
        idx = resample_features_(sae, optimizer, dead_F, inputs_ND)
        tokens_since_fired_F[idx] = 0
        self.reservoir.clear_()
        if idx.numel():
            self.last_resample_step = step
        if idx.numel() < n_dead:
            log.warning(
                "only %d candidate inputs with non-zero weight for %d dead features at step %d; "
                "raise train.resample_sample_tokens",
                idx.numel(),
                n_dead,
                step,
            )
        return {"n_dead": n_dead, "n_resampled": int(idx.numel())}

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "last_resample_step": self.last_resample_step,
            "reservoir": self.reservoir.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.seed = int(state["seed"])
        last = state["last_resample_step"]
        self.last_resample_step = None if last is None else int(last)
        self.reservoir.load_state_dict(state["reservoir"], device)
