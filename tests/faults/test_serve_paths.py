"""``saelab serve`` serves its folder and nothing else: encoded ``..``, absolute paths,
backslashes and symlinks that lead outside get no content from outside; it listens on
127.0.0.1 unless told otherwise.

Requests go over a real socket to a server on a free port, with paths sent byte for byte as
written here (no client-side normalisation).
"""

from __future__ import annotations

import http.client
import importlib
import inspect
import os
import threading
from pathlib import Path

import pytest

from saelab.analysis.dashboard.config import ServeConfig
from saelab.analysis.dashboard.serve import make_server, serve, server_url
from saelab.cli import build_parser, main

serve_module = importlib.import_module("saelab.analysis.dashboard.serve")
"""The module (the package's ``serve`` attribute is the function of that name)."""

SECRET = "TOP-SECRET-OUTSIDE-THE-SITE"
PAGE = "<html><body>the dashboard index</body></html>"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``root/site`` (the served folder) beside ``root/secret.txt``, with links leading out and
    links staying in."""
    root = tmp_path_factory.mktemp("serve")
    (root / "secret.txt").write_text(SECRET)
    (root / "private").mkdir()
    (root / "private" / "key.txt").write_text(SECRET)
    site = root / "site"
    (site / "features").mkdir(parents=True)
    (site / "index.html").write_text(PAGE)
    (site / "features" / "3.html").write_text("feature 3")
    (site / "leak.txt").symlink_to(root / "secret.txt")  # a file outside
    (site / "leakdir").symlink_to(root / "private")  # a folder outside
    (site / "features" / "up.txt").symlink_to("../../secret.txt")  # relative, outside
    (site / "etc").symlink_to("/etc")
    (site / "alias.html").symlink_to(site / "index.html")  # inside: fine
    (site / "inner").symlink_to("features")  # inside: fine
    return site


@pytest.fixture(scope="module")
def server(site):
    server = make_server(site, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def fetch(server, path: str, method: str = "GET") -> tuple[int, str]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", "localhost")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def outside_paths(site: Path) -> list[str]:
    secret = str(site.parent / "secret.txt")
    return [
        "/../secret.txt",
        "/../../../../../../etc/passwd",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/..%2fsecret.txt",
        "/..%2Fsecret.txt",
        "/%2e%2e%2fsecret.txt",
        "/.%2e/secret.txt",
        "/%252e%252e/secret.txt",  # double encoding
        "/%252e%252e%252fsecret.txt",
        "/features/../../secret.txt",
        "/features/%2e%2e/%2e%2e/secret.txt",
        "//etc/passwd",
        "/%2Fetc/passwd",
        "/%2fetc%2fpasswd",
        "//" + secret.lstrip("/"),
        secret,
        "/%2F" + secret.lstrip("/"),
        "/..\\secret.txt",
        "/..%5csecret.txt",
        "/%5c..%5c..%5csecret.txt",
        "/features\\..\\..\\secret.txt",
        "/leak.txt",  # symlinks inside that point outside
        "/leakdir/key.txt",
        "/leakdir/",
        "/features/up.txt",
        "/etc/passwd",
        "/etc/",
        "/inner/up.txt",
        "/../site/../secret.txt",
        "/secret.txt",
    ]


def test_paths_outside_the_folder_get_no_content_from_outside(site, server):
    passwd = Path("/etc/passwd").read_text() if Path("/etc/passwd").is_file() else ""
    first_line = passwd.splitlines()[0] if passwd else None
    for path in outside_paths(site):
        for method in ("GET", "HEAD"):
            status, body = fetch(server, path, method)
            assert status in (400, 403, 404), (path, method, status, body[:200])
            assert SECRET not in body, path
            assert first_line is None or first_line not in body, path


def test_links_out_are_not_listed_into_either(site, server):
    # The folder listing may name the link, but following it must not serve what it points at.
    status, body = fetch(server, "/leakdir/")
    assert status == 404 and "key.txt" not in body


def test_normal_files_and_links_inside_still_serve(site, server):
    for path, expected in (
        ("/", PAGE),
        ("/index.html", PAGE),
        ("/alias.html", PAGE),
        ("/features/3.html", "feature 3"),
        ("/inner/3.html", "feature 3"),
        ("/features/../index.html", PAGE),
        ("/%69ndex.html", PAGE),  # an encoded letter
        ("/index.html?x=1#y", PAGE),
    ):
        status, body = fetch(server, path)
        assert (status, body) == (200, expected), path
    status, body = fetch(server, "/features/")  # a folder without index: its listing
    assert status == 200 and "3.html" in body and SECRET not in body
    assert fetch(server, "/no-such-page.html")[0] == 404


def test_the_served_folder_may_itself_be_a_link(site, tmp_path):
    link = tmp_path / "link-to-site"
    link.symlink_to(site)
    server = make_server(link, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert fetch(server, "/index.html") == (200, PAGE)
        assert fetch(server, "/leak.txt")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_the_server_listens_on_loopback_by_default(site):
    server = make_server(site, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert server_url(server).startswith("http://127.0.0.1:")
    finally:
        server.server_close()
    for function in (make_server, serve):
        assert inspect.signature(function).parameters["host"].default == "127.0.0.1"
    assert ServeConfig().host == "127.0.0.1"


def test_the_cli_listens_on_loopback_unless_host_is_given(site, monkeypatch):
    assert build_parser().parse_args(["serve", str(site)]).host == "127.0.0.1"
    assert build_parser().parse_args(["serve", str(site), "--host", "0.0.0.0"]).host == "0.0.0.0"
    calls = []

    def fake_serve(directory, host, port, ready=None):
        calls.append((str(directory), host, port))

    monkeypatch.setattr(serve_module, "serve", fake_serve)
    assert main(["-q", "serve", str(site)]) == 0
    assert main(["-q", "serve", str(site), "--host", "::1", "--port", "0"]) == 0
    assert calls == [(str(site), "127.0.0.1", 8000), (str(site), "::1", 0)]


def test_a_link_loop_is_a_404_not_a_crash(site, server):
    loop = site / "loop"
    if not loop.is_symlink():
        os.symlink("loop", loop)
    assert fetch(server, "/loop")[0] == 404
    assert fetch(server, "/loop/x")[0] == 404
    assert fetch(server, "/index.html") == (200, PAGE)  # the server still answers
