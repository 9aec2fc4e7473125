"""A static, self-contained HTML dashboard of feature statistics, and a server to browse it.

``render`` turns statistics into HTML strings (``feature_fragment`` also for notebooks), ``site``
writes the folder, ``serve`` serves it on localhost.
"""

from saelab.analysis.dashboard.render import feature_fragment
from saelab.analysis.dashboard.serve import make_server, serve, server_url
from saelab.analysis.dashboard.site import choose_pages, parse_feature_selection, write_dashboard

__all__ = [
    "choose_pages",
    "feature_fragment",
    "make_server",
    "parse_feature_selection",
    "serve",
    "server_url",
    "write_dashboard",
]
