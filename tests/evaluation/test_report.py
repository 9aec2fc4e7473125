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
from matplotlib.image import imread

from saelab.atomic import write_json
from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.evaluation.evaluate import METRIC_KEYS
from saelab.evaluation.plots import pareto_front
from saelab.evaluation.report import (
    INDEX_FILENAME,
    PARETO_PLOTS,
    find_sae_dirs,
    load_entries,
    write_report,
)
from saelab.saes import ReLUSAE, TopKSAE
from saelab.saes.storage import save_sae
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


def test_every_png_renders_and_is_not_blank(report_dir: Path):
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
