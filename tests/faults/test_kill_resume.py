"""``kill -9`` at chosen points of ``saelab train --checkpoint-every`` and ``saelab cache``, then
``--resume``: the finished files equal an uninterrupted run's byte for byte, and no temp file or
folder the killed run left survives the resumed one (removed by the next run of the command:
issue 16, item 2). A cache killed after its index.json keeps its progress.json (marked below).

Every run is a fresh process forked from one "zygote" that has imported saelab once (the import of
transformers alone takes ~5 s; a fork takes milliseconds), so a kill point costs about a second of
training, not a second plus five of imports. The zygote runs the real ``saelab.cli.main``.

A kill lands at an exact point however loaded the machine is: the process pauses at a named moment
(a call of a saelab function, or an atomic write of a file: before its temp file exists, while
the finished temp file waits to be renamed, or just after the rename) and says so in a marker
file; the test sees the marker and sends SIGKILL. One case of each command pauses nowhere and is
killed when a file appears, as a user's ``kill -9`` would land.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from saelab.training.checkpoint import write_checkpoint
from saelab_cli import tiny_train_args

pytestmark = pytest.mark.e2e

HOOK = "blocks.1.hook_resid_post"
FOLDER = f"{HOOK}-topk-x4-k8"
TRAIN_STEPS = 30  # 7680 tokens in batches of 256
CHECKPOINT_STEPS = 6  # checkpoints at steps 6, 12, 18, 24 (none at the last step)
STATES_PER_CHECKPOINT = 3  # trainer, stream, sae_0
WAIT_S = 180.0  # for any one event; generous, for a loaded 2-core machine

ZYGOTE = r'''
import fnmatch, functools, importlib, json, os, sys, time, traceback

import saelab.atomic
import saelab.cli

# What the commands import lazily, imported once here too (only speed depends on this list).
for warm in ("saelab.training.run", "saelab.data.cache", "torch.utils.tensorboard",
             "transformers.conversion_mapping", "transformers.models.llama.modeling_llama"):
    try:
        importlib.import_module(warm)
    except ImportError:
        pass


def publish(path, text):
    with open(path + ".part", "w") as f:
        f.write(text)
    os.replace(path + ".part", path)


def pause(marker, spec):
    publish(marker, json.dumps(spec))
    time.sleep(3600)  # until the test's SIGKILL


def replace_everywhere(old, new):
    """Every saelab module that imported ``old`` by name gets ``new``."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("saelab"):
            for name, value in list(vars(module).items()):
                if value is old:
                    setattr(module, name, new)


def install(spec, marker):
    """Pause at the ``nth`` call of ``call`` (a dotted function), or the ``nth`` atomic write of a
    file named like ``file``: ``before`` it, with its finished ``temp`` file, or ``after`` it."""
    seen = [0]

    def due():
        seen[0] += 1
        return seen[0] == spec["nth"]

    when = spec["when"]
    if "call" in spec:
        module, _, name = spec["call"].rpartition(".")
        original = getattr(importlib.import_module(module), name)

        @functools.wraps(original)
        def paused_call(*args, **kwargs):
            hit = due()
            if hit and when == "before":
                pause(marker, spec)
            result = original(*args, **kwargs)
            if hit:
                pause(marker, spec)
            return result

        replace_everywhere(original, paused_call)
        return
    original = saelab.atomic.write_atomically

    def paused_write(path, write):
        if not fnmatch.fnmatch(os.path.basename(str(path)), spec["file"]) or not due():
            return original(path, write)
        if when == "before":
            pause(marker, spec)
        if when == "temp":
            return original(path, lambda tmp: (write(tmp), pause(marker, spec)))
        result = original(path, write)
        pause(marker, spec)
        return result

    replace_everywhere(original, paused_write)


def run(request):
    folder = request["dir"]
    for fd, name in ((1, "stdout"), (2, "stderr")):
        out = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, fd)
        os.close(out)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.nice(request["nice"])
    if request["pause"]:
        install(request["pause"], os.path.join(folder, "paused"))
    try:
        code = saelab.cli.main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            run(request)
        finally:
            os._exit(1)
    publish(os.path.join(request["dir"], "pid"), str(pid))
    _, status = os.waitpid(pid, 0)
    publish(os.path.join(request["dir"], "rc"), str(os.waitstatus_to_exitcode(status)))
'''


def wait_for(check: Callable[[], bool], what: str, run: Run | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if run is not None and run.finished():
            raise AssertionError(f"the run ended ({run.rc()}) before {what}:\n{run.stderr()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass
class Run:
    """One ``saelab`` process forked by the zygote; its pid, exit status and output are files in
    ``dir``."""

    dir: Path

    def pid(self) -> int:
        wait_for(lambda: (self.dir / "pid").is_file(), "the process to start")
        return int((self.dir / "pid").read_text())

    def finished(self) -> bool:
        return (self.dir / "rc").is_file()

    def rc(self) -> int:
        wait_for(self.finished, f"the process in {self.dir} to end")
        return int((self.dir / "rc").read_text())

    def stdout(self) -> str:
        return (self.dir / "stdout").read_text()

    def stderr(self) -> str:
        return (self.dir / "stderr").read_text()

    def kill(self) -> None:
        if self.finished():
            raise AssertionError(f"the run in {self.dir} ended before it could be killed")
        os.kill(self.pid(), signal.SIGKILL)
        assert self.rc() == -signal.SIGKILL  # killed, not finished on its own

    def done(self) -> Run:
        """Wait for a run meant to succeed."""
        assert self.rc() == 0, self.stderr()
        return self


class Zygote:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: list[Run] = []
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "MPLBACKEND": "Agg",
            # One thread: tiny tensors gain nothing from more, and every run (uninterrupted,
            # killed, resumed) computes with the same number, so the same bits.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, env=env, text=True
        )

    def start(self, *argv: str | Path, pause: dict | None = None, nice: int = 0) -> Run:
        run = Run(self.root / f"run{len(self.runs)}")
        run.dir.mkdir()
        self.runs.append(run)
        request = {
            "argv": ["-q", *map(str, argv)],
            "dir": str(run.dir),
            "pause": pause,
            "nice": nice,
        }
        assert self.proc.stdin is not None and self.proc.poll() is None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return run

    def run(self, *argv: str | Path) -> Run:
        run = self.start(*argv)
        run.rc()
        return run

    def close(self) -> None:
        # A failed test may leave its process paused: end it (by its pid) so the zygote can go.
        for run in self.runs:
            if (run.dir / "pid").is_file() and not run.finished():
                os.kill(int((run.dir / "pid").read_text()), signal.SIGKILL)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=WAIT_S)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    forks = Zygote(tmp_path_factory.mktemp("runs"))
    yield forks
    forks.close()


def pause_at(thing: str, nth: int = 1, when: str = "after") -> dict:
    """A dotted saelab function, or a file name (a glob) written atomically."""
    key = "call" if thing.startswith("saelab.") else "file"
    return {key: thing, "nth": nth, "when": when}


def leftovers(folder: Path) -> set[str]:
    """Hidden names (temp files and folders of atomic writes: ``.NAME.*tmp*``, ``.*.partial``)
    anywhere under ``folder``, relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob(".*")}


def one_error_line(run: Run) -> str:
    """The one error line of a failed run (exit 2, no traceback). Warnings may come before it:
    the next run says in one line what of a killed run's it removed (issue 16, item 2)."""
    assert run.rc() == 2, run.stderr()
    lines = run.stderr().strip().splitlines()
    assert "Traceback" not in run.stderr(), run.stderr()
    assert lines[-1].startswith("saelab: error:"), lines
    assert all(line.startswith("WARNING ") for line in lines[:-1]), lines
    return lines[-1]


@dataclass(frozen=True)
class KillPoint:
    id: str
    pause: dict | None
    """Where the process pauses to be killed (None: killed when ``kill_when`` appears)."""
    kill_when: str | None = None
    """A glob under the output folder: SIGKILL as soon as it matches, with no pause."""
    there_at_kill: tuple[str, ...] = ()
    """Globs under the output folder that match when the kill lands."""
    resume_error: str | None = None
    """A text in the one-line error of ``--resume`` (exit 2); then the command is run again
    without ``--resume``."""
    resume_warns: str | None = None
    """A text on stderr of the (successful) ``--resume``."""


def kill_at(zygote: Zygote, point: KillPoint, args: tuple, out: Path) -> None:
    if point.pause is not None:
        run = zygote.start(*args, pause=point.pause)
        wait_for(lambda: (run.dir / "paused").is_file(), f"the pause at {point.pause}", run)
    else:
        # Niced, so that on a busy machine this test's polling runs before the run gets far.
        run = zygote.start(*args, nice=10)
        wait_for(lambda: any(out.glob(point.kill_when)), f"{point.kill_when} to appear", run)
    run.kill()
    for pattern in point.there_at_kill:
        names = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        assert any(out.glob(pattern)), f"{pattern} not in {names}"


def resume(zygote: Zygote, point: KillPoint, resume_args: tuple, args: tuple) -> Run:
    again = zygote.run(*resume_args)
    if point.resume_error is not None:
        assert point.resume_error in one_error_line(again)
        return zygote.run(*args).done()
    again.done()
    if point.resume_warns is not None:
        assert point.resume_warns in again.stderr()
    return again


# ----- saelab train --checkpoint-every ------------------------------------------------------------


def train_args(model_dir: Path, text: Path, out: Path) -> tuple:
    extra = (
        "--checkpoint-every",
        str(CHECKPOINT_STEPS * 256),
        # Log windows of 5 steps, checkpoints every 6: a resume starts inside a window, whose
        # sums so far must come from the checkpoint for the log to match.
        "--set",
        "train.log_every_steps=5",
    )
    return tiny_train_args(model_dir, text, out, tokens=TRAIN_STEPS * 256, extra=extra)


# Issue 16, item 2: the next run of the command removes the temp files of a killed one (whose pid
# is gone), and says so in one line.
REMOVED_ONE = "removed 1 leftover(s) of an interrupted saelab train run"


def step_folder(nth: int) -> str:
    return f"step_{nth * CHECKPOINT_STEPS:08d}"


TRAIN_POINTS = [
    # (a) Before the run folder has its config.toml: nothing to resume from, said in one line.
    KillPoint(
        "loading the model",
        pause_at("saelab.models.loading.load_model", when="before"),
        resume_error="nothing to resume",
    ),
    # (a) Training, no checkpoint yet: --resume says so and starts from the beginning.
    KillPoint(
        "before the first checkpoint",
        pause_at("saelab.training.checkpoint.write_checkpoint", when="before"),
        there_at_kill=("config.toml",),
        resume_warns="no checkpoint in",
    ),
    # (b) The first step folder renamed into place, latest.json not yet pointing at it.
    KillPoint(
        "first checkpoint folder, no latest.json",
        pause_at("latest.json", when="before"),
        there_at_kill=(f"checkpoints/{step_folder(1)}/sae_0.json",),
        resume_warns="no checkpoint in",
    ),
    # (b) As a user's kill lands: as soon as the first step folder appears.
    KillPoint("first checkpoint folder appears", None, kill_when=f"checkpoints/{step_folder(1)}"),
    # (c) Half a checkpoint: two of its three states in the .partial folder.
    KillPoint(
        "while a checkpoint is written",
        pause_at("saelab.training.checkpoint.save_state", STATES_PER_CHECKPOINT + 2),
        there_at_kill=(f"checkpoints/.{step_folder(2)}.partial/stream.json",),
        resume_warns="removed 1 half-written checkpoint(s)",
    ),
    # (c) The pointer's own atomic write: its finished temp file not yet renamed.
    KillPoint(
        "while latest.json is written",
        pause_at("latest.json", 2, when="temp"),
        there_at_kill=("checkpoints/.latest.json.*.tmp",),
        resume_warns=REMOVED_ONE,
    ),
    # (d) Late: the last checkpoint written.
    KillPoint(
        "after the last checkpoint",
        pause_at("saelab.training.checkpoint.write_checkpoint", 4),
        there_at_kill=(f"checkpoints/{step_folder(4)}",),
    ),
    # (d) Late: the SAE's weights half saved at the end (no cfg.json: not a finished run).
    KillPoint(
        "while the SAE weights are saved",
        pause_at("sae_weights.safetensors", when="temp"),
        there_at_kill=(f"{FOLDER}/.sae_weights.safetensors.*.tmp",),
        resume_warns=REMOVED_ONE,
    ),
    # (d) Later: the SAE saved, resolved.json not yet written.
    KillPoint(
        "before resolved.json",
        pause_at("resolved.json", when="before"),
        there_at_kill=(f"{FOLDER}/cfg.json",),
    ),
]


def test_a_checkpoint_removes_those_left_half_written(tmp_path):
    """Also a killed writer's of a step the resumed run never writes again (an interrupted run's
    checkpoint at its own step)."""
    stale = tmp_path / "checkpoints" / f".{step_folder(1)}.partial"
    stale.mkdir(parents=True)
    (stale / "trainer.json").write_text("{}")
    write_checkpoint(tmp_path, 10 * CHECKPOINT_STEPS, {"trainer": {"step": 1}})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest.json", step_folder(10)]


def train_log(out: Path) -> list[dict]:
    """The log's records without their timings."""
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]


def deterministic_files(out: Path) -> list[str]:
    """Every file of a finished run but the TensorBoard events (wall times) and the log (which
    has timings; compared by :func:`train_log`)."""
    return sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file()
        and not p.name.startswith(".")
        and "tensorboard" not in p.parts
        and p.name != "train_log.jsonl"
    )


@pytest.fixture(scope="module")
def uninterrupted_run(zygote, tiny_model_dir, words_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    zygote.run(*train_args(tiny_model_dir, words_file, out)).done()
    assert (out / FOLDER / "cfg.json").is_file() and not leftovers(out)
    return out


@pytest.mark.parametrize("point", TRAIN_POINTS, ids=lambda p: p.id)
def test_killed_training_resumes_to_the_uninterrupted_bytes(
    zygote, uninterrupted_run, tiny_model_dir, words_file, tmp_path, point
):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, words_file, out)
    kill_at(zygote, point, args, out)
    resume(zygote, point, ("train", "--out", out, "--resume"), args)

    whole = uninterrupted_run
    files = deterministic_files(whole)
    assert deterministic_files(out) == files
    # The SAE (weights, sparsity, cfg.json), config.toml, resolved.json (final losses) and the
    # checkpoints (optimiser, RNG, stream position), byte for byte.
    for name in files:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    # The log holds the killed run's records up to the kill, then the resumed run's from its
    # checkpoint on: each step's last record is the uninterrupted run's.
    last = {(r["step"], r["sae"]): r for r in train_log(out)}
    assert list(last.values()) == train_log(whole)
    assert not leftovers(out)


# ----- saelab cache -------------------------------------------------------------------------------


def cache_args(model_dir: Path, text: Path, out: Path, tokens: int = 700) -> tuple:
    # 700 tokens in shards of 150: shard_00000 .. shard_00004 (the last of 100 rows).
    return (
        "cache",
        "--model",
        model_dir,
        "--hook",
        HOOK,
        "--tokens",
        str(tokens),
        "--dataset",
        text,
        "--context",
        "32",
        "--model-batch-size",
        "4",
        "--shard-tokens",
        "150",
        "--out",
        out,
    )


CACHE_POINTS = [
    # During the first shard: no progress.json yet, so nothing to resume, said in one line; the
    # command without --resume removes the killed run's temp file and starts afresh.
    KillPoint(
        "during the first shard",
        pause_at("shard_00000.safetensors", when="temp"),
        there_at_kill=(".shard_00000.safetensors.*.tmp",),
        resume_error="nothing to resume",
    ),
    # Between shards: two shards and their progress recorded.
    KillPoint(
        "between shards",
        pause_at("saelab.data.cache.writer._save_progress", 2),
        there_at_kill=("shard_00001.safetensors", "pending_00002.safetensors"),
    ),
    # A shard renamed into place but not yet in progress.json: it is written again.
    KillPoint(
        "a shard not yet recorded",
        pause_at("saelab.data.cache.writer._save_progress", 2, when="before"),
        there_at_kill=("shard_00001.safetensors", "pending_00001.safetensors"),
    ),
    # A new pending file written, progress.json still naming the previous one.
    KillPoint(
        "before progress.json",
        pause_at("progress.json", 3, when="before"),
        there_at_kill=("pending_00002.safetensors", "pending_00003.safetensors"),
    ),
    # A shard's finished temp file not yet renamed: --resume removes it.
    KillPoint(
        "while a shard is written",
        pause_at("shard_00002.safetensors", when="temp"),
        there_at_kill=(".shard_00002.safetensors.*.tmp",),
        resume_warns="removed 1 leftover(s) of an interrupted saelab cache run",
    ),
    # Late: every shard written, index.json not yet.
    KillPoint(
        "before index.json",
        pause_at("index.json", when="before"),
        there_at_kill=("shard_00004.safetensors", "progress.json"),
    ),
]


@pytest.fixture(scope="module")
def uninterrupted_cache(zygote, tiny_model_dir, words_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "acts"
    zygote.run(*cache_args(tiny_model_dir, words_file, out)).done()
    assert (out / "index.json").is_file() and not leftovers(out)
    return out


@pytest.mark.parametrize("point", CACHE_POINTS, ids=lambda p: p.id)
def test_killed_cache_resumes_to_the_uninterrupted_bytes(
    zygote, uninterrupted_cache, tiny_model_dir, words_file, tmp_path, point
):
    out = tmp_path / "acts"
    args = cache_args(tiny_model_dir, words_file, out)
    kill_at(zygote, point, args, out)
    done = resume(zygote, point, (*args, "--resume"), args)
    assert "cached 700 tokens" in done.stdout()
    assert_same_cache(out, uninterrupted_cache)


def assert_same_cache(out: Path, whole: Path) -> None:
    files = sorted(p.name for p in whole.iterdir())
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == files
    for name in files:  # index.json (counts, scales, sha256) and every shard
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert not leftovers(out)


def test_cache_killed_when_a_shard_appears(zygote, tiny_model_dir, words_file, tmp_path):
    """As a user's kill lands, with no pause: as soon as the second shard appears. A longer
    cache (20 shards), so the kill lands well before the end on a busy machine."""
    whole, out = tmp_path / "whole", tmp_path / "acts"
    zygote.run(*cache_args(tiny_model_dir, words_file, whole, tokens=3000)).done()
    args = cache_args(tiny_model_dir, words_file, out, tokens=3000)
    kill_at(zygote, KillPoint("shard 1", None, kill_when="shard_00001.safetensors"), args, out)
    assert not (out / "index.json").exists()
    assert "cached 3,000 tokens" in zygote.run(*args, "--resume").done().stdout()
    assert_same_cache(out, whole)


def test_cache_killed_after_its_index_is_complete(
    zygote, uninterrupted_cache, tiny_model_dir, words_file, tmp_path
):
    """Killed between index.json and the removal of progress.json: the cache is complete, so
    ``--resume`` has nothing to do (one line) and the cache reads as the uninterrupted one."""
    out = tmp_path / "acts"
    args = cache_args(tiny_model_dir, words_file, out)
    point = KillPoint("after index.json", pause_at("index.json"))
    kill_at(zygote, point, args, out)
    assert "complete activation cache" in one_error_line(zygote.run(*args, "--resume"))
    files = sorted(p.name for p in uninterrupted_cache.iterdir())
    for name in files:
        assert (out / name).read_bytes() == (uninterrupted_cache / name).read_bytes(), name
    # Item 2: the next cache run on the folder removes the killed run's progress record beside
    # the complete index.json.
    assert sorted(p.name for p in out.iterdir()) == files
    assert not leftovers(out)
