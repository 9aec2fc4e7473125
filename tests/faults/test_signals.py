"""Ctrl-C (SIGINT) and SIGTERM sent to a real ``saelab`` process in the middle of its work.

Each test starts ``python -m saelab`` on the tiny local model, waits until the process is
demonstrably in its long loop (a training log line, a cache shard, a progress bar, a dashboard's
temp folder), sends the signal and checks what an interruption promises: exit status 128 +
signal, one ``saelab:`` line and no traceback, nothing half-written or left behind, an earlier
result untouched; and for ``train`` and ``cache`` that the printed ``--resume`` command finishes
the job bit for bit as an uninterrupted run does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.config import SAEConfig, TrainConfig
from saelab.saes import TopKSAE
from saelab.signals import (
    Interrupted,
    InterruptGuard,
    exit_status,
    held_back,
    terminate_as_interrupt,
)
from saelab.training.checkpoint import latest_checkpoint
from saelab.training.trainer import Trainer
from saelab_cli import tiny_train_args

pytestmark = pytest.mark.e2e

HOOK = "blocks.1.hook_resid_post"
FOLDER = f"{HOOK}-topk-x4-k8"
STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


# One thread: tiny tensors gain nothing from more, and on a loaded machine OpenMP threads
# spin-wait for each other (see the ``one_thread`` fixture); every run here has the same.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **THREADS}


def _start(*args: str | Path, log: Path, quiet: bool = True) -> subprocess.Popen:
    """``python -m saelab [-q] ARGS`` in the background, its stderr into ``log`` (read while it
    runs: a pipe nobody reads could fill and stall the process)."""
    flags = ["-q"] if quiet else []
    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "saelab", *flags, *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=_env(),
        )


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen, log: Path) -> None:
    """Poll until ``ready()``; the process must still be running then (else the test's work
    was too short to be interrupted, which is a failure, not a pass)."""
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, f"saelab ended (rc={proc.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    assert proc.poll() is None, (
        f"saelab finished before it could be interrupted:\n{log.read_text()}"
    )


def _interrupt(proc: subprocess.Popen, signum: int, log: Path) -> str:
    """Send ``signum``; returns the one ``saelab:`` line after checking the exit status, and
    that the interruption added that line only (the last of stderr) and no traceback."""
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == STATUS[signum], log.read_text()
    stderr = log.read_text()
    assert "Traceback" not in stderr, stderr
    ours = [line for line in stderr.splitlines() if line.startswith("saelab:")]
    assert len(ours) == 1, stderr
    assert stderr.rstrip("\n").splitlines()[-1] == ours[0], stderr
    return ours[0]


def _leftovers(folder: Path) -> list[Path]:
    """Temp names anywhere under or beside ``folder`` (``.NAME.…`` files and folders)."""
    candidates = [*folder.rglob(".*"), *folder.parent.glob(f".{folder.name}.*")]
    return sorted(candidates)


def _resume(line: str, log: Path) -> subprocess.CompletedProcess:
    """Run the ``--resume`` command the interruption printed (``saelab ...`` → this Python)."""
    command = shlex.split(line.split("resume with ", 1)[1])
    assert command[0] == "saelab" and command[-1] == "--resume", line
    return subprocess.run(
        [sys.executable, "-m", "saelab", *command[1:]],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )


# ----- in process: the guard and the trainer's stop, with signals sent to this process ------


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)  # Python runs the handler before the next bytecode


def test_the_guard_records_a_first_signal_while_armed_and_raises_a_second():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with InterruptGuard() as guard:
        with pytest.raises(Interrupted) as unarmed:  # nothing to save yet: stop at once
            _signal_self(signal.SIGTERM)
        assert exit_status(unarmed.value) == 143
        guard.signum, guard.armed = None, True
        _signal_self(signal.SIGINT)
        assert guard.signum == signal.SIGINT  # recorded; the loop stops at its next safe point
        with pytest.raises(Interrupted) as second:
            _signal_self(signal.SIGTERM)
        assert exit_status(second.value) == 130  # the first signal decides the status
        guard.signum, guard.armed = None, False
        with pytest.raises(Interrupted), guard.shield():
            _signal_self(signal.SIGINT)
            _signal_self(signal.SIGINT)  # held back: the write in the shield completes
            finished_the_write = True
        assert finished_the_write
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_held_back_lets_the_block_finish_then_raises():
    written = []
    with pytest.raises(Interrupted) as caught, held_back():
        _signal_self(signal.SIGTERM)
        written.append("both files")
    assert written == ["both files"] and exit_status(caught.value) == 143


def test_sigterm_raises_like_ctrl_c_only_inside_terminate_as_interrupt():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as caught, terminate_as_interrupt():
        _signal_self(signal.SIGTERM)
    assert exit_status(caught.value) == 143
    assert signal.getsignal(signal.SIGTERM) == before


D_IN, BATCH, STEPS = 16, 64, 12


class SignallingStream:
    """Random batches, resumable by position; sends ``signals`` to this process while it makes
    batch ``at`` (as if Ctrl-C were pressed during that step)."""

    def __init__(self, at: int | None = None, signals: tuple[int, ...] = ()) -> None:
        self.i, self.at, self.signals = 0, at, signals

    def __iter__(self):
        while True:
            if self.i == self.at:
                for signum in self.signals:
                    _signal_self(signum)
            g = torch.Generator().manual_seed(self.i)
            self.i += 1
            yield {"h": torch.randn(BATCH, D_IN, generator=g)}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = int(state["i"])


def _trainer(out: Path, **cfg: int) -> Trainer:
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(hook="h", k=4, expansion=2), D_IN, seed=0)
    train = TrainConfig(tokens=BATCH * STEPS, batch_size=BATCH, lr=1e-2, **cfg)
    return Trainer([sae], train, out, progress=False, tensorboard=False)


def _fit_resumed(out: Path) -> Trainer:
    trainer = _trainer(out)
    stream = SignallingStream()
    assert trainer.resume(stream)
    trainer.fit(stream)
    return trainer


def test_trainer_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(tmp_path):
    straight = _trainer(tmp_path / "straight")
    straight.fit(SignallingStream())

    stopped = _trainer(tmp_path / "run")
    with pytest.raises(Interrupted) as caught:
        stopped.fit(SignallingStream(at=5, signals=(signal.SIGINT,)))
    # The batch being made when the signal came is trained on, then the step is checkpointed.
    assert caught.value.resumable and exit_status(caught.value) == 130
    assert caught.value.detail == "interrupted at step 6 (384 tokens); a checkpoint was written"
    assert latest_checkpoint(tmp_path / "run").name == "step_00000006"

    resumed = _fit_resumed(tmp_path / "run")
    for key, want in straight.states[0].sae.state_dict().items():
        assert torch.equal(resumed.states[0].sae.state_dict()[key], want), key


def test_a_second_signal_stops_at_once_and_names_the_last_checkpoint(tmp_path):
    trainer = _trainer(tmp_path / "run", checkpoint_every_tokens=BATCH * 4)
    with pytest.raises(Interrupted) as caught:
        trainer.fit(SignallingStream(at=6, signals=(signal.SIGTERM, signal.SIGINT)))
    assert exit_status(caught.value) == 143 and caught.value.resumable
    assert caught.value.detail == (
        "interrupted at step 6 (384 tokens); the last checkpoint is at step 4 (256 tokens)"
    )
    assert latest_checkpoint(tmp_path / "run").name == "step_00000004"


def test_a_signal_before_anything_is_worth_saving_says_there_is_nothing_to_resume(tmp_path):
    trainer = _trainer(tmp_path / "run")
    with pytest.raises(Interrupted) as caught:
        trainer.fit(SignallingStream(at=0, signals=(signal.SIGINT,)))
    assert not caught.value.resumable
    assert caught.value.detail == (
        "interrupted at step 0 (0 tokens); no checkpoint was written, so there is nothing to resume"
    )
    assert latest_checkpoint(tmp_path / "run") is None


# ----- train ----------------------------------------------------------------------------------


def _train_args(model_dir: Path, text: Path, out: Path, *extra: str) -> tuple[str, ...]:
    # 20 steps whose every second one logs a line: the first line means "in the loop", and
    # the model's forward passes keep the remaining steps long enough to be interrupted.
    logs = ("--set", "train.log_every_steps=2")
    return (*tiny_train_args(model_dir, text, out, tokens=5120, extra=logs), *extra)


class Uninterrupted:
    """The uninterrupted train and cache, started together in the background when the module
    starts (they overlap the interrupted runs) and waited for where a test needs them."""

    def __init__(self, model_dir: Path, text: Path, root: Path) -> None:
        self.run, self.cache = root / "run", root / "cache"
        self._procs = {
            path: _start(*args(model_dir, text, path), log=root / f"{path.name}.stderr.txt")
            for path, args in ((self.run, _train_args), (self.cache, _cache_args))
        }

    def finished(self, path: Path) -> Path:
        proc = self._procs[path]
        log = path.parent / f"{path.name}.stderr.txt"
        assert proc.wait(timeout=300) == 0, log.read_text()
        return path

    def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, words_file, tmp_path_factory):
    runs = Uninterrupted(tiny_model_dir, words_file, tmp_path_factory.mktemp("uninterrupted"))
    yield runs
    runs.stop()


@pytest.fixture
def trained_run(uninterrupted) -> Path:
    """The uninterrupted run: the oracle of the resumed ones, and the SAE of the others."""
    return uninterrupted.finished(uninterrupted.run)


@pytest.mark.parametrize(
    ("signum", "extra"),
    [
        (signal.SIGINT, ("--checkpoint-every", "1024")),
        # Checkpointing off: the interruption's checkpoint is the only one, and is enough.
        (signal.SIGTERM, ()),
    ],
    ids=["sigint", "sigterm-no-periodic-checkpoints"],
)
def test_interrupted_train_checkpoints_and_resumes_bit_for_bit(
    signum, extra, uninterrupted, tiny_model_dir, words_file, tmp_path
):
    out = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    proc = _start(*_train_args(tiny_model_dir, words_file, out, *extra), log=log)
    _wait_until(
        lambda: (out / "train_log.jsonl").is_file() and (out / "train_log.jsonl").stat().st_size,
        proc,
        log,
    )
    line = _interrupt(proc, signum, log)

    # A signal right after a periodic checkpoint, with nothing new to save, stops at once and
    # names that checkpoint: then it must be the checkpoint of the step stopped at.
    found = re.fullmatch(
        r"saelab: interrupted at step (\d+) \(([\d,]+) tokens\); "
        r"(a checkpoint was written|its checkpoint was already written"
        r"|the last checkpoint is at step (\d+) \(\2 tokens\)): resume with  saelab .*",
        line,
    )
    assert found, line
    step = int(found[1])
    assert found[4] is None or int(found[4]) == step, line
    assert 0 < step < 50 and int(found[2].replace(",", "")) == step * 256
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == step
    assert not (out / FOLDER).exists()  # the SAE is saved only when training ends
    assert _leftovers(out) == []

    resumed = _resume(line, log)
    assert resumed.returncode == 0, resumed.stderr
    trained_run = uninterrupted.finished(uninterrupted.run)
    for name in ("sae_weights.safetensors", "sparsity.safetensors"):
        ours, oracle = load_file(out / FOLDER / name), load_file(trained_run / FOLDER / name)
        assert ours.keys() == oracle.keys()
        for key in oracle:
            assert torch.equal(ours[key], oracle[key]), f"{name}:{key} differs after resume"


# ----- cache ----------------------------------------------------------------------------------


def _cache_args(model_dir: Path, text: Path, out: Path) -> tuple[str, ...]:
    # Two sequences per forward pass and 16 small shards: the cache is still writing well
    # after its first shard.
    return (
        "cache",
        "--model",
        str(model_dir),
        "--hook",
        HOOK,
        "--tokens",
        "4096",
        "--shard-tokens",
        "256",
        "--dataset",
        str(text),
        "--context",
        "32",
        "--model-batch-size",
        "2",
        "--out",
        str(out),
    )


def test_interrupted_cache_resumes_to_the_same_shards(
    uninterrupted, tiny_model_dir, words_file, tmp_path
):
    out = tmp_path / "cache"
    log = tmp_path / "stderr.txt"
    proc = _start(*_cache_args(tiny_model_dir, words_file, out), log=log)
    _wait_until(lambda: (out / "progress.json").is_file(), proc, log)
    line = _interrupt(proc, signal.SIGINT, log)

    found = re.fullmatch(
        r"saelab: interrupted with (\d+) shard\(s\) and ([\d,]+) of 4,096 tokens safe in "
        r"(.+): resume with  saelab .* --resume",
        line,
    )
    assert found, line
    shards = int(found[1])
    progress = json.loads((out / "progress.json").read_text())
    assert shards == len(progress["shards"]) >= 1
    recorded = {s["file"] for s in progress["shards"]}
    recorded |= {progress["pending"]["file"]} if progress["pending"] else set()
    assert {p.name for p in out.glob("*.safetensors")} == recorded  # no unrecorded or half file
    assert _leftovers(out) == []
    assert not (out / "index.json").exists()

    resumed = _resume(line, log)
    assert resumed.returncode == 0, resumed.stderr
    oracle = uninterrupted.finished(uninterrupted.cache)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in oracle.iterdir())
    for path in oracle.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


# ----- eval, features, dashboard: nothing half-written ----------------------------------------


def _sae_copy(trained_run: Path, tmp_path: Path) -> Path:
    sae_dir = tmp_path / "sae"
    shutil.copytree(trained_run / FOLDER, sae_dir)
    return sae_dir


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _bar_shown(log: Path, desc: str) -> Callable[[], bool]:
    """Whether the progress bar ``desc`` has drawn at least one step (the long loop runs)."""
    return lambda: re.search(rf"{desc}:\s+\d+%\|[^\n\r]*\| [1-9]", log.read_text()) is not None


def test_interrupted_eval_leaves_the_earlier_metrics(trained_run, tmp_path):
    sae_dir = _sae_copy(trained_run, tmp_path)
    earlier = {"metrics.json": b'{"earlier": true}\n', "eval_info.json": b'{"earlier": 1}\n'}
    for name, data in earlier.items():
        (sae_dir / name).write_bytes(data)
    before = _snapshot(sae_dir)
    log = tmp_path / "stderr.txt"
    proc = _start("eval", sae_dir, "--tokens", "400000", log=log, quiet=False)
    _wait_until(_bar_shown(log, "eval"), proc, log)
    line = _interrupt(proc, signal.SIGINT, log)
    assert line == "saelab: interrupted; no partial result was written"
    assert _snapshot(sae_dir) == before
    assert _leftovers(sae_dir) == []


def test_interrupted_features_leave_the_earlier_statistics(trained_run, tmp_path):
    sae_dir = _sae_copy(trained_run, tmp_path)
    out = tmp_path / "features"
    out.mkdir()
    (out / "feature_stats.json").write_text('{"earlier": true}\n')
    (out / "feature_stats.safetensors").write_bytes(b"earlier")
    before = _snapshot(out)
    log = tmp_path / "stderr.txt"
    proc = _start("features", sae_dir, "--tokens", "400000", "--out", out, log=log, quiet=False)
    _wait_until(_bar_shown(log, "features"), proc, log)
    line = _interrupt(proc, signal.SIGTERM, log)
    assert line == "saelab: interrupted; no partial result was written"
    assert _snapshot(out) == before
    assert _leftovers(out) == []


def test_interrupted_dashboard_leaves_the_earlier_site(trained_run, tmp_path):
    sae_dir = _sae_copy(trained_run, tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<p>the earlier site</p>\n")
    (site / "dashboard.json").write_text('{"earlier": true}\n')  # what marks a saelab site
    before = _snapshot(site)
    log = tmp_path / "stderr.txt"
    proc = _start("dashboard", sae_dir, "--out", site, "--tokens", "2048", log=log, quiet=False)
    # Stopped halfway through writing the new site's pages into a temp folder beside the old.
    _wait_until(lambda: any(tmp_path.glob(".site.*/*/*.html")), proc, log)
    line = _interrupt(proc, signal.SIGINT, log)
    assert line == "saelab: interrupted; no partial result was written"
    assert _snapshot(site) == before
    assert _leftovers(site) == []


# ----- sweep ----------------------------------------------------------------------------------


def test_interrupted_sweep_checkpoints_and_its_resume_command_finishes_it(
    tiny_model_dir, words_file, tmp_path
):
    """A sweep stops through the same trainer: one line with its ``--resume`` command, a
    checkpoint of the step, and that command finishes every SAE and the summary."""
    run_file = tmp_path / "sweep.toml"
    run_file.write_text(
        f'[model]\nname = "{tiny_model_dir}"\n\n'
        f'[data]\ndataset = "{words_file}"\ncontext = 32\nbuffer_size = 1024\n\n'
        "[train]\nlog_every_steps = 2\n\n"
        f'[[sae]]\nhook = "{HOOK}"\nexpansion = 4\nk = 8\n\n'
        f'[[sae]]\nhook = "{HOOK}"\nexpansion = 4\nk = 4\n'
    )
    out, log = tmp_path / "sweep", tmp_path / "stderr.txt"
    args = ("sweep", run_file, "--tokens", "5120", "--batch-size", "256", "--eval-tokens", "512")
    proc = _start(*args, "--out", out, log=log)
    _wait_until(
        lambda: (out / "train_log.jsonl").is_file() and (out / "train_log.jsonl").stat().st_size,
        proc,
        log,
    )
    line = _interrupt(proc, signal.SIGINT, log)
    found = re.fullmatch(
        r"saelab: interrupted at step (\d+) .*: resume with  saelab (-q )?sweep .*", line
    )
    assert found, line
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == int(found[1])
    assert _leftovers(out) == []

    resumed = _resume(line, log)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "summary.json").is_file()
    for k in (8, 4):
        assert (out / f"{HOOK}-topk-x4-k{k}" / "sae_weights.safetensors").is_file()
