"""One error out of a task group, as a single call would have raised it.

A bulk call runs its items in a task group; anyio raises what fails there as an
``ExceptionGroup``, which no caller of a store expects (zarr and its users catch
``FileNotFoundError``, ``ValueError`` and the like). Every public call that runs a task group goes
through `single_error`.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager

import anyio

__all__ = ["single_error"]


@contextmanager
def single_error() -> Generator[None, None, None]:
    """Raise a task group's errors as one error, as a single call would have raised it.

    zarr and its users catch ``FileNotFoundError``, ``ValueError`` and the like, not an
    ``ExceptionGroup``. When several workers fail at once, the first failure is raised as itself
    and the others are named in its notes. A cancellation that arrived beside a real error gives
    way to the error, as trio itself does.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        errors = _leaves(group)
        cancelled = anyio.get_cancelled_exc_class()
        real = [error for error in errors if not isinstance(error, cancelled)]
        first, others = (real[0], real[1:]) if real else (errors[0], [])
        for other in others:
            first.add_note(f"(another operation of the same call failed too: {other!r})")
        raise first from first.__cause__


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found.extend(_leaves(error))
        else:
            found.append(error)
    return found
