"""bench.json: suites' results merged per SAE and metric, grouped over seeds with intervals,
written atomically and read back unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import saelab.atomic as atomic
from saelab.errors import SaelabError
from saelab.evaluation.bench.intervals import mean_interval, smallest_resolvable_difference
from saelab.evaluation.bench.results import (
    group_of,
    merge_results,
    read_bench,
    seed_of,
    write_bench,
)


def result(suite, values, metric="score"):
    """A suite result with one SAE per (architecture, seed) → value."""
    return {
        "suite": suite,
        "saes": {
            f"runs/s/{arch}-seed{seed}": {
                "metrics": {metric: value},
                "info": {"architecture": arch, "seed": seed, "l0": 20.0},
            }
            for (arch, seed), value in values.items()
        },
    }


def test_groups_by_seed_with_intervals_and_resolution():
    values = {("topk", 0): 0.8, ("topk", 1): 0.82, ("topk", 2): 0.81}
    values |= {("relu", 0): 0.7, ("relu", 1): 0.75, ("relu", 2): 0.72}
    doc = merge_results(None, result("absorption", values))
    assert set(doc["groups"]) == {"runs/s/topk", "runs/s/relu"}
    topk = doc["groups"]["runs/s/topk"]
    assert sorted(topk["seeds"]) == [0, 1, 2] and topk["info"]["architecture"] == "topk"
    mean, half = mean_interval([0.8, 0.82, 0.81])
    assert topk["metrics"]["score"]["mean"] == pytest.approx(mean)
    assert topk["metrics"]["score"]["half_width"] == pytest.approx(half)
    assert topk["metrics"]["score"]["n"] == 3
    resolves = smallest_resolvable_difference([0.8, 0.82, 0.81], [0.7, 0.75, 0.72])
    assert doc["summary"]["score"]["smallest_resolvable_difference"] == pytest.approx(resolves)
    assert doc["summary"]["score"]["seeds_per_group"] == 3
    assert doc["suites"]["absorption"]["metrics"] == ["score"]


def test_suites_accumulate_and_a_metric_measured_again_replaces_the_old():
    doc = merge_results(None, result("absorption", {("topk", 0): 0.5}))
    doc = merge_results(doc, result("probing", {("topk", 0): 0.9}, metric="acc"))
    doc = merge_results(doc, result("absorption", {("topk", 0): 0.6}))
    entry = doc["saes"]["runs/s/topk-seed0"]
    assert entry["metrics"] == {"score": 0.6, "acc": 0.9}
    assert entry["suites"] == ["absorption", "probing"]
    one_seed = doc["groups"]["runs/s/topk"]["metrics"]["score"]
    assert one_seed["mean"] == 0.6 and one_seed["half_width"] is None  # one seed: no interval


def test_group_and_seed_come_from_info_or_the_folder_name():
    assert group_of("runs/a/x-topk-k8-seed12", {}) == "runs/a/x-topk-k8"
    assert seed_of("runs/a/x-topk-k8-seed12", {}) == 12
    assert group_of("runs/a/x", {"group": "g"}) == "g"
    assert seed_of("runs/a/x", {}) is None and group_of("runs/a/x", {}) == "runs/a/x"


def test_round_trip_keeps_everything_and_nan_becomes_null(tmp_path):
    doc = merge_results(None, result("absorption", {("topk", 0): float("nan"), ("topk", 1): 1.0}))
    path = write_bench(tmp_path / "bench.json", doc)
    back = read_bench(tmp_path)  # a folder means the bench.json in it
    assert back == json.loads(path.read_text())
    assert back["saes"]["runs/s/topk-seed0"]["metrics"]["score"] is None
    assert back["groups"]["runs/s/topk"]["metrics"]["score"]["mean"] == 1.0
    again = merge_results(back, result("probing", {("topk", 0): 0.5}, metric="acc"))
    assert again["saes"]["runs/s/topk-seed1"]["metrics"]["score"] == 1.0
    assert not math.isnan(again["groups"]["runs/s/topk"]["metrics"]["acc"]["mean"])


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "bench.json"
    old = merge_results(None, result("absorption", {("topk", 0): 0.5}))
    write_bench(path, old)
    before = path.read_bytes()

    def no_space(src, dst):  # the temp file is written in full; the rename fails
        assert json.loads(Path(src).read_text())["saes"]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", no_space)
    new = merge_results(old, result("absorption", {("topk", 0): 0.9}))
    with pytest.raises(OSError):
        write_bench(path, new)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_reading_something_else_is_a_one_line_error(tmp_path):
    (tmp_path / "bench.json").write_text("[1, 2]")
    with pytest.raises(SaelabError, match="not a bench.json"):
        read_bench(tmp_path / "bench.json")
    (tmp_path / "bench.json").write_text("{not json")
    with pytest.raises(SaelabError, match="not a bench.json"):
        read_bench(tmp_path / "bench.json")
    with pytest.raises(SaelabError, match="no such file"):
        read_bench(tmp_path / "missing.json")
