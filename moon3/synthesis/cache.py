"""Content-addressed cache of teacher traces: SQLite, one row per (item content, prompt, teacher, model, decoding).

The key never involves the item id, so two items with the same content share a trace, and a changed prompt,
model or decoding setting misses the cache instead of returning a stale trace. Only successful traces are
stored: a failure may depend on something outside the key (a wrong API key, an overloaded server), so a rerun
asks again.

Each :meth:`TraceCache.put` is its own committed transaction in WAL mode: a process killed mid-run (SIGKILL
included) loses at most the requests in flight, and the file stays consistent.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moon3.synthesis.teacher import SynthesisItem, Teacher

_SCHEMA = """
CREATE TABLE IF NOT EXISTS traces (
    key TEXT PRIMARY KEY,
    trace TEXT NOT NULL,
    meta TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the same dict always gives the same string (and hash)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class CachedTrace:
    """One cache row.

    Attributes:
        key: the content-addressed key.
        trace: the trace body.
        meta: what was stored with it (teacher, model, prompt_hash, decoding, ...).
    """

    key: str
    trace: str
    meta: dict[str, Any]


class TraceCache:
    """SQLite trace cache, safe to read from another process while a run writes it.

    Args:
        path: the database file (created with its parent folder if missing).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: every put is one transaction, committed before put returns.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process (the OS has the pages); only a power cut may lose the tail.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(_SCHEMA)

    @staticmethod
    def key_for(item: SynthesisItem, teacher: Teacher) -> str:
        """sha256 of the item's content, the teacher's prompt hash, name, model and canonical decoding."""
        decoding = canonical_json(teacher.decoding)
        parts = [item.content_hash(), teacher.prompt_hash(), teacher.name, teacher.model, decoding]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def get(self, key: str) -> CachedTrace | None:
        """The cached trace for ``key``, or None."""
        row = self._db.execute("SELECT trace, meta FROM traces WHERE key = ?", (key,)).fetchone()
        return None if row is None else CachedTrace(key, row[0], json.loads(row[1]))

    def put(self, key: str, trace: str, meta: dict[str, Any]) -> None:
        """Store (or replace) the trace for ``key``, committed before returning."""
        self._db.execute(
            "INSERT OR REPLACE INTO traces (key, trace, meta, created) VALUES (?, ?, ?, ?)",
            (key, trace, canonical_json(meta), time.time()),
        )

    def keys(self) -> set[str]:
        """Every cached key."""
        return {row[0] for row in self._db.execute("SELECT key FROM traces")}

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM traces").fetchone()[0]

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._db.close()

    def __enter__(self) -> TraceCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
