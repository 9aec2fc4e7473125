"""Every command that writes, with its output on a read-only file system, a full disk, or a path
that is an existing file: one ``saelab: error:`` line naming the path, exit status 2, no temp
leftovers, and the earlier result there byte for byte as it was. And leftovers of a killed run
are removed by the next run of the same command, those of a live writer kept.

The commands run in this process through ``saelab.cli.main`` on a tiny Llama and tiny SAEs;
the location's faults come from ``conftest.py`` (real mounts as root, simulated otherwise).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from saelab import atomic
from saelab.analysis.features import write_feature_stats
from saelab.cli import main
from saelab.config import SAEConfig
from saelab.errors import describe_os_error
from saelab.saes import TopKSAE
from saelab.saes.storage import save_sae
from tiny_models import D_MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]

HOOK = "blocks.1.hook_resid_post"
FAULTS = ("read-only", "full", "file")
EARLIER = b"an earlier result\n"


@dataclass(frozen=True)
class World:
    """What the commands read: the tiny model and text, a saved SAE and its statistics."""

    model: Path
    text: Path
    sae: Path
    stats: Path
    task: Path
    sweep: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, words_file) -> World:
    root = tmp_path_factory.mktemp("world")
    sae = TopKSAE(SAEConfig(hook=HOOK, k=4, width=64), d_in=D_MODEL, seed=0)
    meta = {"model_name": str(tiny_model_dir), "dataset_path": str(words_file), "context_size": 32}
    sae_dir = save_sae(sae, root / "sae", metadata=meta)
    (sae_dir / "metrics.json").write_text(json.dumps({"l0": 4.0, "fvu": 0.5, "mse": 1.0}))
    write_feature_stats(
        sae_dir, root / "stats", tokens=256, context=32, top_k=4, n_logits=4, progress=False
    )
    task = root / "task.jsonl"
    rows = [
        {"prompt": f"w{i} w{i + 1} w{i + 2}", "correct": " w5", "incorrect": " w6",
         "corrupted_prompt": f"w{i + 3} w{i + 4} w{i + 5}"}
        for i in (10, 20)
    ]  # fmt: skip
    task.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sweep = root / "sweep.toml"
    sweep.write_text(
        f'[model]\nname = "{tiny_model_dir}"\n[data]\ndataset = "{words_file}"\ncontext = 32\n'
        "buffer_size = 512\n[train]\ntokens = 1024\nbatch_size = 256\n"
        f'[[sae]]\nhook = "{HOOK}"\narchitecture = "topk"\nk = 4\nexpansion = 2\n'
    )
    return World(tiny_model_dir, words_file, sae_dir, root / "stats", task, sweep)


def _earlier(*names: str) -> Callable[[World, Path], None]:
    """An earlier result: the files ``names`` in the location."""

    def fill(world: World, root: Path) -> None:
        for name in names:
            (root / name).write_bytes(EARLIER)

    return fill


def _sae_copy(world: World, root: Path) -> None:
    shutil.copytree(world.sae, root / "sae")
    (root / "sae" / "metrics.json").write_bytes(EARLIER)
    (root / "eval_summary.json").write_bytes(EARLIER)


def _earlier_dashboard(world: World, root: Path) -> None:
    (root / "site").mkdir()
    for name in ("index.html", "dashboard.json"):
        (root / "site" / name).write_bytes(EARLIER)


def _out(root: Path, name: str) -> Path:
    """The output path in the location; the location itself where it is a file in the way."""
    return root if root.is_file() else root / name


def _eval_args(w: World, root: Path) -> list:
    if root.is_file():  # the summary's folder is a file
        return ["eval", w.sae, "--summary", root / "eval_summary.json", "--tokens", "128"]
    return ["eval", root / "sae", "--tokens", "128"]


COMMANDS: dict[str, tuple[Callable[[World, Path], list], Callable[[World, Path], None]]] = {
    "train": (
        lambda w, r: [
            "train", "--model", w.model, "--hook", HOOK, "--arch", "topk", "--expansion", "2",
            "--k", "4", "--tokens", "1024", "--batch-size", "256", "--dataset", w.text,
            "--context", "32", "--set", "data.buffer_size=512", "--out", _out(r, "run"),
        ],
        _earlier("run.txt"),
    ),
    "sweep": (
        lambda w, r: ["sweep", w.sweep, "--eval-tokens", "256", "--out", _out(r, "sweep")],
        _earlier("summary.json"),
    ),
    "cache": (
        lambda w, r: [
            "cache", "--model", w.model, "--hook", HOOK, "--tokens", "512", "--dataset", w.text,
            "--context", "32", "--out", _out(r, "cache"),
        ],
        _earlier("notes.txt"),
    ),
    "eval": (_eval_args, _sae_copy),
    "transfer": (
        lambda w, r: [
            "transfer", w.sae, "--layers", "0", "--tokens", "128", "--out", _out(r, "transfer"),
        ],
        _earlier("transfer.json"),
    ),
    "report": (lambda w, r: ["report", w.sae, "--out", _out(r, "report")], _earlier("index.html")),
    "convert": (
        lambda w, r: ["convert", w.sae, _out(r, "converted"), "--to", "sparsify"],
        _earlier("other.json"),
    ),
    "features": (
        lambda w, r: [
            "features", w.sae, "--tokens", "128", "--context", "32", "--top-k", "2",
            "--out", _out(r, "features"),
        ],
        _earlier("feature_stats.json"),
    ),
    "dashboard": (
        lambda w, r: ["dashboard", w.sae, "--stats", w.stats, "--out", _out(r, "site")],
        _earlier_dashboard,
    ),
    "steer": (
        lambda w, r: [
            "steer", "--model", w.model, "--method", "actadd", "--positive", "w5", "--negative",
            "w6", "--hook", HOOK, "--neutral", w.text, "--neutral-tokens", "64", "--coefs", "1",
            "--out", _out(r, "steer"),
        ],
        _earlier("steer.json"),
    ),
    "circuit": (
        lambda w, r: [
            "circuit", "--task", w.task, "--sae", w.sae, "--k", "2", "--n-prompts", "2",
            "--out", _out(r, "circuit"),
        ],
        _earlier("circuit.json"),
    ),
}  # fmt: skip
"""Command → (its arguments for a location, the earlier result put there first)."""


def run(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    capsys.readouterr()
    status = main(["-q", *map(str, argv)])
    return status, capsys.readouterr().err.strip().splitlines()


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the location and its bytes (the location itself if it is a file)."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def leftovers(folder: Path) -> list[Path]:
    """Temp names of the atomic writers (``.NAME.COMMAND-PID-RANDOM``) or anything ``.*tmp*``."""
    return [
        p
        for p in folder.rglob(".*")
        if atomic._TEMP_NAME.fullmatch(p.name) or "tmp" in p.name or f"-{os.getpid()}-" in p.name
    ]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_output_location_is_one_line_and_changes_nothing(
    command, fault, world, faulty_location, tmp_path, capsys
):
    args, fill = COMMANDS[command]
    root = faulty_location(fault, lambda folder: fill(world, folder))
    before = snapshot(root)
    status, err = run(args(world, root), capsys)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("saelab: error:") and str(root) in err[0], err[0]
    assert " — " in err[0], err[0]  # the cause, then what to do
    assert snapshot(root) == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "free space on that disk or pass another --out"),
        (errno.EDQUOT, "quota"),
        (errno.EROFS, "choose a writable --out"),
        (errno.EACCES, "choose a writable --out"),
        (errno.EPERM, "choose a writable --out"),
        (errno.ENOTDIR, "remove the file or pass a folder"),
        (errno.EEXIST, "remove the file or pass a folder"),
        (errno.EISDIR, "remove the folder"),
        (errno.EIO, "EIO"),  # the fallback names the errno
    ],
)
def test_each_os_error_is_one_line_that_says_what_to_do(code, words):
    line = describe_os_error(OSError(code, os.strerror(code), "runs/x"))
    assert line.startswith("runs/x: ") and words in line and "\n" not in line


def test_an_os_error_without_a_code_is_still_one_line():
    assert describe_os_error(OSError("cannot reach the hub\nretry later")) == "cannot reach the hub"


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    target = tmp_path / "a.json"
    target.write_bytes(EARLIER)

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")  # as matplotlib does: no name

    with pytest.raises(OSError) as raised:
        atomic.write_atomically(target, fail)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    with pytest.raises(OSError) as raised, atomic.write_folder_atomically(tmp_path / "site") as tmp:
        (tmp / "page.html").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "page.html"))
    assert raised.value.filename == str(tmp_path / "site")  # the user's name, not the temp's
    assert target.read_bytes() == EARLIER and sorted(tmp_path.iterdir()) == [target]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temp(folder: Path, name: str, command: str, pid: int, host: str = atomic._HOST) -> Path:
    return folder / f".{name}.{command}-{pid}-{host}beef"


def test_leftovers_of_a_killed_run_are_removed_by_the_next_one(world, tmp_path, capsys, caplog):
    dead, alive = _dead_pid(), os.getpid()
    site = tmp_path / "site"
    stale = [
        _temp(tmp_path, "site", "dashboard", dead),
        _temp(tmp_path, "site", "dashboard-old", dead),
    ]
    kept = [
        _temp(tmp_path, "site", "dashboard", alive),  # a writer still at work
        _temp(tmp_path, "site", "convert", dead),  # another command's
        _temp(
            tmp_path, "site", "dashboard", dead, host="0000" if atomic._HOST != "0000" else "1111"
        ),
        tmp_path / ".site.dashboard-notes",  # not a temp name at all
    ]
    for folder in stale + kept:
        folder.mkdir()
        (folder / "page.html").write_text("half")
    with caplog.at_level(logging.WARNING, logger="saelab.atomic"):
        status, err = run(COMMANDS["dashboard"][0](world, tmp_path), capsys)
    assert status == 0, err
    assert (site / "index.html").is_file()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    lines = [r.getMessage() for r in caplog.records if "leftover" in r.getMessage()]
    assert lines == [f"removed 2 leftover(s) of an interrupted saelab dashboard run in {site}"]


def test_stale_temp_files_in_an_sae_folder_are_removed_by_the_next_eval(
    world, tmp_path, capsys, caplog
):
    sae = Path(shutil.copytree(world.sae, tmp_path / "sae"))
    stale = Path(f"{_temp(sae, 'metrics.json', 'eval', _dead_pid())}.tmp")
    live = Path(f"{_temp(sae, 'eval_info.json', 'eval', os.getpid())}.tmp")
    for path in (stale, live):
        path.write_text("{")
    with caplog.at_level(logging.WARNING, logger="saelab.atomic"):
        status, err = run(["eval", sae, "--tokens", "128"], capsys)
    assert status == 0, err
    assert not stale.exists() and live.exists()
    assert json.loads((sae / "metrics.json").read_text())["l0"] > 0
    assert any(
        "removed 1 leftover(s) of an interrupted saelab eval run" in r.getMessage()
        for r in caplog.records
    )


def test_a_folder_moved_aside_by_a_killed_publish_is_put_back(tmp_path):
    site = tmp_path / "site"
    aside = _temp(tmp_path, "site", "dashboard-old", _dead_pid())
    (aside / "site").mkdir(parents=True)
    (aside / "site" / "index.html").write_bytes(EARLIER)
    assert atomic.remove_leftovers(site, "dashboard") == 1
    assert (site / "index.html").read_bytes() == EARLIER and not aside.exists()


def test_a_disk_that_fills_up_midway_keeps_the_old_dashboard(
    world, faulty_location, tmp_path, capsys, monkeypatch
):
    """The free-space estimate is only an estimate: when it passes and the pages still do not
    fit, the half-written site goes and the old one stays."""
    monkeypatch.setattr("saelab.analysis.dashboard.site.PAGE_BYTES", 0)
    monkeypatch.setattr("saelab.analysis.dashboard.site.INDEX_BYTES_PER_FEATURE", 0)
    args, fill = COMMANDS["dashboard"]
    root = faulty_location("full", lambda folder: fill(world, folder))
    before = snapshot(root)
    status, err = run(args(world, root), capsys)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"saelab: error: {root / 'site'}: no space left"), err[0]
    assert snapshot(root) == before and leftovers(tmp_path) == []
