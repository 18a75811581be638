"""``python -m zarr_anyio.cli``: the ``zarr-anyio`` command."""

import sys

from .main import main

sys.exit(main())
