"""The CLI is built from config dataclasses: field docstrings become ``--help``, each default is
shown once, flags round-trip to the dataclass, and every options dataclass agrees with the
defaults of the library function it is passed to."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from dataclasses import dataclass

import pytest

from saelab.cli import COMMANDS, build_parser, main
from saelab.cli.options import add_options, field_docs, options_from


@dataclass(frozen=True)
class Example:
    tokens: int = 8192
    """Evaluation tokens,
    over two lines in the source."""
    ratio: float = 0.5
    """A ratio in ``[0, 1]``."""
    name: str | None = None
    """A name; default: none."""
    fast: bool = False
    """Go fast."""
    coefs: tuple[float, ...] = (-1.0, 1.0)
    """Coefficients."""
    prompts: tuple[str, ...] = ()
    """Prompts, one per use."""
    mode: str = "a"
    """Mode."""

    def __post_init__(self) -> None:
        assert self.mode in ("a", "b")


def example_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    add_options(parser, Example, choices={"mode": ("a", "b")})
    return parser


def flat_help(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_help().split())


def test_a_field_docstring_becomes_its_help_on_one_line():
    assert field_docs(Example)["tokens"] == "Evaluation tokens, over two lines in the source."
    text = flat_help(example_parser())
    assert "--tokens TOKENS Evaluation tokens, over two lines in the source. (default: 8192)" in (
        text
    )
    assert "A ratio in [0, 1]. (default: 0.5)" in text  # ``markup`` dropped
    assert "(default: None)" not in text and "Go fast. --coefs" in text  # no None, no False


def test_the_default_appears_once_in_every_help_of_every_command():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subparsers.choices) == list(COMMANDS)
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            where = f"saelab {name} {action.option_strings}: {action.help}"
            assert (action.help or "").count("(default") <= 1, where
            unshown = (None, False, [], (), argparse.SUPPRESS)
            if action.option_strings and action.default not in unshown:
                assert re.search(r"\(default: [^()]+\)$", action.help), where


def test_flags_round_trip_to_the_dataclass():
    parser = example_parser()
    argv = ["--tokens", "2e5", "--ratio", "0.25", "--name", "x", "--fast", "--mode", "b"]
    argv += ["--coefs", "-8", "-4", "0,2", "--prompts", "a, b", "--prompts", "c"]
    got = options_from(parser.parse_args(argv), Example)
    assert got == Example(200_000, 0.25, "x", True, (-8.0, -4.0, 0.0, 2.0), ("a, b", "c"), "b")
    assert options_from(parser.parse_args([]), Example) == Example()
    assert options_from(parser.parse_args(["--tokens", "200_000"]), Example).tokens == 200_000
    assert options_from(parser.parse_args([]), Example, tokens=3).tokens == 3
    for coefs in (["--coefs=-8,-4,0"], ["--coefs", "1", "--coefs=-8,-4,0"]):  # the last use wins
        assert options_from(parser.parse_args(coefs), Example).coefs == (-8.0, -4.0, 0.0)


def test_an_unknown_choice_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as done:
        main(["circuit", "--sae", "x", "--method", "nope"])
    assert done.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saelab: error:")
    assert "'nope'" in lines[0] and "atp" in lines[0] and "ig" in lines[0]


def test_a_bad_value_from_the_config_checks_is_a_one_line_error(capsys):
    assert main(["-q", "features", "sae", "--top-k", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == "saelab: error: --top-k must be at least 1, got 0"


def library_defaults():
    """Each options dataclass with the functions it is passed to (and their keyword names)."""
    from saelab.analysis.circuits.run import run_circuit, run_compare
    from saelab.analysis.dashboard.config import DashboardConfig, ServeConfig
    from saelab.analysis.dashboard.serve import serve
    from saelab.analysis.dashboard.site import build_dashboard
    from saelab.analysis.features import compute_feature_stats
    from saelab.analysis.features.config import FeaturesConfig
    from saelab.cli.circuit import CircuitRun
    from saelab.cli.train import SweepOptions
    from saelab.data.cache import CacheArguments, cache_model_activations
    from saelab.data.cache_config import CacheConfig
    from saelab.evaluation.config import EvalConfig, TransferConfig
    from saelab.evaluation.evaluate import evaluate_sae_dirs
    from saelab.evaluation.transfer import transfer_saes
    from saelab.saes.convert_config import ConvertConfig
    from saelab.saes.formats import convert_sae
    from saelab.training.sweep import sweep_run

    cache_arguments = {f.name: f.default for f in dataclasses.fields(CacheArguments)}
    return [
        (EvalConfig, [evaluate_sae_dirs], {}),
        (TransferConfig, [transfer_saes], {}),
        (FeaturesConfig, [compute_feature_stats], {}),
        (DashboardConfig, [build_dashboard], {}),
        (ServeConfig, [serve], {}),
        (ConvertConfig, [convert_sae], {}),
        (CacheConfig, [cache_model_activations], {**cache_arguments, "model": "default"}),
        (CircuitRun, [run_circuit, run_compare], {}),
        (SweepOptions, [sweep_run], {}),
    ]


def test_every_options_dataclass_has_the_defaults_of_the_library_it_calls():
    for cls, functions, recorded in library_defaults():
        for function in functions:
            parameters = inspect.signature(function).parameters
            for spec in dataclasses.fields(cls):
                name = spec.name
                if name in parameters:
                    library = parameters[name].default
                else:
                    assert name in recorded, f"{cls.__name__}.{name} is no keyword of {function}"
                    library = recorded[name]
                if library not in (inspect.Parameter.empty, dataclasses.MISSING):
                    assert spec.default == library, f"{cls.__name__}.{name} vs {function.__name__}"


OLD_FLAGS = {
    "train": "--model --hook --output-hook --arch --expansion --k --l1 --tokens --batch-size --lr "
    "--dataset --context --seed --device --checkpoint-every --activations --dist-mode --set --out "
    "--resume",
    "eval": "--summary --model --dataset --tokens --context --device",
    "sweep": "--activations --tokens --batch-size --seed --device --checkpoint-every --dist-mode "
    "--set --eval-tokens --out --resume",
    "cache": "--out --model --hook --tokens --dataset --context --model-batch-size --seed --device "
    "--shard-tokens --dtype --resume",
    "convert": "--to --from --hook --output-hook",
    "transfer": "--layers --model --dataset --tokens --context --device --out",
    "report": "--out",
    "features": "--tokens --out --context --top-k --model --data/--dataset --batch-size --seed "
    "--device",
    "dashboard": "--out --stats --recompute --features --top --tokens --context --model "
    "--data/--dataset --top-k --batch-size --seed --device",
    "serve": "--port --host",
    "steer": "--method --vector --hook --pairs --answer-offset --positive --negative --target "
    "--general --tokens --sae --feature --sae-units --max-act --stats --model --coefs --positions "
    "--eval --neutral --neutral-tokens --context --generate --max-new-tokens --sample "
    "--temperature --top-p --seed --transfer-layers --transfer-model --device --out",
    "circuit": "--task --sae --k --model --n-prompts --method --ig-steps --ablation "
    "--ablate-errors --keep-per --rank-by --seed --compare --out --device",
    "hooks": "",
}
"""Every flag (with its aliases) of every command before the CLI was built from the configs."""


def test_every_flag_of_before_keeps_its_name_and_aliases():
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    for name, flags in OLD_FLAGS.items():
        have = {
            "/".join(a.option_strings)
            for a in subparsers.choices[name]._actions
            if a.option_strings and a.dest != "help"
        }
        assert set(flags.split()) <= have, name
