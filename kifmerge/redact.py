"""Secrets out of everything kifmerge shows: one helper for every place a URI (or a message that
may hold one) reaches a person or a log.

`redact(text)` replaces the password of any `scheme://user:password@host` (the whole userinfo
when it has no password: it is then a token) and the value of any query parameter whose name
looks like a credential (`token`, `key`, `secret`, `password`, `signature`, `auth`, …) with
`***`. Secrets seen in a URI once (`remember(uri)`) are also blanked wherever they turn up
again, in any form (an HTTP library's exception text, say).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"
URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s'\"<>]*@)?(?P<rest>[^\s'\"<>]*)")
SECRET_PARAMETER = re.compile(r"(?P<name>[A-Za-z0-9_.-]*(?:token|key|secret|passw|pwd|sig|auth|credential|session|"
                              r"cookie)[A-Za-z0-9_.-]*)=(?P<value>[^&#\s'\"<>]*)", re.IGNORECASE)
_seen: set[str] = set()  # secrets taken from URIs in this process (redact() blanks them anywhere)


def _userinfo(userinfo: str) -> str:
    user, sep, password = userinfo[:-1].partition(":")
    for secret in (password if sep else user, unquote(password if sep else user)):
        if len(secret) >= 4:  # a one-letter "password" would blank every such letter
            _seen.add(secret)
    return f"{user}:{MASK}@" if sep else f"{MASK}@"


def _parameter(match: re.Match) -> str:
    if not match["value"]:
        return match[0]
    if len(match["value"]) >= 4:
        _seen.update({match["value"], unquote(match["value"])})
    return f"{match['name']}={MASK}"


def _uri(match: re.Match) -> str:
    userinfo = _userinfo(match["userinfo"]) if match["userinfo"] else ""
    rest = SECRET_PARAMETER.sub(_parameter, match["rest"]) if "=" in match["rest"] else match["rest"]
    return match["scheme"] + userinfo + rest


def remember(uri: str | None) -> None:
    """Note the secrets of `uri` (userinfo), so that later messages naming them in any form are redacted."""
    if uri:
        redact(uri)


def redact(text: str | None) -> str | None:
    """`text` with every URI's credentials and credential-like query values replaced by ***."""
    if not text:
        return text
    out = URI.sub(_uri, text) if "://" in text else text
    for secret in sorted(_seen, key=len, reverse=True):
        if secret in out:
            out = out.replace(secret, MASK)
    return out


def redact_uri(uri: str | None) -> str | None:
    """The URI as it may be shown: `http://user:***@host:5000/?token=***`."""
    return redact(uri)


class RedactingFilter:
    """A logging filter that redacts each record's text (MLflow's and the HTTP library's own
    warnings may name the tracking URI)."""

    def filter(self, record) -> bool:
        text = record.getMessage()
        cleaned = redact(text)
        if cleaned != text:
            record.msg, record.args = cleaned, None
        return True


def redacting_handlers(*loggers: str):
    """Context manager: every handler of `loggers` (and of the root logger, and the last-resort
    handler) redacts the records it writes, for the duration of the block."""
    import logging
    from contextlib import contextmanager

    @contextmanager
    def scope():
        handlers = {h for name in (*loggers, None) for h in logging.getLogger(name).handlers}
        if logging.lastResort is not None:
            handlers.add(logging.lastResort)
        added = RedactingFilter()
        for handler in handlers:
            handler.addFilter(added)
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(added)

    return scope()
