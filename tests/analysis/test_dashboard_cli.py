"""``saelab dashboard`` and ``saelab serve`` as subprocesses, on a saved tiny SAE."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import urllib.request

import pytest
from feature_fixtures import HOOK

from saelab.analysis.dashboard.serve import make_server
from saelab.analysis.dashboard.site import build_dashboard
from saelab.analysis.features import META_FILENAME
from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes import TopKSAE
from saelab.saes.storage import save_sae
from saelab_cli import run_saelab
from tiny_models import D_MODEL

pytestmark = pytest.mark.e2e

D_SAE = 32


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, words_file):
    """A saved SAE of the tiny Llama, and ``saelab dashboard`` run on it once (statistics
    computed on the way)."""
    root = tmp_path_factory.mktemp("dashboard-cli")
    meta = {"model_name": str(tiny_model_dir), "dataset_path": str(words_file)}
    sae = TopKSAE(SAEConfig(hook=HOOK, k=4, width=D_SAE), d_in=D_MODEL)
    sae_dir = save_sae(sae, root / "sae", metadata=meta)
    done = run_saelab(
        "dashboard", sae_dir, "--out", root / "site", "--tokens", "256", "--context", "32"
    )
    assert done.returncode == 0, done.stderr
    return root, sae_dir, done


def test_dashboard_computes_statistics_once_and_writes_every_page(built):
    root, sae_dir, done = built
    assert (sae_dir / "features" / META_FILENAME).is_file()  # saved for the next run
    pages = sorted(int(p.stem) for p in (root / "site" / "features").glob("*.html"))
    assert pages == list(range(D_SAE))
    assert str(root / "site" / "index.html") in done.stdout
    assert f"saelab serve {root / 'site'}" in done.stdout


def test_a_second_dashboard_reuses_the_statistics_and_says_flags_are_ignored(built, caplog):
    root, sae_dir, _ = built
    before = (sae_dir / "features" / META_FILENAME).stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        index, stats = build_dashboard(sae_dir, root / "top", top=3, tokens=9, progress=False)
    assert (sae_dir / "features" / META_FILENAME).stat().st_mtime_ns == before
    assert stats.n_tokens > 9 and "tokens ignored" in caplog.text and "--recompute" in caplog.text
    assert len(list((root / "top" / "features").glob("*.html"))) == 3
    assert len(re.findall(r"<tr data-row=", index.read_text())) == D_SAE  # the index lists all


def test_missing_or_corrupt_statistics_are_one_line_errors(built, tmp_path):
    root, sae_dir, _ = built
    with pytest.raises(SaelabError, match="saelab features") as err:
        build_dashboard(sae_dir, tmp_path / "x", stats_dir=tmp_path / "none", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for path in (sae_dir / "features").iterdir():
        (corrupt / path.name).write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(SaelabError, match="corrupt") as err:
        build_dashboard(sae_dir, tmp_path / "y", stats_dir=corrupt, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "y").exists()
    with pytest.raises(SaelabError, match="not an SAE folder"):
        build_dashboard(tmp_path, tmp_path / "y", progress=False)


def test_serve_prints_its_url_serves_the_site_and_stops_cleanly_on_ctrl_c(built):
    root, _, _ = built
    server = subprocess.Popen(
        [sys.executable, "-m", "saelab", "serve", str(root / "site"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line + server.stderr.read() if server.poll() is not None else line
        with urllib.request.urlopen(url[0], timeout=10) as response:
            assert response.status == 200
            assert b'id="features"' in response.read()
        with urllib.request.urlopen(f"{url[0]}features/3.html", timeout=10) as response:
            assert b"Feature 3" in response.read()
        manifest = json.loads(urllib.request.urlopen(f"{url[0]}dashboard.json", timeout=10).read())
        assert manifest["n_features"] == D_SAE
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=20)
    assert server.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


def test_serve_without_a_dashboard_is_a_one_line_error(tmp_path):
    with pytest.raises(SaelabError, match="saelab dashboard") as err:
        make_server(tmp_path, port=0)
    assert "\n" not in str(err.value)
