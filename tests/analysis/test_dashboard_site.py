"""Writing the dashboard folder: its files, page selection, and never half a site."""

from __future__ import annotations

import json
import re

import pytest
import torch
from dashboard_fakes import FakeStats

from saelab.analysis.dashboard.site import (
    MANIFEST_FILENAME,
    choose_pages,
    parse_feature_selection,
    write_dashboard,
)
from saelab.errors import SaelabError


def _hrefs(path) -> list[str]:
    """Link targets of a page (``<a href>``)."""
    return re.findall(r'<a [^>]*href="([^"]+)"', path.read_text())


def test_site_has_an_index_a_manifest_and_one_page_per_chosen_feature(tmp_path):
    stats = FakeStats(n=7, dead=(3,))
    out = tmp_path / "site"
    index = write_dashboard(stats, out, pages=[1, 3, 5], progress=False)
    assert index == out / "index.html"
    assert sorted(p.name for p in (out / "features").iterdir()) == ["1.html", "3.html", "5.html"]
    assert re.findall(r'<tr data-row="\d+" data-id="(\d+)"', index.read_text()) == [
        str(i) for i in range(7)
    ]
    manifest = json.loads((out / MANIFEST_FILENAME).read_text())
    assert manifest["n_features"] == 7 and manifest["pages"] == 3
    # prev/next walk the pages that exist, in order; the dead feature's page says so.
    assert _hrefs(out / "features/1.html") == ["../index.html", "3.html"]
    assert _hrefs(out / "features/3.html") == ["../index.html", "1.html", "5.html"]
    assert _hrefs(out / "features/5.html") == ["../index.html", "3.html"]
    assert "never fired" in (out / "features/3.html").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["site"]  # no temp folders left


class Exploding(FakeStats):
    def top_examples(self, i, n=None):
        if i == 4:
            raise RuntimeError("disk on fire")
        return super().top_examples(i, n)


def test_an_error_leaves_no_site_and_an_old_site_untouched(tmp_path):
    out = tmp_path / "site"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_dashboard(Exploding(n=6), out, progress=False)
    assert list(tmp_path.iterdir()) == []

    write_dashboard(FakeStats(n=2), out, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_dashboard(Exploding(n=6), out, progress=False)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["site"]


def test_an_old_dashboard_is_replaced_but_other_folders_are_refused(tmp_path):
    out = tmp_path / "site"
    write_dashboard(FakeStats(n=6), out, progress=False)
    write_dashboard(FakeStats(n=2), out, progress=False)
    assert sorted(p.name for p in (out / "features").iterdir()) == ["0.html", "1.html"]
    assert [p.name for p in tmp_path.iterdir()] == ["site"]

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(SaelabError, match="not a saelab dashboard") as err:
        write_dashboard(FakeStats(n=2), precious, progress=False)
    assert "\n" not in str(err.value)
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaelabError, match="is a file"):
        write_dashboard(FakeStats(n=2), tmp_path / "file", progress=False)


def test_feature_selection_ranges():
    assert parse_feature_selection("0-2, 4,2", range(10)) == [0, 1, 2, 4]
    assert parse_feature_selection("9", range(10)) == [9]
    for bad in ("0-10", "5-3", "a", "1-x", "", "-1"):
        with pytest.raises(SaelabError) as err:
            parse_feature_selection(bad, range(10))
        assert "\n" not in str(err.value)


class SliceStats(FakeStats):
    """Statistics of SAE features 100..105 only: row i is feature 100 + i."""

    @property
    def feature_ids(self):
        return torch.arange(100, 100 + self.n)


def test_pages_and_links_use_sae_feature_ids_of_a_slice(tmp_path):
    stats = SliceStats(n=6, dead=())
    pages = choose_pages(stats, features="101-102,104")
    assert pages == [101, 102, 104]
    with pytest.raises(SaelabError, match="100-105"):
        choose_pages(stats, features="0-2")
    out = tmp_path / "site"
    write_dashboard(stats, out, pages=pages, progress=False)
    assert sorted(p.name for p in (out / "features").iterdir()) == [
        "101.html",
        "102.html",
        "104.html",
    ]
    assert _hrefs(out / "features/102.html") == ["../index.html", "101.html", "104.html"]
    assert "Feature 104" in (out / "features/104.html").read_text()
    index = (out / "index.html").read_text()
    assert re.findall(r'data-row="(\d+)" data-id="(\d+)"', index) == [
        (str(i), str(100 + i)) for i in range(6)
    ]
    assert [h for h in _hrefs(out / "index.html")] == [f"features/{f}.html" for f in pages]


def test_top_pages_are_the_densest_live_features():
    stats = FakeStats(n=6, dead=(5, 4))  # density grows with the id; the two densest are dead
    assert choose_pages(stats, top=2) == [2, 3]
    assert choose_pages(stats, top=100) == [0, 1, 2, 3]
    assert choose_pages(stats) == list(range(6))
    assert choose_pages(stats, features="1-2") == [1, 2]
    with pytest.raises(SaelabError, match="not both"):
        choose_pages(stats, features="1", top=1)
