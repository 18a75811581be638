"""The ``zarr-anyio`` command: ``copy``, ``ls``, ``info`` and ``demo`` over any two stores.

Only `main` is an interface (the console script and ``python -m zarr_anyio.cli`` call it); the
modules beside it are the command's own: `main` (the argument parser and exit codes), `commands`
(what each command does), `urls` (stores from command-line URLs and options), `signals` (a clean
stop on SIGINT/SIGTERM), `copy`, `info` and `progress`.
"""

from .main import main

__all__ = ["main"]
