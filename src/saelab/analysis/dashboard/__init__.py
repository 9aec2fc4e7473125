"""HTML of feature statistics: a fragment per feature for notebooks, a static self-contained site,
and a server to browse it.

``render`` turns one feature's statistics into an HTML fragment (:func:`feature_fragment`, also
for Jupyter), ``pages`` builds the site's pages around it, ``site`` writes the folder, ``serve``
serves it on localhost.

Example:
    >>> from IPython.display import HTML
    >>> stats = FeatureStats.load("runs/demo/blocks.6.hook_resid_post-topk-x16-k32/features")
    >>> HTML(feature_fragment(stats, 3))                    # feature 3, inline styles
    >>> write_dashboard(stats, "runs/demo-dashboard", pages=range(100))
    >>> serve("runs/demo-dashboard", port=8000)             # blocks until Ctrl-C
"""

from saelab.analysis.dashboard.render import feature_fragment
from saelab.analysis.dashboard.serve import make_server, serve, server_url
from saelab.analysis.dashboard.site import (
    build_dashboard,
    choose_pages,
    parse_feature_selection,
    write_dashboard,
)

__all__ = [
    "build_dashboard",
    "choose_pages",
    "feature_fragment",
    "make_server",
    "parse_feature_selection",
    "serve",
    "server_url",
    "write_dashboard",
]
