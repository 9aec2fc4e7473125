"""The trainer under torchrun (2 processes, gloo) against one process on the same batches:
data-parallel gives the same SAEs and logs, SAE-parallel trains every SAE exactly once, and
resuming either reproduces the uninterrupted run. The runs are made once by
``distributed_worker.py``; each test reads what it left and trains the one-process reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from safetensors.torch import load_file

from saelab.config import RunConfig, SAEConfig, TrainConfig
from saelab.errors import SaelabError
from saelab.saes.metrics import ReconstructionStats
from saelab.training.distributed import Distributed
from saelab.training.sweep import held_out_metrics
from saelab.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(
    *args: str | Path, nproc: int = 2, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free port on this machine) with one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torchrun")
    done = torchrun(Path(worker.__file__), out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def one_process(saes, cfg: TrainConfig, out: Path) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(saes, cfg, out, progress=False, tensorboard=False)
    trainer.fit(worker.GlobalBatches())
    return trainer


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def saved_weights(run: Path, folder: str) -> dict[str, torch.Tensor]:
    return load_file(run / folder / "sae_weights.safetensors")


# ----- data-parallel ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_data_parallel_matches_one_process_on_the_same_batches(runs, tmp_path):
    """Gradients, firing counts, metrics and resampling candidates reduced over 2 processes
    give the SAEs (and log) of one process, through 4 resamples, to float rounding."""
    single = one_process(worker.ddp_saes(), worker.DDP_CFG, tmp_path)
    for folder in worker.EXACT_DDP:
        ours, reference = saved_weights(runs / "ddp", folder), saved_weights(tmp_path, folder)
        for name, tensor in reference.items():
            torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-5, msg=name)
        # Densities come from the summed firing counts: exactly equal.
        sparsity = "sparsity.safetensors"
        assert torch.equal(
            load_file(runs / "ddp" / folder / sparsity)["sparsity"],
            load_file(tmp_path / folder / sparsity)["sparsity"],
        )
    ours = [r for r in log(runs / "ddp") if r["sae"] in worker.EXACT_DDP]
    reference = [r for r in log(tmp_path) if r["sae"] in worker.EXACT_DDP]
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference, strict=True):
        for key, value in b.items():
            if key == "event":
                assert a[key] == value
            elif key != "tokens_per_s" and isinstance(value, (int, float)):
                assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, b)
    events = [r for r in ours if r.get("event") == "resample"]
    assert [e["step"] for e in events if e["sae"] == "relu"] == [10, 20, 30]
    assert sum(e["n_resampled"] for e in events) > 0  # the candidates were gathered and used
    assert single.tokens == worker.DDP_CFG.steps * worker.BATCH
    # Held-out metrics (a sweep's): each process measures its rows of 1.5 global batches.
    start, rows = worker.HELD_OUT
    saes = [s.sae for s in single.states]
    reference = held_out_metrics(saes, worker.GlobalBatches(start=start), rows, progress=False)
    ours = json.loads((runs / "held_out.json").read_text())
    for a, b, state in zip(ours, reference, single.states, strict=True):
        if state.folder in worker.EXACT_DDP:
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6), state.folder


@pytest.mark.e2e
def test_data_parallel_processes_hold_identical_saes(runs):
    """Every SAE, BatchTopK's averaged threshold included, is bit-identical on both processes."""
    rank_0 = load_file(runs / "weights_rank_0.safetensors")
    rank_1 = load_file(runs / "weights_rank_1.safetensors")
    assert rank_0.keys() == rank_1.keys() and "batchtopk.threshold" in rank_0
    for name, tensor in rank_0.items():
        assert torch.equal(tensor, rank_1[name]), name


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["ddp", "sae"])
def test_resume_under_torchrun_reproduces_the_uninterrupted_run(runs, mode):
    straight, resumed = runs / mode, runs / f"{mode}_resumed"
    folders = sorted(p.parent.name for p in straight.glob("*/cfg.json"))
    assert folders == sorted(p.parent.name for p in resumed.glob("*/cfg.json"))
    for folder in folders:
        a, b = saved_weights(straight, folder), saved_weights(resumed, folder)
        for name, tensor in a.items():
            assert torch.equal(tensor, b[name]), (folder, name)
    checkpoint = resumed / "checkpoints" / "step_00000036"
    names = {p.stem for p in checkpoint.glob("*.json")}
    # Rank 1 keeps its own stream position and candidates (ddp) or its own SAE (sae).
    assert names == {"trainer", "stream", "sae_0", "sae_1", "sae_2"} | (
        {"rank_1"} if mode == "ddp" else set()
    )


# ----- SAE-parallel -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_sae_parallel_trains_every_sae_exactly_once_as_one_process_would(runs, tmp_path):
    one_process(worker.sae_parallel_saes([0, 1, 2]), worker.SAE_CFG, tmp_path)
    ours, reference = log(runs / "sae"), log(tmp_path)
    # Rank 0 writes every SAE's lines in run order, each SAE once per log step.
    assert [r["sae"] for r in ours] == [r["sae"] for r in reference]
    steps = worker.SAE_CFG.steps // worker.SAE_CFG.log_every_steps
    assert [r["sae"] for r in ours].count("relu-b") == steps
    for a, b in zip(ours, reference, strict=True):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == pytest.approx(
            {k: v for k, v in b.items() if k != "tokens_per_s"}
        )
    for folder in ("topk-a", "relu-b", "topk-c"):
        ours_w, reference_w = saved_weights(runs / "sae", folder), saved_weights(tmp_path, folder)
        for name, tensor in reference_w.items():
            torch.testing.assert_close(ours_w[name], tensor, rtol=0, atol=1e-6, msg=name)


# ----- without processes --------------------------------------------------------------------------


def test_sae_ownership_partitions_the_saes():
    for world in (1, 2, 3):
        ranks = [Distributed(r, world, mode="sae", active=True) for r in range(world)]
        owned = [i for d in ranks for i in d.owned(7)]
        assert sorted(owned) == list(range(7))
    assert Distributed(1, 2, mode="ddp", active=True).owned(3) == [0, 1, 2]
    assert Distributed().owned(2) == [0, 1]


def test_a_lone_process_changes_nothing():
    alone = Distributed()
    x = torch.randn(4, 3)
    assert alone.gather_rows(x) is x and alone.sum_over_data_ranks(x) is x
    stats = ReconstructionStats(3, 5)
    assert alone.reduce_stats_(stats) is stats
    assert alone.gather_in_order([(1, "b"), (0, "a")]) == ["b", "a"]
    assert alone.device_for("cuda") == "cuda"
    assert Distributed(1, 2, local_rank=1, active=True).device_for("cuda:0") == "cuda:1"


def test_stats_summed_as_flat_vectors_are_the_stats_of_every_token():
    """What ``reduce_stats_`` all-reduces: two processes' ``to_flat`` vectors, summed and read
    back with ``from_flat_``, give the metrics one process computes on all the tokens."""
    generator = torch.Generator().manual_seed(0)
    x, recon = torch.randn(2, 10, 3, generator=generator)
    l0 = torch.randint(0, 5, (10,), generator=generator)
    fired = torch.randint(0, 4, (2, 5), generator=generator)
    whole = ReconstructionStats(3, 5)
    whole.update(x, recon, l0, fired.sum(0))
    parts = [ReconstructionStats(3, 5) for _ in range(2)]
    for part, rows, fired_F in zip(parts, (slice(0, 4), slice(4, 10)), fired, strict=True):
        part.update(x[rows], recon[rows], l0[rows], fired_F)
    summed = ReconstructionStats(3, 5).from_flat_(parts[0].to_flat() + parts[1].to_flat())
    assert summed.n_tokens == 10 and torch.equal(summed.fired_F, whole.fired_F)
    assert summed.compute() == pytest.approx(whole.compute(), rel=1e-12)


def test_runs_a_job_cannot_split_are_one_line_errors():
    cfg = RunConfig(train=TrainConfig(batch_size=100), saes=(SAEConfig(),))
    with pytest.raises(SaelabError, match="cannot be split evenly over 3 processes"):
        Distributed(0, 3, mode="ddp", active=True).check(cfg)
    with pytest.raises(SaelabError, match="1 SAE\\(s\\) for 2 processes; use --dist-mode ddp"):
        Distributed(0, 2, mode="sae", active=True).check(cfg)
