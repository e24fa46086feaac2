"""Retry timing for HTTP clients: full-jitter exponential backoff and ``Retry-After`` parsing.

The one definition for every client that retries: the synthesis client and its OpenAI teacher, and
``moon3 data fetch-images``.
"""

from __future__ import annotations

import email.utils
import random
import time


def backoff_delay(
    attempt: int, base_s: float, max_s: float, retry_after: float | None = None, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based).

    The server's ``Retry-After`` wins when given (it knows its load), capped by ``max_s``; otherwise full
    jitter: uniform in [0, min(max_s, base_s * 2**(attempt - 1))], which spreads retries of a burst apart.

    Args:
        attempt: the retry about to be made, 1 for the first retry.
        base_s: ceiling of the first wait; doubles per retry.
        max_s: ceiling of every wait, ``Retry-After`` included.
        retry_after: the server's ``Retry-After`` in seconds, if it sent one.
        rng: random source (tests pass a seeded one).

    Returns:
        The wait in seconds.
    """
    if retry_after is not None:
        return min(max(retry_after, 0.0), max_s)
    return (rng or random).uniform(0.0, min(max_s, base_s * 2 ** (attempt - 1)))


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` header as seconds: a number of seconds or an HTTP date; None when absent or unreadable.

    Args:
        value: the header value.
        now: the current time as a UNIX timestamp (default: ``time.time()``), for HTTP dates.
    """
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)
