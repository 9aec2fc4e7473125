"""``saelab serve``: the dashboard folder over HTTP on this machine, with the standard library.

Files are served as they are (``http.server``); nothing is generated on request. The default
host is the loopback address, so the site is not exposed to the network unless asked.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from saelab.analysis.dashboard.site import INDEX_FILENAME
from saelab.errors import SaelabError

log = logging.getLogger(__name__)


class _QuietHandler(SimpleHTTPRequestHandler):
    """Requests go to the debug log instead of stderr lines for every page."""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def server_url(server: ThreadingHTTPServer) -> str:
    """``http://host:port/`` of a bound server (the real port when 0 was asked for)."""
    host, port = server.server_address[:2]
    if ":" in str(host):  # IPv6 literals are bracketed in URLs
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def make_server(
    directory: str | Path, host: str = "127.0.0.1", port: int = 8000
) -> ThreadingHTTPServer:
    """A bound (not yet serving) HTTP server for the files of ``directory``; port 0 picks one."""
    directory = Path(directory)
    if not (directory / INDEX_FILENAME).is_file():
        raise SaelabError(
            f"{directory} has no {INDEX_FILENAME}; write a dashboard there first with "
            f"saelab dashboard SAE_DIR --out {directory}"
        )
    handler = functools.partial(_QuietHandler, directory=str(directory.resolve()))
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise SaelabError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
            "(0 picks a free one) or --host"
        ) from exc


def serve(
    directory: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    ready: Callable[[ThreadingHTTPServer], None] | None = None,
) -> None:
    """Serve ``directory`` until Ctrl-C or ``server.shutdown()``; then close the socket and return.

    ``ready(server)`` is called once the socket is bound (``server_url(server)`` is its address),
    e.g. to print it, or, from another thread, to keep the server for a later ``shutdown()``.
    """
    server = make_server(directory, host, port)
    try:
        log.info("serving %s at %s", directory, server_url(server))
        if ready is not None:
            ready(server)
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped serving %s", directory)
    finally:
        server.server_close()
