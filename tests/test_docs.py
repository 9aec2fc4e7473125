"""The README documents what the registries hold: nothing registered goes undocumented."""

from __future__ import annotations

from pathlib import Path

from saelab.cli import COMMANDS
from saelab.evaluation.evaluate import METRIC_KEYS
from saelab.saes import ARCHITECTURES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_architecture_is_in_the_readme():
    missing = [name for name in ARCHITECTURES if f"`{name}`" not in README]
    assert not missing


def test_every_command_is_in_the_cli_reference():
    missing = [name for name in COMMANDS if f"saelab {name}" not in README]
    assert not missing


def test_the_metrics_json_keys_are_documented_in_order():
    assert " ".join(METRIC_KEYS) in README
