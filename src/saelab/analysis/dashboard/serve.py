"""``saelab serve``: the dashboard folder over HTTP on this machine, with the standard library.

Files are served as they are (``http.server``); nothing is generated on request, and nothing
outside the folder is served (symlinks that lead out of it included). The default host is the
loopback address, so the site is not exposed to the network unless asked.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from saelab.analysis.dashboard.site import INDEX_FILENAME
from saelab.errors import SaelabError

log = logging.getLogger(__name__)


class _QuietHandler(SimpleHTTPRequestHandler):
    """The files of one folder and nothing else; requests go to the debug log instead of stderr
    lines for every page.

    ``http.server`` already drops ``..`` (also percent-encoded) and maps absolute paths into the
    folder, but it follows symlinks: a link inside the folder to a file outside would serve that
    file. Here every path is resolved, links included, and one that ends up outside the folder
    is answered 404, as if it were not there.
    """

    def send_head(self):  # type: ignore[no-untyped-def]  # do_GET and do_HEAD both come here
        if not self._inside_folder(self.translate_path(self.path)):
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        return super().send_head()

    def _inside_folder(self, local: str) -> bool:
        root = Path(self.directory).resolve()
        try:
            target = Path(local).resolve()
        except (OSError, RuntimeError):  # a link loop, a name the OS refuses
            return False
        return target == root or target.is_relative_to(root)

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
