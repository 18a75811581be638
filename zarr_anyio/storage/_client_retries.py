"""Retries inside the client libraries: off wherever we make the client, named where we cannot.

The adaptive window learns from every throttle it sees, and from nothing it does not. obstore's
client retries 503s and 429s itself (``retry_config``: 10 retries by default), as do s3fs
(``retries``, 5) and botocore beneath it (``config_kwargs={"retries": …}``, 5 attempts), each
with its own backoff and below our window. Measured against a server admitting 300 requests/s:
it throttled 2,049 requests and the store saw 17, so the window stayed at 79 while more than
half of what reached the server was refused. So a client we make (``open_store``, ``from_url``)
has its own retries off and ours do the work (`RemoteStore`); a client the caller made is theirs
and left as it is, with one `ClientRetriesWarning` naming the setting to change.

fsspec's HTTP filesystem (aiohttp) retries nothing; gcsfs and adlfs retry inside their own
request code with no setting to turn it off, and are not judged here.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from typing import Any

__all__ = [
    "ClientRetriesWarning",
    "fsspec_options_without_retries",
    "obstore_options_without_retries",
    "turn_off_fsspec_retries",
    "warn_if_client_retries",
]

# obstore's RetryConfig with no retries: every 503 and 429 reaches the store's window.
OBSTORE_NO_RETRIES: dict[str, Any] = {"max_retries": 0}
# botocore's: one attempt, no retry of its own (its "legacy" default makes five). With the mode
# named, botocore does not add it to the dict: a filesystem's options (and so its fsspec token,
# and the equality of a store and its pickled copy) stay what they were when it was made.
BOTOCORE_NO_RETRIES: dict[str, Any] = {"total_max_attempts": 1, "mode": "standard"}


class ClientRetriesWarning(UserWarning):
    """A store was given a client that retries failed requests itself, so the store's adaptive
    window does not see the throttles it retries (and `stats()` does not count them)."""


# The clients warned of, by identity (obstore's stores compare by value and do not hash).
_warned: dict[int, weakref.ref[Any]] = {}
_warned_lock = threading.Lock()


def obstore_options_without_retries(options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` for obstore's ``from_url`` with the client's retries off, unless the
    caller chose a ``retry_config``."""
    return {"retry_config": dict(OBSTORE_NO_RETRIES), **(options or {})}


def _is_s3(protocol: object) -> bool:
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol or ())  # type: ignore[arg-type]
    return any(p in ("s3", "s3a") for p in protocols)


def fsspec_options_without_retries(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """``storage_options`` for fsspec's ``url_to_fs`` with botocore's retries off for an S3
    URL, unless the caller configured them."""
    if not _is_s3(url.partition("://")[0].lower()):
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", dict(BOTOCORE_NO_RETRIES))  # a copy: botocore may change it
    return {**options, "config_kwargs": config}


def turn_off_fsspec_retries(fs: Any) -> None:
    """s3fs's own retry loop off, on a filesystem we made (``retries`` is per instance)."""
    if _is_s3(getattr(fs, "protocol", None)) and isinstance(getattr(fs, "retries", None), int):
        fs.retries = 1


def _retrying_setting(client: Any) -> str | None:
    """The setting under which ``client`` retries requests itself, or ``None``."""
    module = type(client).__module__
    if module.startswith("obstore"):
        if not hasattr(client, "retry_config"):
            return None  # MemoryStore, LocalStore: no network, no retries
        config = client.retry_config
        if config is not None and config.get("max_retries") == 0:
            return None
        return "retry_config={'max_retries': 0} (obstore retries 10 times by default)"
    if not _is_s3(getattr(client, "protocol", None)):
        return None
    retries = getattr(client, "retries", None)
    if isinstance(retries, int) and retries > 1:
        return f"fs.retries = 1 (s3fs's own retries, now {retries})"
    config = getattr(client, "config_kwargs", None) or {}
    botocore = config.get("retries") if isinstance(config, dict) else None
    if not isinstance(botocore, dict) or not (
        botocore.get("total_max_attempts") == 1 or botocore.get("max_attempts") == 0
    ):
        return "config_kwargs={'retries': {'total_max_attempts': 1}} (botocore's retries)"
    return None


def warn_if_client_retries(client: Any, store: str, *, stacklevel: int = 3) -> None:
    """Warn once per client if it retries requests itself, naming the setting that stops it."""
    setting = _retrying_setting(client)
    if setting is None:
        return
    key = id(client)
    with _warned_lock:
        known = _warned.get(key)
        if known is not None and known() is client:
            return
        # A client that cannot be weakly referenced is warned of each time.
        with contextlib.suppress(TypeError):
            _warned[key] = weakref.ref(client, lambda _: _warned.pop(key, None))
    warnings.warn(
        f"{store} was given a client that retries throttled and failed requests itself, out of "
        "sight of the store's adaptive window and its stats(); the store retries them already. "
        f"Make the client with {setting}, or let open_store/from_url make it.",
        ClientRetriesWarning,
        stacklevel=stacklevel,
    )
