"""The training loop: one activation stream, one or many SAEs, each with its own optimiser.

The trainer never sees the language model. It takes an iterable of ``{hook: [batch, d_in]}``
batches in normalised units (an :class:`~saelab.data.activations.ActivationStream`, a cache
reader, or ``torch.randn`` in tests) and N SAEs; every batch feeds every SAE on its hook, so a sweep
costs one pass of the model. A stream may expose ``scales`` (hook → activation scale),
``state_dict()`` and ``load_state_dict()``; with them, checkpoints resume bit-exactly.

Under torchrun the trainer takes a :class:`~saelab.training.distributed.Distributed`: data-parallel,
every process trains every SAE on its share of each batch and the named side concerns below reduce
over the processes (see that module); SAE-parallel, each process holds only its SAEs
(``sae_ids`` are their indices in the run) and log lines and results are gathered to rank 0.

Example::

    trainer = Trainer([TopKSAE(SAEConfig(hook="h"), d_in=64)], TrainConfig(tokens=10_000), out)
    trainer.fit({"h": torch.randn(4096, 64)} for _ in range(3))
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.config import TrainConfig
from saelab.errors import SaelabError
from saelab.saes.base import SparseAutoencoder, TrainStepOutput
from saelab.saes.metrics import ReconstructionStats
from saelab.saes.registry import sae_folder_name
from saelab.saes.storage import save_sae
from saelab.signals import Interrupted, InterruptGuard
from saelab.training.checkpoint import latest_checkpoint, load_state, write_checkpoint
from saelab.training.distributed import Distributed
from saelab.training.interruptions import interruptions_reported
from saelab.training.loggers import RunLogger
from saelab.training.process import tune_for_training
from saelab.training.resampling import FeatureResampler, resample_due
from saelab.training.schedules import lr_multiplier, penalty_multiplier

log = logging.getLogger(__name__)


@dataclass
class SAEState:
    """One SAE's training state besides its weights."""

    sae: SparseAutoencoder
    optimizer: torch.optim.Optimizer
    base_lr: float
    folder: str
    window: ReconstructionStats
    """Metrics since the last log line."""
    fired_total_F: torch.Tensor
    """Tokens on which each feature fired, over the whole run (for the saved density)."""
    tokens_since_fired_F: torch.Tensor
    """Tokens since each feature last fired; ≥ the dead window means dead."""
    last_losses: dict[str, float] = field(default_factory=dict)
    resampler: FeatureResampler | None = None
    """Dead-feature resampling state: candidate inputs and the last resample step."""

    def dead_F(self) -> torch.Tensor:
        return self.tokens_since_fired_F >= self.sae.cfg.dead_window_tokens


def _adam(
    params: list[torch.nn.Parameter] | list[dict[str, Any]], lr: float, betas: tuple[float, float]
) -> torch.optim.Optimizer:
    """Adam, with PyTorch's fused kernel where it has one (CPU from 2.4, CUDA).

    The default CPU Adam runs about eight elementwise passes per parameter, each allocating a
    temporary; the fused kernel makes one pass and was ~10× faster for a 9k-feature SAE. Same
    update rule, so results agree to float rounding.
    """
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=betas)


def _param_groups(sae: SparseAutoencoder) -> list[dict[str, Any]]:
    """One Adam group of the parameters at the run's rate, then one per :meth:`lr_scales` entry
    (``lr_scale`` multiplies the scheduled rate); a single group when there are none."""
    scales = sae.lr_scales()
    named = dict(sae.named_parameters())
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in named.items() if n not in scales], "lr_scale": 1.0}
    ]
    groups += [{"params": [named[n]], "lr_scale": float(s)} for n, s in scales.items()]
    return groups


def _inputs(sae: SparseAutoencoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What an SAE reads: its hook's batch; an SAE that declares ``input_hooks`` (a cross-layer
    transcoder) gets those hooks' batches concatenated along the width."""
    hooks = getattr(sae, "input_hooks", None)
    return batch[sae.cfg.hook] if hooks is None else torch.cat([batch[h] for h in hooks], -1)


def _target(sae: SparseAutoencoder, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What a transcoder predicts (its output hook's batch, or its ``output_hooks``'
    concatenated); None for an autoencoder."""
    hooks = getattr(sae, "output_hooks", None)
    if hooks is not None:
        return torch.cat([batch[h] for h in hooks], -1)
    return None if sae.cfg.output_hook is None else batch[sae.cfg.output_hook]


class Trainer:
    def __init__(
        self,
        saes: list[SparseAutoencoder],
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        progress: bool = True,
        tensorboard: bool = True,
        metadata: dict[str, Any] | None = None,
        dist: Distributed | None = None,
        sae_ids: list[int] | None = None,
    ) -> None:
        self.cfg = cfg
        if cfg.autocast_bf16:
            self._check_autocast(saes)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.dist = dist or Distributed()
        self.sae_ids = list(range(len(saes))) if sae_ids is None else list(sae_ids)
        """Each SAE's index in the run (checkpoint names, order of gathered results)."""
        self.progress = progress and self.dist.is_main
        self.metadata = metadata or {}
        self.step = 0
        self.tokens = 0
        self.states = [self._new_state(sae) for sae in saes]
        writes_logs = self.out_dir is not None and self.dist.is_main
        self.logger = RunLogger(self.out_dir, tensorboard) if writes_logs else None
        self._next_checkpoint = cfg.checkpoint_every_tokens or None
        self._saved_step = 0
        """The step of the newest checkpoint in ``out_dir`` (0: none, or only the start)."""

    def _new_state(self, sae: SparseAutoencoder) -> SAEState:
        # Here rather than in the run, so any caller of the trainer (benchmarks, notebooks) has
        # the same step speed.
        tune_for_training(str(sae.W_enc.device))
        lr = self.cfg.lr if self.cfg.lr is not None else type(sae).default_lr(sae.d_sae)
        optimizer = _adam(_param_groups(sae), lr, (self.cfg.adam_beta1, self.cfg.adam_beta2))
        device = sae.W_enc.device
        folder = sae_folder_name(sae.cfg)
        return SAEState(
            sae=sae,
            optimizer=optimizer,
            base_lr=lr,
            folder=folder,
            window=ReconstructionStats(sae.d_out, sae.d_sae),
            fired_total_F=torch.zeros(sae.d_sae, dtype=torch.int64, device=device),
            tokens_since_fired_F=torch.zeros(sae.d_sae, dtype=torch.int64, device=device),
            # Seeded by the run's seed and the SAE's folder: sweeps draw independent inputs.
            resampler=FeatureResampler(
                self.cfg, sae, seed=torch.initial_seed() + zlib.crc32(folder.encode())
            ),
        )

    # ----- the story ----------------------------------------------------------------------------

    def fit(self, stream: Iterable[dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
        """Train every SAE for ``cfg.tokens`` tokens; returns final metrics per SAE folder.

        Ctrl-C or SIGTERM stops it between two steps, with a checkpoint to ``--resume`` from
        (:meth:`_stop_if_asked`); the result is :class:`~saelab.signals.Interrupted`.
        """
        total = self.cfg.steps
        bar = tqdm(
            total=total,
            initial=self.step,
            disable=not self.progress,
            unit="step",
            desc="train",
            dynamic_ncols=True,
        )
        started = time.perf_counter()
        batches = iter(stream)
        with bar, self._interruptions() as guard:
            while self.step < total:
                batch = next(batches, None)
                if batch is None:
                    raise SaelabError(
                        f"the activation stream ran out after {self.tokens:,} tokens of "
                        f"{self.cfg.tokens:,}; use a larger dataset or fewer --tokens"
                    )
                if self.step == 0:
                    self._init_from_first_batch(batch, stream)
                for state in self.states:
                    self._train_step(state, _inputs(state.sae, batch), _target(state.sae, batch))
                self.step += 1
                self.tokens += self._batch_tokens(batch) * self.dist.data_world
                self._resample_if_due()
                if self.step % self.cfg.log_every_steps == 0 or self.step == total:
                    bar.set_postfix(self._log_window(time.perf_counter() - started), refresh=False)
                bar.update(1)
                self._checkpoint_if_due(stream, guard)
                self._stop_if_asked(stream, guard)
        with interruptions_reported(self.out_dir, "interrupted while saving the trained SAEs"):
            return self._finish(stream)

    # ----- named side concerns ------------------------------------------------------------------

    def _init_from_first_batch(self, batch: dict[str, torch.Tensor], stream: Any) -> None:
        scales = getattr(stream, "scales", None) or {}
        whole: dict[str, torch.Tensor] = {}  # the whole first batch of a hook, over processes
        for state in self.states:
            hook = state.sae.cfg.hook
            multi = getattr(state.sae, "input_hooks", None)
            if multi is not None:  # reads several hooks (a cross-layer transcoder)
                missing = [h for h in (*multi, *state.sae.output_hooks) if h not in batch]
                if missing:
                    raise SaelabError(
                        f"SAE {state.folder} needs hook {missing[0]!r} but the stream yields "
                        f"{sorted(batch)}; add the hook to the stream"
                    )
                state.sae.set_hook_scales_(scales)
                self.dist.broadcast_module_(state.sae)
                continue
            if hook not in batch:
                raise SaelabError(
                    f"SAE {state.folder} needs hook {hook!r} but the stream yields "
                    f"{sorted(batch)}; add the hook to the stream"
                )
            x_BD = batch[hook]
            if x_BD.shape[-1] != state.sae.d_in:
                raise SaelabError(
                    f"SAE {state.folder} has d_in={state.sae.d_in} but hook {hook} gives "
                    f"width {x_BD.shape[-1]}"
                )
            state.sae.activation_scale.fill_(float(scales.get(hook, 1.0)))
            output_hook = state.sae.cfg.output_hook
            if output_hook is not None:
                if output_hook not in batch:
                    raise SaelabError(
                        f"transcoder {state.folder} predicts hook {output_hook!r} but the stream "
                        f"yields {sorted(batch)}; add the hook to the stream"
                    )
                if batch[output_hook].shape[-1] != state.sae.d_out:
                    raise SaelabError(
                        f"transcoder {state.folder} has d_out={state.sae.d_out} but hook "
                        f"{output_hook} gives width {batch[output_hook].shape[-1]}"
                    )
                state.sae.output_scale.fill_(float(scales.get(output_hook, 1.0)))
            if hook not in whole:
                whole[hook] = self.dist.gather_rows(x_BD)
            state.sae.init_from_data_(whole[hook])
            self.dist.broadcast_module_(state.sae)

    def _train_step(
        self, state: SAEState, x_BD: torch.Tensor, target_BD: torch.Tensor | None = None
    ) -> TrainStepOutput:
        """One optimiser step; ``target_BD`` (a transcoder's output hook) replaces ``x_BD`` as
        what is reconstructed and scored."""
        sae, opt = state.sae, state.optimizer
        total = self.cfg.steps
        lr = state.base_lr * lr_multiplier(
            self.step, total, self.cfg.lr_warmup_frac, self.cfg.lr_decay_frac, self.cfg.lr_decay
        )
        if state.resampler is not None:
            lr *= state.resampler.lr_multiplier(self.step)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # Only transcoders take a target: ordinary architectures need not accept the keyword.
        target = {} if target_BD is None else {"target_BD": target_BD}
        with self._autocast():
            out = sae.training_step(
                x_BD,
                penalty_scale=penalty_multiplier(self.step, total, self.cfg.l1_warmup_frac),
                dead_F=state.dead_F(),
                **target,
            )
        out.loss.backward()
        # Data-parallel: the whole batch's gradients, firing counts and losses (one all-reduce).
        fired_F = out.feats.fired_counts()
        fired_all_F, losses = self.dist.sync_step_(sae, fired_F, out.losses)
        sae.before_optimizer_step_()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.after_optimizer_step_()
        self._update_feature_stats(
            state, out, x_BD if target_BD is None else target_BD, fired_F, fired_all_F
        )
        if state.resampler is not None:
            rows = x_BD.shape[0]
            state.resampler.offer_(
                self.step,
                x_BD,
                out.recon_BD,
                row_offset=self.dist.data_rank * rows,
                total_rows=self.dist.data_world * rows,
            )
        state.last_losses = {**losses, "lr": lr}
        return out

    def _update_feature_stats(
        self,
        state: SAEState,
        out: TrainStepOutput,
        x_BD: torch.Tensor,
        fired_F: torch.Tensor,
        fired_all_F: torch.Tensor,
    ) -> None:
        """Dead-feature counts from the whole batch (``fired_all_F``, every process's tokens);
        the log window from this process's share (summed over processes when logged)."""
        state.fired_total_F += fired_all_F
        state.tokens_since_fired_F += x_BD.shape[0] * self.dist.data_world
        state.tokens_since_fired_F.masked_fill_(fired_all_F > 0, 0)
        state.window.update(x_BD, out.recon_BD, out.feats.l0_per_token(), fired_F)

    @staticmethod
    def _check_autocast(saes: list[SparseAutoencoder]) -> None:
        if any(sae.W_enc.device.type != "cuda" for sae in saes):
            raise SaelabError(
                "train.autocast_bf16 needs the SAEs on a CUDA device; turn it off on the CPU"
            )
        for sae in saes:
            if not sae.supports_autocast_bf16:
                raise SaelabError(
                    f"train.autocast_bf16: the {sae.architecture} architecture's training kernels "
                    "run in float32 only so far; turn train.autocast_bf16 off"
                )

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast around the SAE's forward when ``train.autocast_bf16`` (CUDA only);
        the backward, the optimiser and the weights stay float32."""
        if not self.cfg.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def _resample_if_due(self) -> None:
        """Dead-feature resampling once a due step is done (METHODS §1.1); every event is
        logged, since resampling makes L0 and the loss jump."""
        if not resample_due(self.step, self.cfg):
            return
        gather = self.dist.gather_rows if self.dist.data_parallel else None
        events = []
        for i, state in zip(self.sae_ids, self.states, strict=True):
            if state.resampler is None:
                continue
            counts = state.resampler.resample_(
                self.step, state.sae, state.optimizer, state.tokens_since_fired_F, gather
            )
            log.info(
                "step %d: resampled %d of %d dead features of %s",
                self.step,
                counts["n_resampled"],
                counts["n_dead"],
                state.folder,
            )
            record = {"event": "resample", "step": self.step, "tokens": self.tokens}
            events.append((i, {**record, "sae": state.folder, **counts}))
        for record in self.dist.gather_in_order(events):
            if self.logger is not None:
                self.logger.log(record)

    @staticmethod
    def _batch_tokens(batch: dict[str, torch.Tensor]) -> int:
        return next(iter(batch.values())).shape[0]

    def _log_window(self, elapsed: float) -> dict[str, str]:
        """Write one log record per SAE; returns progress-bar fields for the first."""
        records = []
        for i, state in zip(self.sae_ids, self.states, strict=True):
            metrics = self.dist.reduce_stats_(state.window).compute()
            frac_dead = float(state.dead_F().double().mean())
            record = {
                "step": self.step,
                "tokens": self.tokens,
                "sae": state.folder,
                **state.last_losses,
                "l0": metrics["l0"],
                "fvu": metrics["fvu"],
                "frac_dead": frac_dead,
                "tokens_per_s": self.tokens / max(elapsed, 1e-9),
            }
            records.append((i, record))
            state.window.reset()
        records = self.dist.gather_in_order(records)
        for record in records:
            if self.logger is not None:
                self.logger.log(record)
        first = records[0]
        return {
            "L0": f"{first['l0']:.1f}",
            "FVU": f"{first['fvu']:.3f}",
            "dead": f"{first['frac_dead']:.1%}",
        }

    # ----- checkpoints ---------------------------------------------------------------------------

    def _checkpoint_if_due(self, stream: Any, guard: InterruptGuard) -> None:
        if self._next_checkpoint is None or self.out_dir is None:
            return
        if self.tokens >= self._next_checkpoint and self.step < self.cfg.steps:
            with guard.shield():  # a signal meanwhile waits for the checkpoint to be complete
                self.save_checkpoint(stream)
            while self._next_checkpoint <= self.tokens:
                self._next_checkpoint += self.cfg.checkpoint_every_tokens

    # ----- interruptions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _interruptions(self) -> Iterator[InterruptGuard]:
        """The guard the loop runs under. A first signal waits for the end of the step once
        there is a step since the last checkpoint to save (never under torchrun, where the
        processes would have to agree on the step); one that cannot wait (a second signal, or
        one with nothing new to save) stops at once, and the interruption says how far the last
        checkpoint is."""

        def where() -> str:
            return f"interrupted at step {self.step:,} ({self.tokens:,} tokens)"

        with interruptions_reported(self.out_dir, where), InterruptGuard() as guard:
            guard.armed = self._can_stop_with_checkpoint()
            yield guard

    def _can_stop_with_checkpoint(self) -> bool:
        return self.out_dir is not None and not self.dist.active and self.step > self._saved_step

    def _stop_if_asked(self, stream: Any, guard: InterruptGuard) -> None:
        """After a step, act on a signal received during it: write a checkpoint of this step
        (unless the periodic one just did) and raise :class:`Interrupted`.

        "Cheap" here means at most one step away: the checkpoint is the one ``--checkpoint-every``
        writes (SAE weights, Adam moments, the stream's buffer and position, RNG), taken at a
        step boundary so the stream position matches the step and ``--resume`` is exact. A
        second signal while it is written waits for it to be complete.
        """
        if guard.signum is None:
            guard.armed = self._can_stop_with_checkpoint()
            return
        wrote = self.step > self._saved_step
        if wrote:
            with guard.shield():
                self.save_checkpoint(stream)
        what = "a checkpoint was written" if wrote else "its checkpoint was already written"
        raise Interrupted(
            f"interrupted at step {self.step:,} ({self.tokens:,} tokens); {what}",
            resumable=True,
            signum=guard.signum,
        )

    def save_checkpoint(self, stream: Any) -> Path:
        """Write a checkpoint of this process's part: rank 0 (or a lone process) the trainer,
        its SAEs and stream; in ``ddp`` mode each other rank ``rank_R``: its stream position
        (unless every rank's is the same), RNG and resampling candidates; in ``sae`` mode each
        other rank its own SAEs."""
        if self.out_dir is None:
            raise SaelabError("checkpoints need an output directory")
        dist = self.dist
        states: dict[str, Any] = {}
        if dist.is_main:
            states["trainer"] = {
                "step": self.step,
                "tokens": self.tokens,
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "world_size": dist.world_size,
                "distributed": dist.mode if dist.active else None,
            }
            if hasattr(stream, "state_dict"):
                states["stream"] = stream.state_dict()
        elif dist.data_parallel:
            shared = getattr(stream, "state_is_shared", False) or not hasattr(stream, "state_dict")
            states[f"rank_{dist.rank}"] = {
                "rng": torch.get_rng_state(),
                "stream": None if shared else stream.state_dict(),
                "resamplers": [
                    None if s.resampler is None else s.resampler.state_dict() for s in self.states
                ],
                "windows": [dict(vars(s.window)) for s in self.states],
            }
        holds_saes = dist.is_main or dist.sae_parallel
        for i, state in zip(self.sae_ids, self.states, strict=True) if holds_saes else ():
            states[f"sae_{i}"] = {
                "folder": state.folder,
                "params": {k: v for k, v in state.sae.state_dict().items()},
                "activation_scale": state.sae.activation_scale,
                "optimizer": state.optimizer.state_dict(),
                "fired_total": state.fired_total_F,
                "tokens_since_fired": state.tokens_since_fired_F,
                "resampler": None if state.resampler is None else state.resampler.state_dict(),
                "window": dict(vars(state.window)),
            }
        path = write_checkpoint(self.out_dir, self.step, states, dist=dist)
        self._saved_step = self.step
        log.info("checkpoint written to %s", path)
        return path

    def resume(self, stream: Any) -> bool:
        """Restore the latest checkpoint of ``out_dir`` into this trainer and ``stream``."""
        if self.out_dir is None or (path := latest_checkpoint(self.out_dir)) is None:
            return False
        trainer_state = load_state(path, "trainer")
        self._check_same_job(path, trainer_state)
        dist = self.dist
        own = load_state(path, f"rank_{dist.rank}") if dist.data_parallel and dist.rank else None
        for j, (i, state) in enumerate(zip(self.sae_ids, self.states, strict=True)):
            saved = load_state(path, f"sae_{i}")
            if saved["folder"] != state.folder:
                raise SaelabError(
                    f"checkpoint {path} holds SAE {saved['folder']!r} where the config has "
                    f"{state.folder!r}; resume with the run's saved config.toml"
                )
            if set(saved["params"]) != set(state.sae.state_dict()):
                raise SaelabError(
                    f"checkpoint {path} holds {state.folder!r} with tensors "
                    f"{sorted(saved['params'])} written by another saelab version; start a "
                    "fresh run in a new --out folder"
                )
            state.sae.load_state_dict(saved["params"])
            state.sae.activation_scale.copy_(saved["activation_scale"])
            state.optimizer.load_state_dict(saved["optimizer"])
            state.fired_total_F.copy_(saved["fired_total"])
            state.tokens_since_fired_F.copy_(saved["tokens_since_fired"])
            resampler_state = saved.get("resampler") if own is None else own["resamplers"][j]
            if state.resampler is not None and resampler_state is not None:
                state.resampler.load_state_dict(resampler_state, state.sae.W_enc.device)
            # The log window's sums so far: the first record after a resume covers the same
            # steps as an uninterrupted run's (checkpoints of older versions have none).
            if own is None:
                window = saved.get("window")
            else:
                window = own["windows"][j] if "windows" in own else None
            if window is not None:
                vars(state.window).update(window)
        if hasattr(stream, "load_state_dict"):
            mine = None if own is None else own["stream"]
            stream.load_state_dict(mine if mine is not None else load_state(path, "stream"))
        self.step = int(trainer_state["step"])
        self.tokens = int(trainer_state["tokens"])
        self._saved_step = self.step
        torch.set_rng_state(trainer_state["rng"] if own is None else own["rng"])
        if trainer_state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer_state["cuda_rng"])
        if self.cfg.checkpoint_every_tokens:
            every = self.cfg.checkpoint_every_tokens
            self._next_checkpoint = (self.tokens // every + 1) * every
        log.info("resumed from %s at step %d (%d tokens)", path, self.step, self.tokens)
        return True

    def _check_same_job(self, path: Path, trainer_state: dict[str, Any]) -> None:
        """A checkpoint resumes only with the number of processes (and mode) that wrote it: the
        text shards, batch shares and SAE owners depend on both."""
        world = int(trainer_state.get("world_size", 1))
        mode = trainer_state.get("distributed")
        here = self.dist.mode if self.dist.active else None
        if world != self.dist.world_size:
            how = "without torchrun" if world == 1 else f"with torchrun and {world} processes"
            raise SaelabError(
                f"checkpoint {path} was written by {world} process(es) but this run has "
                f"{self.dist.world_size}; resume it {how} (nodes × processes per node)"
            )
        if world > 1 and mode != here:
            raise SaelabError(
                f"checkpoint {path} was written in {mode} mode, this run is in {here} mode; "
                f"resume it with --dist-mode {mode}"
            )

    # ----- the end -----------------------------------------------------------------------------

    def _finish(self, stream: Any) -> dict[str, dict[str, float]]:
        """Save the SAEs (each by one process) and return every SAE's results, in run order."""
        results = []
        for i, state in zip(self.sae_ids, self.states, strict=True):
            density_F = state.fired_total_F.double().cpu() / max(self.tokens, 1)
            result = {
                "tokens": self.tokens,
                "frac_dead": float(state.dead_F().double().mean()),
                "frac_never_fired": float((state.fired_total_F == 0).double().mean()),
                **{k: v for k, v in state.last_losses.items()},
            }
            results.append((i, (state.folder, result)))
            if self.out_dir is not None and (self.dist.is_main or self.dist.sae_parallel):
                save_sae(
                    state.sae,
                    self.out_dir / state.folder,
                    log10_density=torch.log10(density_F + 1e-10),
                    metadata={**self.metadata, "training_tokens": self.tokens},
                )
        if self.logger is not None:
            self.logger.close()
        self.dist.barrier()  # every SAE is saved before any process moves on
        return dict(self.dist.gather_in_order(results))
