"""Credentials never leave the process: URIs are redacted before they are logged, printed, stored or compiled.

A URI's user info (``https://user:pass@host``) and its query string and fragment (signed URLs carry their
signature there) are replaced by ``<redacted>``; scheme, host and path stay, so a reader still sees where it
points.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# scheme://... up to whitespace or a quote: URIs inside free text (error messages, params values).
_URI = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """The URL without user info, query string and fragment (which may carry credentials or signatures)."""
    try:
        parts = urlsplit(url.strip())
        host = parts.netloc.rpartition("@")[2]
        netloc = f"<redacted>@{host}" if "@" in parts.netloc else host
        tail = "?<redacted>" if parts.query or parts.fragment else ""
        return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + tail
    except ValueError:
        return "<unparsable URL>"


def has_credentials(url: str) -> bool:
    """True when ``url`` carries user info or a query string/fragment."""
    return redact_url(url) != url.strip()


def redact_text(text: str) -> str:
    """``text`` with every URI in it redacted (:func:`redact_url`); URIs without secrets are kept as they are."""
    return _URI.sub(lambda m: redact_url(m.group(0)) if has_credentials(m.group(0)) else m.group(0), text)


def redact_values(value: Any) -> Any:
    """A nested dict/list structure with every string passed through :func:`redact_text`."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_values(v) for v in value)
    return value
