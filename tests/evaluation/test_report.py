"""``saelab report``: PNGs that render, a self-contained escaped HTML page, and the Pareto front."""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb
from matplotlib.image import imread

from saelab.atomic import write_json
from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.evaluation.evaluate import METRIC_KEYS
from saelab.evaluation.plots import (
    CURVE_METRICS,
    ParetoPoint,
    density_histogram_figure,
    pareto_figure,
    pareto_front,
    training_curves_figure,
)
from saelab.evaluation.report import (
    INDEX_FILENAME,
    PARETO_PLOTS,
    load_entries,
    write_report,
)
from saelab.saes import ReLUSAE, TopKSAE
from saelab.saes.storage import SPARSITY_FILENAME, find_sae_dirs, read_weights, save_sae
from saelab_cli import run_saelab

HOOK = "blocks.1.hook_resid_post"
EVIL = "relu-<script>alert(1)<script>"
"""A folder name that must reach the page escaped (a `/` would split it into folders)."""
FOLDERS = ("topk-k4", "topk-k8", EVIL)


def _metrics(l0: float, fvu: float) -> dict[str, float]:
    metrics = {key: 0.5 for key in METRIC_KEYS}
    metrics.update(l0=l0, fvu=fvu, delta_ce=fvu / 2, ce_loss_recovered=1 - fvu)
    return metrics


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with three SAEs (two architectures), metrics, densities and a train log."""
    run = tmp_path_factory.mktemp("run")
    saes = [
        TopKSAE(SAEConfig(hook=HOOK, k=4, expansion=2), d_in=16, seed=0),
        TopKSAE(SAEConfig(hook=HOOK, k=8, expansion=2), d_in=16, seed=1),
        ReLUSAE(SAEConfig(hook=HOOK, architecture="relu", expansion=2), d_in=16, seed=2),
    ]
    gen = torch.Generator().manual_seed(0)
    log_lines = []
    for i, (folder, sae) in enumerate(zip(FOLDERS, saes, strict=True)):
        density_F = -4 * torch.rand(sae.d_sae, generator=gen)
        density_F[:3] = -float("inf")  # dead features
        save_sae(sae, run / folder, log10_density=density_F)
        write_json(run / folder / "metrics.json", _metrics(l0=4.0 * (i + 1), fvu=0.3 / (i + 1)))
        for step in range(1, 6):
            log_lines.append(
                {
                    "step": step,
                    "tokens": 100 * step,
                    "sae": folder,
                    "mse": 1.0 / step,
                    "l0": 10.0 + i + step,
                    "fvu": 0.5 / step,
                    "frac_dead": 0.01 * step,
                    "lr": 1e-3,
                }
            )
    log_lines.insert(3, {"event": "resample", "step": 2, "tokens": 200, "sae": FOLDERS[0]})
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_lines))
    return run


@pytest.fixture(scope="module")
def report_dir(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_report([run_dir], out)
    return out


def _pixels_at(pixels: np.ndarray, ax, xy_data: tuple[float, float]) -> np.ndarray:
    """The PNG's RGB pixels in a 5×5 square around where ``ax`` puts ``xy_data``."""
    x, y = ax.transData.transform(xy_data)
    col, row = round(float(x)), round(pixels.shape[0] - float(y))
    return pixels[row - 2 : row + 3, col - 2 : col + 3, :3].reshape(-1, 3)


def _share_of(colour: str, patch: np.ndarray) -> float:
    """Share of the pixels within 0.1 (per channel) of ``colour``."""
    return float((np.abs(patch - np.array(to_rgb(colour))).max(axis=1) < 0.1).mean())


def test_every_png_renders_and_is_not_blank(report_dir: Path, run_dir: Path):
    """Every PNG is there and not blank, and shows the data: each SAE's marker is drawn where its
    (L0, metric) falls, each training curve passes through its log records, each histogram counts
    the SAE's densities. The expected positions come from the plotting functions' figures built on
    the test's own data; the pixels are read from the report's PNG files."""
    pngs = sorted(report_dir.glob("*.png"))
    names = {p.name for p in pngs}
    assert {filename for *_, filename in PARETO_PLOTS} <= names
    assert "training_curves.png" in names
    assert len([n for n in names if n.startswith("density_")]) == len(FOLDERS)
    for png in pngs:
        pixels = imread(png)
        height, width = pixels.shape[:2]
        assert width > 200 and height > 150, png.name
        assert float(np.std(pixels[..., :3])) > 0, f"{png.name} is blank"

    metrics = {f: json.loads((run_dir / f / "metrics.json").read_text()) for f in FOLDERS}
    archs = {f: json.loads((run_dir / f / "cfg.json").read_text())["architecture"] for f in FOLDERS}
    for key, ylabel, maximize, filename in PARETO_PLOTS:
        points = [ParetoPoint(f, archs[f], metrics[f]["l0"], metrics[f][key]) for f in FOLDERS]
        fig = pareto_figure(points, ylabel=ylabel, maximize_y=maximize)
        FigureCanvasAgg(fig).draw()
        ax = fig.axes[0]
        drawn = sorted(tuple(xy) for c in ax.collections for xy in c.get_offsets().tolist())
        assert drawn == sorted((p.x, p.y) for p in points)
        colours = {c.get_label(): to_hex(c.get_facecolor()[0]) for c in ax.collections}
        pixels = imread(report_dir / filename)
        assert pixels.shape[:2] == (fig.bbox.height, fig.bbox.width)
        for point in points:
            marker = _pixels_at(pixels, ax, (point.x, point.y))
            assert _share_of(colours[point.architecture], marker) > 0.3, (filename, point)
        # Control: halfway between two markers (on the front's dashed line) no marker colour.
        (x0, y0), (x1, y1) = drawn[0], drawn[-1]
        between = _pixels_at(pixels, ax, ((x0 + x1) / 2, (y0 + y1) / 2))
        assert all(_share_of(c, between) == 0 for c in colours.values()), filename

    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    order = [path.name for path in find_sae_dirs([run_dir])]  # the report's order: colours, files
    curves = {f: [r for r in records if r.get("sae") == f and "event" not in r] for f in order}
    fig = training_curves_figure(curves)
    FigureCanvasAgg(fig).draw()
    pixels = imread(report_dir / "training_curves.png")
    for ax, metric in zip(fig.axes, CURVE_METRICS, strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for folder, rows in curves.items():
            expected = [[r["tokens"] for r in rows], [r[metric] for r in rows]]
            assert [list(v) for v in lines[folder].get_data(orig=True)] == expected
            for row in rows:
                xy = (row["tokens"], row[metric])
                # Where curves coincide, the one drawn last is the one seen.
                on_top = [f for f in order if xy in {(r["tokens"], r[metric]) for r in curves[f]}]
                near = _pixels_at(pixels, ax, xy)
                assert _share_of(lines[on_top[-1]].get_color(), near) > 0, (metric, folder, row)

    for i, folder in enumerate(order):
        density_F = read_weights(run_dir / folder / SPARSITY_FILENAME)["sparsity"]
        fig = density_histogram_figure(folder, density_F)
        FigureCanvasAgg(fig).draw()
        ax = fig.axes[0]
        alive = density_F[torch.isfinite(density_F)].double().numpy()
        counts, _ = np.histogram(alive, bins=50)
        bars = [patch.get_height() for patch in ax.patches]
        assert bars == counts.tolist() and sum(bars) == len(alive) == len(density_F) - 3
        tallest = ax.patches[int(np.argmax(bars))]
        centre = (tallest.get_x() + tallest.get_width() / 2, tallest.get_height() / 2)
        pixels = imread(report_dir / f"density_{i:03d}.png")
        assert _share_of(to_hex(tallest.get_facecolor()), _pixels_at(pixels, ax, centre)) > 0.5


def test_html_embeds_every_png_and_lists_every_sae_escaped(report_dir: Path):
    page = (report_dir / INDEX_FILENAME).read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == len(list(report_dir.glob("*.png")))
    assert not re.search(r'src="(?!data:)', page)  # nothing points outside the page
    for folder in FOLDERS[:2]:
        assert f"<td>{folder}</td>" in page
    assert "<script" not in page
    assert "relu-&lt;script&gt;alert(1)&lt;script&gt;" in page
    assert page.count("<tr>") == 1 + len(FOLDERS)  # header + one row per SAE


def test_sae_without_metrics_is_left_out_of_pareto_with_a_note(run_dir: Path, tmp_path: Path):
    run = tmp_path / "run"
    for folder in FOLDERS:
        save_sae(TopKSAE(SAEConfig(hook=HOOK, k=4, expansion=2), d_in=16), run / folder)
    write_json(run / FOLDERS[0] / "metrics.json", _metrics(l0=4.0, fvu=0.2))
    index = write_report([run], tmp_path / "out")
    page = index.read_text()
    assert "no metrics.json" in page and "no sparsity.safetensors" in page
    assert len(re.findall("data:image/png", page)) == len(PARETO_PLOTS)  # one point each
    assert page.count("<tr>") == 1 + len(FOLDERS)


def test_a_single_sae_folder_is_accepted(run_dir: Path):
    # Paths come back as spelled (the fixture's folder is already resolved).
    assert find_sae_dirs([run_dir / FOLDERS[0]]) == [(run_dir / FOLDERS[0]).resolve()]
    assert len(find_sae_dirs([run_dir])) == len(FOLDERS)


def test_train_log_curves_skip_events_and_belong_to_their_sae(run_dir: Path):
    notes: list[str] = []
    entries = load_entries(find_sae_dirs([run_dir]), notes)
    assert notes == []  # every file is there
    for entry in entries:
        assert [r["step"] for r in entry.curve] == [1, 2, 3, 4, 5]
        assert {r["sae"] for r in entry.curve} == {entry.path.name}
        assert all("event" not in r for r in entry.curve)


def test_no_sae_folders_is_a_one_line_error(tmp_path: Path):
    with pytest.raises(SaelabError, match="no SAE folders") as info:
        write_report([tmp_path], tmp_path / "out")
    assert "\n" not in str(info.value)


def _naive_front(xy, maximize_y):
    """Points that no other point dominates (the definition, checked against all pairs)."""
    sign = -1 if maximize_y else 1

    def beats(a, b):
        ax, ay, bx, by = a[0], sign * a[1], b[0], sign * b[1]
        return ax <= bx and ay <= by and (ax < bx or ay < by)

    return {i for i, p in enumerate(xy) if not any(beats(q, p) for q in xy)}


def test_pareto_front_on_hand_made_points():
    xy = [(1.0, 0.9), (2.0, 0.5), (3.0, 0.6), (4.0, 0.1), (2.0, 0.7), (5.0, 0.1)]
    assert pareto_front(xy) == [0, 1, 3]
    # maximising y: (1, 0.9) has both the lowest x and the highest y, so it beats every point
    assert pareto_front(xy, maximize_y=True) == [0]
    assert pareto_front([(1.0, float("nan")), (2.0, 1.0)]) == [1]
    assert pareto_front([]) == []


@pytest.mark.parametrize("maximize_y", [False, True])
def test_pareto_front_matches_the_definition_on_random_points(maximize_y: bool):
    rng = random.Random(0)
    for _ in range(50):
        xy = [(rng.randint(0, 6) * 1.0, rng.randint(0, 6) * 1.0) for _ in range(rng.randint(1, 9))]
        front = pareto_front(xy, maximize_y=maximize_y)
        assert set(front) == _naive_front(xy, maximize_y)
        assert all(xy[a][0] <= xy[b][0] for a, b in itertools.pairwise(front))


def _saelab(*args: str) -> subprocess.CompletedProcess:
    return run_saelab(*args, env={"TRANSFORMERS_OFFLINE": "1"}, timeout=120)


@pytest.mark.e2e  # the real `python -m saelab` process: a few seconds of imports
def test_cli_report_writes_the_page_and_bad_input_is_one_line(run_dir: Path, tmp_path: Path):
    good = _saelab("report", str(run_dir), "--out", str(tmp_path / "out"))
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "out" / INDEX_FILENAME).is_file()
    (tmp_path / "empty").mkdir()
    bad = _saelab("report", str(tmp_path / "empty"), "--out", str(tmp_path / "out2"))
    assert bad.returncode == 2
    lines = bad.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("saelab: error:"), bad.stderr
    assert not (tmp_path / "out2").exists()
