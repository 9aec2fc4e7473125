"""torchrun support: one process per device, sharing a run data-parallel or SAE-parallel.

``torchrun --nproc-per-node N -m saelab train ...`` starts N copies of the command. Each finds
its place in the job from the environment torchrun sets (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``); :func:`distributed_session` joins them into one process group (NCCL on CUDA,
where process ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK``; gloo on the CPU) and leaves it at the
end, also after an error. Without those variables nothing changes: the run gets a
:class:`Distributed` of one process whose collectives do nothing.

Two ways to share a run (``train.distributed``, ``--dist-mode``):

``ddp`` (data-parallel, the default)
    ``--batch-size`` stays the global batch; each of the N processes trains on 1/N of it. From
    the model, each process tokenises the text, keeps every N-th packed sequence (so together
    they see exactly the sequences of one process), runs its own copy of the model on them and
    shuffles them through its own buffer of 1/N of ``data.buffer_size``. From an activation
    cache, every process reads the same shuffled rows and takes its slice of each batch, so the
    processes together train on exactly the batches of one process. After each backward pass one
    all-reduce per SAE carries its gradients (averaged), the features' firing counts (summed)
    and the loss values (averaged): gradient clipping, Adam, the dead-feature counts and the
    logged losses are those of the whole batch and the same on every process. The normalisation
    scale (norm sums and counts), the first batch (for ``b_dec``'s initialisation), the logged
    window metrics and the resampling candidates are reduced or gathered the same way, so a run
    matches a single process on the same batches up to float rounding. Two losses are not sums
    over tokens and are computed over each process's share: AuxK's variance normaliser and the
    batch-wide top-k of BatchTopK/Matryoshka (their inference threshold is kept equal on every
    process by averaging floating-point buffers after every step).

``sae`` (SAE-parallel)
    Process r trains SAEs i with i mod N = r (of a sweep's ``[[sae]]`` list, or one per hook)
    on all the activations: rank 0 runs the model and broadcasts every batch
    (:class:`BroadcastStream`), or every process reads the same activation cache. Each SAE is
    saved by its owner; log lines, results and sweep rows are gathered to rank 0.

Only rank 0 writes ``config.toml``, ``resolved.json``, logs and TensorBoard events (and, in
``ddp``, the SAEs). Checkpoints are written by every process into one folder: rank 0 the shared
state (step, SAEs, its stream), each other rank ``rank_R`` (its stream position, RNG and
resampling candidates) or, in ``sae`` mode, its own SAEs; then rank 0 points ``latest.json``
at it. Across nodes the run folder must be on a file system every node sees.

Example (what ``saelab train`` does)::

    with distributed_session(cfg.train.distributed, cfg.model.device) as dist:
        results = fit_run(cfg, out_dir, dist=dist).results
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from jaxtyping import Float, Int
from torch import Tensor

from saelab.config import RunConfig
from saelab.errors import SaelabError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.metrics import ReconstructionStats

log = logging.getLogger(__name__)

ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
"""Set by torchrun for every process it starts."""

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment names a rank)."""
    return all(name in os.environ for name in ENV_VARS)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process started alone: the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a torchrun job; by default alone (rank 0 of 1, inactive).

    Every collective is a no-op unless :attr:`active`; those that only data-parallel runs need
    are also no-ops in ``sae`` mode. A process group of one (``torchrun --nproc-per-node 1``) is
    active, so its collectives run: that is how the NCCL path is checked on one GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "ddp"
    """``ddp`` or ``sae`` (``saelab.config.DIST_MODES``)."""
    active: bool = False
    """A process group is up: collectives run."""
    comm_device: str = "cpu"
    """Where tensors go for collectives: ``cuda:LOCAL_RANK`` with NCCL, the CPU with gloo."""

    # ----- who does what --------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel(self) -> bool:
        return self.active and self.mode == "ddp"

    @property
    def sae_parallel(self) -> bool:
        return self.active and self.mode == "sae"

    @property
    def data_rank(self) -> int:
        """This process's share of each batch (0 unless data-parallel)."""
        return self.rank if self.data_parallel else 0

    @property
    def data_world(self) -> int:
        """How many processes share each batch (1 unless data-parallel)."""
        return self.world_size if self.data_parallel else 1

    def owned(self, n_saes: int) -> list[int]:
        """Indices of the SAEs (of ``n_saes``) this process trains: every N-th in ``sae`` mode,
        all of them otherwise."""
        if not self.sae_parallel:
            return list(range(n_saes))
        return list(range(self.rank, n_saes, self.world_size))

    def device_for(self, device: str) -> str:
        """``cuda`` (or any ``cuda:i``) means this process's GPU, ``cuda:LOCAL_RANK``."""
        if self.active and device.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return device

    def check(self, cfg: RunConfig) -> None:
        """One-line errors for a run this job cannot split."""
        n, world = len(cfg.saes), self.world_size
        if self.data_parallel and cfg.train.batch_size % world:
            raise SaelabError(
                f"--batch-size {cfg.train.batch_size} cannot be split evenly over {world} "
                f"processes; choose a multiple of {world}"
            )
        if self.sae_parallel and n < world:
            raise SaelabError(
                f"--dist-mode sae gives each process some of the run's SAEs, but there are {n} "
                f"SAE(s) for {world} processes; use --dist-mode ddp or at most {n} processes"
            )

    # ----- collectives ----------------------------------------------------------------------

    def barrier(self) -> None:
        if not self.active:
            return
        if tdist.get_backend() == "nccl":
            tdist.barrier(device_ids=[self.local_rank])
        else:
            tdist.barrier()

    def _sum_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over every process, in place (through :attr:`comm_device`)."""
        on = t.to(self.comm_device)
        tdist.all_reduce(on)
        if on is not t:
            t.copy_(on)
        return t

    def sum_over_data_ranks(self, t: Tensor) -> Tensor:
        """``t`` summed over the data-parallel processes (a new tensor); ``t`` otherwise."""
        return self._sum_(t.clone()) if self.data_parallel else t

    def gather_rows(self, x_ND: Float[Tensor, "N ..."]) -> Float[Tensor, "M ..."]:
        """Every data-parallel process's rows, concatenated in rank order (the global batch);
        ``x_ND`` itself otherwise. Every process must pass the same shape."""
        if not self.data_parallel:
            return x_ND
        on = x_ND.contiguous().to(self.comm_device)
        parts = [torch.empty_like(on) for _ in range(self.world_size)]
        tdist.all_gather(parts, on)
        return torch.cat(parts).to(x_ND.device)

    def broadcast_(self, t: Tensor) -> Tensor:
        """Rank 0's ``t`` on every process, in place."""
        if not self.active:
            return t
        on = t.to(self.comm_device)
        tdist.broadcast(on, src=0)
        if on is not t:
            t.copy_(on)
        return t

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's (picklable) ``obj`` on every process."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 only; its (picklable) result on every process. A
        :class:`SaelabError` it raises is raised on every process, so all stop with one line."""
        if not self.active:
            return fn()
        result: Any = None
        error: str | None = None
        if self.is_main:
            try:
                result = fn()
            except SaelabError as exc:
                error = str(exc)
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise SaelabError(error)
        return result

    def gather_in_order(self, pairs: list[tuple[int, T]]) -> list[T]:
        """``(index, item)`` pairs of every process, as one list of items sorted by index, on
        every process: how ``sae`` mode collects per-SAE results. Otherwise (every process holds
        every SAE) the items of ``pairs`` as they are."""
        if not self.sae_parallel:
            return [item for _, item in pairs]
        parts: list[Any] = [None] * self.world_size
        tdist.all_gather_object(parts, list(pairs))
        merged = sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])
        return [item for _, item in merged]

    # ----- data-parallel training -----------------------------------------------------------

    @torch.no_grad()
    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every data-parallel process (after the first
        batch: every process then starts from the very same SAE)."""
        if not self.data_parallel:
            return
        for tensor in [*module.parameters(), *module.buffers()]:
            self.broadcast_(tensor.data)

    @torch.no_grad()
    def sync_step_(
        self, sae: SparseAutoencoder, fired_F: Int[Tensor, " F"], losses: dict[str, Tensor]
    ) -> tuple[Int[Tensor, " F"], dict[str, float]]:
        """After the backward pass of a data-parallel step: gradients averaged, firing counts
        summed and loss values averaged over the processes, all in one all-reduce; floating
        buffers (BatchTopK's threshold) averaged too. Returns the whole batch's firing counts
        and loss values (this process's own, as floats, when not data-parallel).

        Every process's batch share has the same size, so the mean of their per-token-mean
        gradients is the gradient of the whole batch.
        """
        if not self.data_parallel:
            return fired_F, {name: float(value) for name, value in losses.items()}
        names = list(losses)
        grads = [p.grad for p in sae.parameters() if p.grad is not None]
        values = [losses[name].detach().float().reshape(1) for name in names]
        # float32 counts are exact below 2**24 per step: far above any batch.
        bucket = torch.cat([g.reshape(-1).float() for g in grads] + [fired_F.float(), *values])
        self._sum_(bucket)
        offset = 0
        for grad in grads:
            n = grad.numel()
            grad.copy_(bucket[offset : offset + n].view_as(grad) / self.world_size)
            offset += n
        fired_all_F = bucket[offset : offset + fired_F.numel()].round().to(fired_F.dtype)
        offset += fired_F.numel()
        mean_values = (bucket[offset:] / self.world_size).tolist()
        self._average_buffers_(sae)
        return fired_all_F, dict(zip(names, mean_values, strict=True))

    def _average_buffers_(self, sae: SparseAutoencoder) -> None:
        """Average the SAE's saved floating-point buffers (in float64: BatchTopK's threshold is
        an EMA of small steps) so that every process keeps the same SAE."""
        params = {name for name, _ in sae.named_parameters()}
        buffers = [
            t
            for name, t in sae.state_dict(keep_vars=True).items()
            if name not in params and t.is_floating_point()
        ]
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
        self._sum_(flat)
        flat /= self.world_size
        offset = 0
        for buffer in buffers:
            n = buffer.numel()
            buffer.data.copy_(flat[offset : offset + n].view_as(buffer))
            offset += n

    def reduce_stats_(self, stats: ReconstructionStats) -> ReconstructionStats:
        """Sum ``stats`` over the data-parallel processes, in place: the metrics of all their
        tokens, as one process would have counted them (float64 sums)."""
        if not self.data_parallel:
            return stats
        flat = stats.to_flat()
        self._sum_(flat)
        return stats.from_flat_(flat)


# ----- joining and leaving a torchrun job ---------------------------------------------------------


@contextlib.contextmanager
def distributed_session(mode: str = "ddp", device: str = "cpu") -> Iterator[Distributed]:
    """Join the torchrun job this process belongs to, for the length of the block.

    Outside torchrun this yields an inactive :class:`Distributed` and does nothing else. Under
    torchrun it starts the process group (NCCL for a ``cuda`` device, gloo otherwise; one that
    is already up is reused and left up), pins process ``LOCAL_RANK`` to ``cuda:LOCAL_RANK``,
    quiets other ranks' info logs, and destroys the group when the block ends, also on error.
    """
    if not launched_by_torchrun():
        yield Distributed(mode=mode)
        return
    world, rank, local_rank = (int(os.environ[name]) for name in ENV_VARS)
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise SaelabError("--device cuda was asked for but no CUDA device is available")
        if local_rank >= (n_gpus := torch.cuda.device_count()):
            raise SaelabError(
                f"process {local_rank} of this node has no GPU of its own: the node has {n_gpus} "
                f"CUDA device(s); start at most {n_gpus} processes per node (--nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    own_group = not tdist.is_initialized()
    if own_group:
        if cuda:
            tdist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            tdist.init_process_group("gloo")
    backend = tdist.get_backend()
    comm_device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    package_log = logging.getLogger("saelab")
    level = package_log.level
    if rank:
        package_log.setLevel(logging.WARNING)  # rank 0 tells the story; others only warn
    log.info("process %d of %d (%s, %s mode)", rank, world, backend, mode)
    try:
        yield Distributed(rank, world, local_rank, mode, True, comm_device)
    finally:
        package_log.setLevel(level)
        if own_group:
            tdist.destroy_process_group()


# ----- one activation stream for the whole job ----------------------------------------------------


class BroadcastStream:
    """Rank 0's activation batches, served on every process of an SAE-parallel job.

    Rank 0 iterates ``source`` (an :class:`~saelab.data.activations.ActivationStream`) and
    broadcasts each batch, every hook in one tensor, with the stream's scales; the others pass
    ``source=None`` and receive. The model thus runs once for the whole job. If rank 0's stream
    fails, every process stops with a one-line error. The state (for checkpoints) is rank 0's
    stream's; the others have none to keep.
    """

    state_is_shared = True
    """Only rank 0's state matters: the others follow it."""

    def __init__(
        self,
        source: Any,
        dist: Distributed,
        d_in_by_hook: dict[str, int],
        device: str | torch.device = "cpu",
    ) -> None:
        self.source = source
        self.dist = dist
        self.hooks = list(d_in_by_hook)
        self.d_in = dict(d_in_by_hook)
        self.device = torch.device(device)
        self._scales: dict[str, float] = {}

    @property
    def scales(self) -> dict[str, float]:
        return self.source.scales if self.source is not None else self._scales

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        batches = iter(self.source) if self.source is not None else None
        widths = [self.d_in[h] for h in self.hooks]
        while True:
            # [rows (−1: the stream ended, −2: it failed), scale of each hook]
            header = torch.zeros(1 + len(self.hooks), dtype=torch.float64, device=self.device)
            batch = None
            if batches is not None:
                try:
                    batch = next(batches, None)
                except SaelabError:
                    header[0] = -2
                    self.dist.broadcast_(header)
                    raise
                if batch is None:
                    header[0] = -1
                else:
                    header[0] = batch[self.hooks[0]].shape[0]
                    scales = [float(self.source.scales.get(h, 1.0)) for h in self.hooks]
                    header[1:] = torch.tensor(scales, dtype=torch.float64)
            self.dist.broadcast_(header)
            rows = int(header[0])
            if rows == -1:
                return
            if rows == -2:
                raise SaelabError(
                    "the activation stream on rank 0 failed (its error is printed by rank 0); "
                    "fix that and run again"
                )
            if batches is None:
                self._scales = dict(zip(self.hooks, header[1:].tolist(), strict=True))
                flat = torch.empty(rows, sum(widths), device=self.device)
            else:
                flat = torch.cat([batch[h].to(self.device) for h in self.hooks], dim=1)
            self.dist.broadcast_(flat)
            yield dict(zip(self.hooks, flat.split(widths, dim=1), strict=True))

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict() if self.source is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.source is not None:
            self.source.load_state_dict(state)
