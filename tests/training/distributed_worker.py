"""The trainer under torchrun, on synthetic batches: what ``test_distributed.py`` compares with
one process. Run as ``torchrun --standalone --nproc-per-node 2 distributed_worker.py OUT``.

Scenarios, each into its own folder of ``OUT``:

* ``ddp``: data-parallel TopK, ReLU and BatchTopK SAEs with dead-feature resampling and
  checkpoints; every process also dumps its final weights (``weights_rank_R.safetensors``), and
  rank 0 the SAEs' held-out metrics over ``HELD_OUT`` rows (``held_out.json``).
* ``ddp_resumed``: the same run, killed after a checkpoint and resumed in the same processes.
* ``sae``: SAE-parallel, three SAEs over two processes, with checkpoints; ``sae_resumed`` as above.

The module is also imported by the test for the shared settings (SAEs, configs, batches).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from saelab.config import SAEConfig, TrainConfig
from saelab.saes import BatchTopKSAE, ReLUSAE, TopKSAE
from saelab.training.distributed import Distributed, distributed_session
from saelab.training.sweep import held_out_metrics
from saelab.training.trainer import Trainer

D_IN = 16
BATCH = 64
"""The global batch: each of N data-parallel processes trains on BATCH / N rows of it."""

DDP_CFG = TrainConfig(
    tokens=BATCH * 40,
    batch_size=BATCH,
    lr=1e-2,
    log_every_steps=5,
    checkpoint_every_tokens=BATCH * 12,
    resample_every_steps=10,
    resample_until_frac=1.0,
    resample_dead_window_tokens=BATCH * 4,
    resample_sample_tokens=BATCH * 6,
    resample_lr_warmup_steps=5,
)
SAE_CFG = dataclasses.replace(DDP_CFG, resample_every_steps=0)
DIES_AFTER = 30
HELD_OUT = (100, 100)
"""Held-out metrics: from global batch 100 on, over 100 rows (one and a half batches)."""
"""The interrupted runs stop at this step; their last checkpoint is at step 24."""


class GlobalBatches:
    """Sums of a few of 64 fixed directions, one global batch per step (the same in every
    process); a data-parallel process serves its slice ``rank·b … (rank+1)·b``."""

    def __init__(
        self, rank: int = 0, world: int = 1, dies_after: int | None = None, start: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(1234)
        self.directions = torch.nn.functional.normalize(torch.randn(64, D_IN, generator=g), dim=-1)
        self.rank, self.world, self.dies_after, self.i = rank, world, dies_after, start
        self.scales = {"h": 1.5}

    def batch(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(i)
        idx = torch.randint(0, 64, (BATCH, 3), generator=g)
        coef = 3 * torch.rand(BATCH, 3, generator=g)
        return (coef[..., None] * self.directions[idx]).sum(1)

    def __iter__(self):
        share = BATCH // self.world
        while True:
            if self.dies_after is not None and self.i >= self.dies_after:
                raise Interrupted
            x = self.batch(self.i)
            self.i += 1
            yield {"h": x[self.rank * share : (self.rank + 1) * share]}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = int(state["i"])


class Interrupted(Exception):
    pass


def ddp_saes(seed: int = 0) -> list:
    """TopK, ReLU (a quarter of its features dead from the start, so resampling has work) and
    BatchTopK."""
    relu = ReLUSAE(
        SAEConfig(
            hook="h",
            architecture="relu",
            expansion=4,
            l1_coefficient=8.0,
            decoder_unit_norm=True,
            apply_b_dec_to_input=True,
            name="relu",
        ),
        D_IN,
        seed=seed + 1,
    )
    with torch.no_grad():
        relu.b_enc[: relu.d_sae // 4] = -100.0
    return [
        TopKSAE(SAEConfig(hook="h", k=4, expansion=4, name="topk"), D_IN, seed=seed),
        relu,
        BatchTopKSAE(
            SAEConfig(hook="h", architecture="batchtopk", k=4, expansion=4, name="batchtopk"),
            D_IN,
            seed=seed + 2,
        ),
    ]


EXACT_DDP = ("topk", "relu")
"""Data-parallel SAEs whose losses are sums over tokens: they match one process."""


def sae_parallel_saes(indices: list[int], seed: int = 0) -> list:
    every = [
        TopKSAE(SAEConfig(hook="h", k=4, expansion=4, name="topk-a"), D_IN, seed=seed),
        ReLUSAE(
            SAEConfig(hook="h", architecture="relu", l1_coefficient=1.0, name="relu-b"),
            D_IN,
            seed=seed + 1,
        ),
        TopKSAE(SAEConfig(hook="h", k=2, expansion=2, name="topk-c"), D_IN, seed=seed + 2),
    ]
    return [every[i] for i in indices]


def train(saes, cfg, out, dist, sae_ids=None, dies_after=None, resume=False):
    """Train (or resume) into ``out``; a run that dies is restarted from its checkpoint with
    SAEs of another init, so everything must come from the checkpoint."""
    torch.manual_seed(0)
    stream = GlobalBatches(dist.data_rank, dist.data_world, dies_after)
    trainer = Trainer(saes, cfg, out, progress=False, tensorboard=False, dist=dist, sae_ids=sae_ids)
    if resume:
        assert trainer.resume(stream)
    try:
        trainer.fit(stream)
    except Interrupted:
        return None
    return trainer


def main(out: Path) -> None:
    with distributed_session("ddp", "cpu") as ddp:
        assert ddp.active and ddp.world_size == 2
        trainer = train(ddp_saes(), DDP_CFG, out / "ddp", ddp)
        weights = {
            f"{s.folder}.{name}": t.contiguous()
            for s in trainer.states
            for name, t in s.sae.state_dict().items()
        }
        save_file(weights, out / f"weights_rank_{ddp.rank}.safetensors")
        held_out = GlobalBatches(ddp.rank, ddp.world_size, start=HELD_OUT[0])
        saes = [s.sae for s in trainer.states]
        metrics = held_out_metrics(saes, held_out, HELD_OUT[1], progress=False, dist=ddp)
        if ddp.is_main:
            (out / "held_out.json").write_text(json.dumps(metrics))

        assert train(ddp_saes(), DDP_CFG, out / "ddp_resumed", ddp, dies_after=DIES_AFTER) is None
        train(ddp_saes(seed=99), DDP_CFG, out / "ddp_resumed", ddp, resume=True)

        sae: Distributed = dataclasses.replace(ddp, mode="sae")
        owned = sae.owned(3)
        train(sae_parallel_saes(owned), SAE_CFG, out / "sae", sae, owned)
        dead = train(sae_parallel_saes(owned), SAE_CFG, out / "sae_resumed", sae, owned, DIES_AFTER)
        assert dead is None
        train(
            sae_parallel_saes(owned, seed=99), SAE_CFG, out / "sae_resumed", sae, owned, None, True
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
