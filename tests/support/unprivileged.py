"""Running a check in a child process that file permissions bind, on folders set up for it.

Root ignores file modes, so as root the child runs without the capabilities that bypass them
(CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_LINUX_IMMUTABLE: dropped from its
bounding set before it starts, so the new program cannot have them), and `give_away` hands the
files it must be refused to another user (`OTHER`, nobody): for the kernel the child is then a
user like any other, owning none of them. (Switching to nobody outright would need the Python
to be reachable by nobody, and one installed under /root is not.) Not as root, the child runs as
this user, and `restrict` takes this user's own write permission away as well.
"""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
from pathlib import Path

__all__ = ["OTHER", "give_away", "restrict", "run"]

OTHER = 65534
TOP = Path(__file__).resolve().parents[2]
_PR_CAPBSET_DROP = 24
_BYPASSING = (0, 1, 2, 3, 9)  # CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, LINUX_IMMUTABLE


def _drop_bypassing_capabilities() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in _BYPASSING:
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def give_away(*paths: Path) -> None:
    """Make ``paths`` another user's (as root; not as root they stay this user's)."""
    if os.geteuid() == 0:
        for path in paths:
            os.chown(path, OTHER, OTHER, follow_symlinks=False)


def restrict(path: Path, mode: int) -> None:
    """Set ``path``'s mode; not as root (the child owns it), without its owner's write bit."""
    path.chmod(mode if os.geteuid() == 0 else mode & ~stat.S_IWUSR)


def run(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with ``args`` in this Python, bound by file permissions; it must exit 0."""
    # preexec_fn runs between fork and exec: fine here, where no other thread takes locks the
    # child could need (the call is a prctl).
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(TOP), "PYTHONDONTWRITEBYTECODE": "1"},
        cwd="/",
        timeout=timeout,
        check=False,
        preexec_fn=_drop_bypassing_capabilities if os.geteuid() == 0 else None,
    )
    assert done.returncode == 0, done.stderr
    return done
