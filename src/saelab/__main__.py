"""``python -m saelab`` is the ``saelab`` command."""

import sys

from saelab.cli import main

sys.exit(main())
