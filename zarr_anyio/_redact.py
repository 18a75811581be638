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

__all__ = ["redact", "redact_url"]

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
