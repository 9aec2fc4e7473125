"""The README's promise, checked: every command's ``--help`` works, and the classic mistakes (a
missing file or folder, a wrong type, an empty input) give exit status 2, exactly one stderr line
``saelab: error: ...`` and no traceback.

Commands run in-process through :func:`saelab.cli.main`; a few run as the real ``saelab``
command to prove it from the entry point. Nothing loads the default model: mistakes either fail
before any model is loaded or name the tiny model folder of ``tests/conftest.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest

from saelab.cli import COMMANDS, build_parser, main
from saelab.cli.options import parse_int
from saelab.config import SAEConfig
from saelab.saes import TopKSAE
from saelab.saes.storage import save_sae
from saelab_cli import one_line_error
from tiny_models import D_MODEL

HOOK = "blocks.0.hook_resid_post"

MISTAKES: dict[str, list[list[str]]] = {
    "train": [
        ["{missing}.toml"],
        ["{empty_toml}"],
        ["--activations", "{missing}"],
        ["--activations", "{empty_dir}"],
        ["{empty_dir}"],  # a folder where the run file goes
    ],
    "validate": [["{missing}.toml"], ["{empty_toml}"], ["{empty_dir}"]],
    "sweep": [["{missing}.toml"], ["{empty_toml}"]],
    "cache": [
        ["--out", "{out}", "--model", "{missing}"],
        ["--out", "{out}", "--model", "{empty_dir}"],
        ["--out", "{out}", "--model", "{model}", "--hook", HOOK, "--dataset", "{missing}.txt"],
        ["--out", "{out}", "--model", "{model}", "--hook", HOOK, "--dataset", "{empty_txt}"],
        ["--out", "{out}", "--model", "{model}", "--hook", HOOK, "--dataset", "{empty_dir}"],
    ],
    "eval": [
        ["{missing}"],
        ["{empty_dir}"],
        ["{sae}", "--model", "{model}", "--dataset", "{missing}.txt"],
        ["{sae}", "--model", "{model}", "--dataset", "{empty_txt}"],
    ],
    "convert": [
        ["{missing}", "{out}", "--to", "sparsify"],
        ["{empty_dir}", "{out}", "--to", "sparsify"],
        ["{sae}/cfg.json", "{out}", "--to", "sparsify"],  # a file where the folder goes
    ],
    "transfer": [["{missing}", "--layers", "0"], ["{empty_dir}", "--layers", "0"]],
    "report": [["{missing}"], ["{empty_dir}"]],
    "features": [
        ["{missing}"],
        ["{empty_dir}"],
        ["{sae}", "--model", "{model}", "--data", "{missing}.txt"],
        ["{sae}", "--model", "{model}", "--data", "{empty_txt}"],
    ],
    "dashboard": [
        ["{missing}", "--out", "{out}"],
        ["{empty_dir}", "--out", "{out}"],
        ["{sae}", "--out", "{out}", "--stats", "{missing}"],
        ["{sae}", "--out", "{out}", "--stats", "{empty_dir}"],
    ],
    "serve": [["{missing}"], ["{empty_dir}"]],
    "graph": [
        ["--replacement", "{missing}", "--prompt", "x", "--out", "{out}"],
        ["--replacement", "{empty_dir}", "--prompt", "x", "--out", "{out}"],
    ],
    "bench": [
        ["core", "{missing}"],
        ["absorption", "{empty_dir}"],
        ["probing", "{missing}"],
        ["probing", "{sae}", "--model", "{model}", "--task", "{missing}.jsonl"],
        ["probing", "{sae}", "--model", "{model}", "--task", "{empty_jsonl}"],
    ],
    "steer": [
        ["--method", "caa", "--pairs", "{missing}.jsonl", "--model", "{model}", "--hook", HOOK],
        ["--method", "caa", "--pairs", "{empty_jsonl}", "--model", "{model}", "--hook", HOOK],
        ["--vector", "{missing}", "--model", "{model}"],
        ["--vector", "{empty_dir}", "--model", "{model}"],
        ["--method", "sae-feature", "--sae", "{missing}", "--feature", "0"],
        ["--method", "sae-feature", "--sae", "{empty_dir}", "--feature", "0"],
        ["--method", "mean", "--target", "{missing}.txt", "--model", "{model}", "--hook", HOOK],
        ["--method", "mean", "--target", "{empty_txt}", "--model", "{model}", "--hook", HOOK],
        [
            "--method",
            "sae-feature",
            "--sae",
            "{sae}",
            "--feature",
            "0",
            "--model",
            "{model}",
            "--eval",
            "{missing}.jsonl",
        ],
        [
            "--method",
            "sae-feature",
            "--sae",
            "{sae}",
            "--feature",
            "0",
            "--model",
            "{model}",
            "--eval",
            "{empty_jsonl}",
        ],
    ],
    "circuit": [
        ["--sae", "{missing}"],
        ["--sae", "{empty_dir}"],
        ["--sae", "{sae}", "--model", "{model}", "--task", "{missing}.jsonl"],
        ["--sae", "{sae}", "--model", "{model}", "--task", "{empty_jsonl}"],
    ],
    "hooks": [["{missing}"], ["{empty_dir}"]],
}
"""Per command, the classic mistakes of its path arguments: missing, empty, the wrong kind."""


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_model_dir, words_file) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mistakes")
    (root / "empty").mkdir()
    for name in ("empty.toml", "empty.jsonl", "empty.txt"):
        (root / name).write_text("")
    meta = {"model_name": str(tiny_model_dir), "dataset_path": str(words_file), "context_size": 16}
    sae = TopKSAE(SAEConfig(k=2, width=2 * D_MODEL, hook=HOOK), D_MODEL)
    save_sae(sae, root / "sae", metadata=meta)
    return {
        "missing": str(root / "no-such"),
        "empty_dir": str(root / "empty"),
        "empty_toml": str(root / "empty.toml"),
        "empty_jsonl": str(root / "empty.jsonl"),
        "empty_txt": str(root / "empty.txt"),
        "model": str(tiny_model_dir),
        "sae": str(root / "sae"),
        "out": str(root / "out"),
    }


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` as the entry point runs it: exit status, stdout, stderr. An exception that
    escapes (a traceback for the user) fails the test with the exception."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code
    except Exception as exc:  # noqa: BLE001 - any escape is the failure under test
        pytest.fail(f"saelab {' '.join(argv)} raised {type(exc).__name__}: {exc}")
    out, err = capsys.readouterr()
    return int(code or 0), out, err


def assert_one_line_error(argv: list[str], capsys) -> str:
    code, out, err = run_main(argv, capsys)
    lines = err.strip().splitlines()
    shown = f"saelab {' '.join(argv)}\nstdout: {out[-500:]}\nstderr: {err[-1500:]}"
    assert code == 2, shown
    assert len(lines) == 1 and lines[0].startswith("saelab: error: "), shown
    assert "Traceback" not in out + err, shown
    return lines[0]


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def nested_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, and for a command with sub-commands (``bench SUITE``) each
    sub-command's, named ``"bench probing"``."""
    parsers = {}
    for name, parser in subparsers().items():
        inner = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not inner:
            parsers[name] = parser
        for sub, sub_parser in inner[0].choices.items() if inner else ():
            parsers[f"{name} {sub}"] = sub_parser
    return parsers


def test_the_mistakes_cover_every_command():
    assert set(MISTAKES) == set(COMMANDS) == set(subparsers())


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_works_for_every_command(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    code, out, err = run_main(argv, capsys)
    assert code == 0 and not err
    assert out.startswith(f"usage: saelab{'' if command is None else ' ' + command}")
    if command is None:
        assert all(name in out for name in COMMANDS)


def wrong_values() -> list[tuple[str, str, str]]:
    """(command, flag, value) for every numeric option of every command: a word for any number,
    a fraction for a whole number."""
    cases = []
    for name, parser in nested_parsers().items():
        for action in parser._actions:
            if not action.option_strings or action.type is None:
                continue
            flag = action.option_strings[0]
            kind = getattr(action.type, "__name__", "")
            if action.type in (int, parse_int, float) or kind.startswith("list of"):
                cases.append((name, flag, "abc"))
            if action.type in (int, parse_int) or kind == "list of int":
                cases.append((name, flag, "1.5"))
    return cases


WRONG_VALUES = wrong_values()


def test_every_command_has_numeric_flags_to_get_wrong():
    assert {name.split()[0] for name, _, _ in WRONG_VALUES} >= set(COMMANDS) - {
        "report",
        "convert",
        "hooks",
    }
    assert ("train", "--tokens", "abc") in WRONG_VALUES and ("train", "--k", "1.5") in WRONG_VALUES


@pytest.mark.parametrize(("command", "flag", "value"), WRONG_VALUES)
def test_a_value_of_the_wrong_type_is_one_line(command, flag, value, places, capsys):
    line = assert_one_line_error(["-q", *command.split(), flag, value], capsys)
    assert flag in line and value in line


CASES = [(command, args) for command, cases in MISTAKES.items() for args in cases]


@pytest.mark.parametrize(
    ("command", "args"), CASES, ids=[f"{c}-{'-'.join(a)}"[:80] for c, a in CASES]
)
def test_missing_and_empty_inputs_are_one_line(command, args, places, capsys):
    argv = ["-q", command, *(arg.format(**places) for arg in args)]
    line = assert_one_line_error(argv, capsys)
    named = [arg.format(**places) for arg in args if "{" in arg and "{out}" not in arg]
    named = [p for p in named if p not in (places["model"], places["sae"])]
    assert any(p in line for p in named), line


BAD_CONTENT: dict[str, tuple[str, bytes, list[str], str]] = {
    # name: (file name, its bytes, the command line ({file} is the file), words in the message)
    "toml-not-toml": ("run.toml", b"[sae\n", ["validate", "{file}"], "not valid TOML"),
    "toml-binary": ("run.toml", b"\xff\xfe\x00\x01", ["validate", "{file}"], "not UTF-8"),
    "toml-k-fraction": ("run.toml", b"[sae]\nk = 1.5\n", ["validate", "{file}"], "sae.k"),
    "toml-k-word": ("run.toml", b'[sae]\nk = "big"\n', ["validate", "{file}"], "sae.k"),
    "toml-name-number": ("run.toml", b"[model]\nname = 3\n", ["validate", "{file}"], "model.name"),
    "toml-hook-list": ("run.toml", b'[sae]\nhook = ["a"]\n', ["validate", "{file}"], "sae.hook"),
    "toml-sae-number": ("run.toml", b"sae = 3\n", ["validate", "{file}"], "sae must be"),
    "toml-section-number": ("run.toml", b"model = 3\n", ["validate", "{file}"], "[model]"),
    "toml-seed-word": ("run.toml", b'seed = "abc"\n', ["validate", "{file}"], "seed"),
    "toml-comments-only": ("run.toml", b"# nothing yet\n", ["train", "{file}"], "empty"),
    "set-seed-word": (
        "run.toml",
        b"[sae]\nk = 4\n",
        ["validate", "{file}", "--set", "seed=abc"],
        "seed",
    ),
    "pairs-binary": (
        "p.jsonl",
        b"\xff\xfe\x00garbage\n",
        ["steer", "--method", "caa", "--pairs", "{file}", "--model", "{model}", "--hook", HOOK],
        "not UTF-8",
    ),
    "pairs-not-json": (
        "p.jsonl",
        b"not json\n",
        ["steer", "--method", "caa", "--pairs", "{file}", "--model", "{model}", "--hook", HOOK],
        "not valid JSON",
    ),
    "task-binary": (
        "t.jsonl",
        b"\xff\xfe\x00garbage\n",
        ["circuit", "--sae", "{sae}", "--model", "{model}", "--task", "{file}"],
        "not UTF-8",
    ),
    "task-a-list": (
        "t.jsonl",
        b"[1, 2]\n",
        ["circuit", "--sae", "{sae}", "--model", "{model}", "--task", "{file}"],
        "not an object",
    ),
    "text-binary": (
        "d.jsonl",
        b"\xff\xfe\x00garbage\n",
        ["features", "{sae}", "--model", "{model}", "--data", "{file}"],
        "not valid JSON",
    ),
    "sae-cfg-wrong-type": (
        "sae/cfg.json",
        b'{"d_in": 64, "d_sae": "big"}',
        ["eval", "{folder}"],
        "d_sae",
    ),
    "sae-weights-hostile": (
        "sae/sae_weights.safetensors",
        b"\xff" * 8 + b"{}",
        ["features", "{folder}", "--model", "{model}"],
        "header claims",
    ),
}
"""Files that exist but hold the wrong thing; each must be named in one line."""


@pytest.mark.parametrize("case", BAD_CONTENT)
def test_files_with_the_wrong_content_are_one_line(case, places, tmp_path, capsys):
    name, content, args, words = BAD_CONTENT[case]
    if name.startswith("sae/"):  # a copy of the good SAE with one file replaced
        shutil.copytree(places["sae"], tmp_path / "sae")
    path = tmp_path / name
    path.write_bytes(content)
    values = {**places, "file": str(path), "folder": str(tmp_path / "sae")}
    line = assert_one_line_error(["-q", *(arg.format(**values) for arg in args)], capsys)
    assert words in line, line


def test_from_the_real_entry_point(places, tmp_path):
    """The same promise through ``python -m saelab``: one line on the real stderr, no traceback
    (the two commands run side by side to save time)."""
    runs = [
        ["train", places["empty_toml"], "--out", str(tmp_path / "run")],
        ["steer", "--method", "caa", "--pairs", places["empty_jsonl"], "--model", places["model"]],
    ]
    started = [
        subprocess.Popen(
            [sys.executable, "-m", "saelab", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        for args in runs
    ]
    for args, process in zip(runs, started, strict=True):
        out, err = process.communicate(timeout=300)
        done = subprocess.CompletedProcess(args, process.returncode, out, err)
        line = one_line_error(done)
        assert places["empty_toml"] in line or places["empty_jsonl"] in line, line
    assert not (tmp_path / "run").exists()
