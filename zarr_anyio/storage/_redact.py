"""Secrets in URLs, kept out of everything we print or raise.

A URL can carry credentials: a user and password (``https://alice:SECRET@host/…``; a token is
often passed as the user name alone) or a signed query (S3's ``X-Amz-Signature``, Azure's SAS
``sig=``, a ``token=``). A store's ``str()``, an error message and the command's output end up in
logs, tickets and terminals, so every one of them shows such a URL with the whole user part and
every secret-looking query value replaced by ``***`` (aiohttp's own errors drop the user part
too). The URL the store uses is untouched.
"""

from __future__ import annotations

import re
import urllib.parse

__all__ = ["redact", "redact_url", "scrub"]

MASK = "***"

# A query parameter whose name holds one of these (case-insensitive) carries a secret.
_SECRET_NAMES = ("sig", "token", "secret", "passw", "credential", "key", "auth", "session")

# A URL's scheme and its user part: everything between "//" and the last "@" before the host's
# end (a password may hold "@" if it was not escaped; "/", "?" and "#" end the authority).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s'\"]*@)")
# A query parameter: "?" or "&", a name, "=", a value up to the next separator or quote.
_QUERY = re.compile(r"(?P<lead>[?&;](?P<name>[^=&;#\s'\"]+)=)(?P<value>[^&;#\s'\"]*)")


def _mask_query(match: re.Match[str]) -> str:
    name = urllib.parse.unquote(match["name"]).lower()
    if match["value"] and any(secret in name for secret in _SECRET_NAMES):
        return match["lead"] + MASK
    return match[0]


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    if "://" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    if "=" in text and ("?" in text or "&" in text):
        text = _QUERY.sub(_mask_query, text)
    return text


def redact_url(url: str) -> str:
    """One URL with its credentials replaced by ``***`` (`redact` of a single URL)."""
    return redact(url)


def scrub(error: BaseException) -> None:
    """Redact, in place, the URLs in ``error``'s message and in those of the errors it was
    raised from or during (a traceback prints them all).

    The error stays itself (its type, status, response and every other attribute): only the
    text arguments, and an ``OSError``'s file names, lose their secrets. Clients put the URL
    they requested in their errors (fsspec's ``FileNotFoundError(url)``, obstore's messages).
    """
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        args = current.args
        cleaned = tuple(redact(arg) if isinstance(arg, str) else arg for arg in args)
        try:
            if cleaned != args:
                current.args = cleaned
            if isinstance(current, OSError):
                for name in ("filename", "filename2"):
                    value = getattr(current, name, None)
                    if isinstance(value, str) and redact(value) != value:
                        setattr(current, name, redact(value))
        except (AttributeError, TypeError):  # a type whose arguments cannot be set
            pass
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
