"""Progress that still shows when no terminal watches: a tqdm bar on a TTY, plain timed lines elsewhere.

Under ``dvc repro`` in CI, ``nohup`` or ``dvc repro 2>&1 | tee log`` the progress stream (stderr) is not a
terminal: a carriage-return bar would fill the log with one overwritten line, and a bar disabled off a TTY prints
nothing for minutes. :class:`Progress` is a drop-in ``tqdm``: on a terminal it *is* tqdm; elsewhere it prints
one plain line every ``interval`` seconds and one when it closes (so a short loop costs one line):

    pretrain: 120/600 (20%) elapsed 01:02, ETA 04:08, 1.93it/s, loss=2.114, tau=0.049

The rate is the average since the start (no smoothing: a log line should not jump with one slow batch).
``interval`` defaults to ``$MOON3_PROGRESS_INTERVAL`` seconds, else 30. ``disable`` is honoured as given; pass a
bool (tqdm's ``disable=None`` means "off when not a terminal", the very case this class exists for).
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any

from tqdm.auto import tqdm

INTERVAL_ENV = "MOON3_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0
PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) elapsed {elapsed}, ETA {remaining}, {rate_fmt}{postfix}"
PLAIN_FORMAT_NO_TOTAL = "{desc}: {n_fmt} elapsed {elapsed}, {rate_fmt}{postfix}"
_SPACES = re.compile(r" {2,}")


def default_interval() -> float:
    """Seconds between plain progress lines: ``$MOON3_PROGRESS_INTERVAL`` if set (and a number), else 30."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (False for pipes, files and closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Progress(tqdm):
    """``tqdm`` on a terminal; one plain line per ``interval`` seconds (done/total, ETA, rate) elsewhere.

    Args:
        iterable: as tqdm's.
        interval: seconds between plain lines (default :func:`default_interval`); ignored on a terminal.
        **kwargs: tqdm's keyword arguments (``desc``, ``total``, ``disable``, ``unit``, ``file``...). Off a
            terminal ``bar_format``, ``mininterval``, ``miniters`` and ``smoothing`` are set here.
    """

    def __init__(self, iterable: Any = None, *, interval: float | None = None, **kwargs: Any) -> None:
        stream = kwargs.get("file") or sys.stderr
        self.plain = not is_terminal(stream)
        self._interval = default_interval() if interval is None else max(0.0, float(interval))
        self._last_line_t: float | None = None
        self._last_line_n = -1
        self._final = False
        if self.plain:
            total = kwargs.get("total")
            kwargs.update(
                bar_format=PLAIN_FORMAT if (total if total is not None else _len(iterable)) else PLAIN_FORMAT_NO_TOTAL,
                mininterval=min(self._interval, 1.0),  # tqdm's own throttle; display() keeps the real interval
                miniters=1,
                smoothing=0,
                dynamic_ncols=False,
            )
        super().__init__(iterable, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool | None:
        """Off a terminal: write one line if ``interval`` has passed since the start or the last line."""
        if not self.plain:
            return super().display(msg, pos)
        if msg == "":  # tqdm clearing a bar that is not left behind: plain lines are never cleared
            return None
        now = time.monotonic()
        if self._last_line_t is None:  # tqdm's first display, at the start: nothing done yet, nothing to say
            self._last_line_t, self._last_line_n = now, self.n
            return None
        # One line per count at most (a set_postfix right after update adds none); the closing line is due always.
        due = self._final or now - self._last_line_t >= self._interval
        if not due or self.n == self._last_line_n:
            return None
        self._last_line_t, self._last_line_n = now, self.n
        line = msg if msg is not None else _SPACES.sub(" ", str(self))  # tqdm pads the rate to a fixed width
        self.fp.write(line + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        """Off a terminal: a last line with the final count and average rate, then tqdm's cleanup."""
        if self.plain and not self.disable and hasattr(self, "last_print_t"):
            self._final = True
            with self._lock:
                self.display()
            self.leave = False  # tqdm would write its own final bar and a newline
        super().close()


def _len(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None
