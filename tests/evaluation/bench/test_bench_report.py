"""``saelab report`` with seeds and a bench.json: seeds of one configuration become one point
with 95 % error bars, and every benchmark metric gets a figure against L0."""

from __future__ import annotations

import html

import pytest

from saelab.atomic import write_json
from saelab.config import SAEConfig
from saelab.evaluation.bench.intervals import mean_interval
from saelab.evaluation.bench.results import merge_results
from saelab.evaluation.evaluate import METRIC_KEYS
from saelab.evaluation.plots import ParetoPoint, pareto_figure
from saelab.evaluation.report import INDEX_FILENAME, bench_figures, write_report
from saelab.saes import TopKSAE
from saelab.saes.storage import save_sae

HOOK = "blocks.1.hook_resid_post"


def test_error_bars_are_drawn_as_given():
    points = [ParetoPoint("a", "topk", 10.0, 0.5, 1.0, 0.1), ParetoPoint("b", "relu", 20.0, 0.4)]
    fig = pareto_figure(points, ylabel="fvu")
    bars = [c for c in fig.axes[0].containers if c.has_yerr]
    assert len(bars) == 1
    (segments,) = [lc for lc in bars[0].lines[2] if lc.get_segments()[0][0][0] == 10.0]
    ys = sorted(y for seg in segments.get_segments() for _, y in seg)
    assert ys == pytest.approx([0.4, 0.6])  # 0.5 ± 0.1


@pytest.fixture
def seeded_run(tmp_path):
    """Two TopK configurations, three seeds each, with metrics.json and a bench.json."""
    result = {"suite": "absorption", "saes": {}}
    for k in (4, 8):
        for seed in range(3):
            folder = tmp_path / f"{HOOK}-topk-x2-k{k}-seed{seed}"
            save_sae(TopKSAE(SAEConfig(hook=HOOK, k=k, expansion=2), d_in=8, seed=seed), folder)
            metrics = dict.fromkeys(METRIC_KEYS, 0.5) | {
                "l0": k + seed,
                "fvu": 0.5 / k + seed / 100,
            }
            write_json(folder / "metrics.json", metrics)
            result["saes"][str(folder)] = {
                "metrics": {"absorption_rate": 0.1 * k + 0.01 * seed},
                "info": {"architecture": "topk", "seed": seed, "l0": float(k + seed)},
            }
    write_json(tmp_path / "bench.json", merge_results(None, result))
    return tmp_path


def test_report_groups_seeds_and_adds_the_benchmark_metrics(seeded_run, tmp_path, monkeypatch):
    import saelab.evaluation.report as report

    drawn = {}
    real = report.pareto_png

    def spy(points, **kwargs):
        drawn[kwargs["ylabel"]] = list(points)
        return real(points, **kwargs)

    monkeypatch.setattr(report, "pareto_png", spy)
    out = tmp_path / "report"
    write_report([seeded_run], out)
    fvu = sorted(drawn["FVU"], key=lambda p: p.x)
    assert len(fvu) == 2  # six SAEs, two configurations
    l0, l0_half = mean_interval([4, 5, 6])
    assert fvu[0].x == pytest.approx(l0) and fvu[0].x_err == pytest.approx(l0_half)
    assert fvu[0].y == pytest.approx(0.125 + 0.01) and fvu[0].y_err > 0
    bench = drawn["absorption_rate"]
    assert sorted(p.y for p in bench) == pytest.approx([0.41, 0.81])
    page = (out / INDEX_FILENAME).read_text()
    assert "Benchmarks (mean" in page and "absorption_rate" in page
    mean, half = mean_interval([0.8, 0.81, 0.82])
    assert html.escape(f"{mean:.4g} ± {half:.2g}") in page
    assert (out / "bench_000.png").stat().st_size > 1000


def test_bench_figures_use_group_means_and_intervals(seeded_run):
    import json

    doc = json.loads((seeded_run / "bench.json").read_text())
    notes: list[str] = []
    figures = bench_figures(doc, notes)
    assert [f.title for f in figures] == ["absorption_rate vs L0"] and not notes
