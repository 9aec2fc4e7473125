"""Training SAEs: the loop, its schedules, resampling, checkpoints, logs and torchrun, and the
wiring of a run (``run``), a sweep (``sweep``) and its pre-flight check (``validate``).

The trainer takes an iterator of ``{hook: [batch, d_in]}`` batches and N SAEs and never sees the
language model, so it is tested with ``torch.randn``.

Example:
    >>> from saelab.config import load_run_config
    >>> from saelab.training import check_run, train_run
    >>> cfg = load_run_config("examples/sweep_l0.toml")
    >>> check_run(cfg)                    # one-line errors before any weight is read
    >>> train_run(cfg, "runs/sweep_l0")   # {folder: final metrics}
"""

from saelab.training.distributed import Distributed, distributed_session
from saelab.training.run import fit_run, train_run
from saelab.training.sweep import sweep_run
from saelab.training.trainer import Trainer
from saelab.training.validate import check_run

__all__ = [
    "Distributed",
    "Trainer",
    "check_run",
    "distributed_session",
    "fit_run",
    "sweep_run",
    "train_run",
]
