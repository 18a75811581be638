"""What the tests share: loopback servers, test doubles, stores filled for a test, the command
line run as a user runs it. No test module imports another; they import from here.

- `servers`: an HTTP server with Range and injected faults, moto's S3 server, a counting proxy;
- `remote`: stores over the loopback HTTP server, filled with objects;
- `stores`: stores filled with keys;
- `doubles`: a stand-in for a blocking call that counts how many run at once;
- `arrays`: a counting store and the event-loop backends for the array API's tests;
- `command_line`: running ``zarr-anyio`` in a subprocess, hierarchies to run it on;
- `zipdisk`: a small or slow disk under a zip file.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TOP"]

TOP = Path(__file__).resolve().parents[2]
"""The top of the checkout."""
