"""``moon3 data fetch-images``: download the http(s) image URLs of a catalog into local files.

The public MBE release stores product images as http(s) URLs, which the importers skip as ``remote_image_url``
(no network is assumed there). This module fetches them first. It works on two kinds of input:

- an **importer input** (the files ``moon3 data import`` reads: ``.parquet``, ``.jsonl`` or ``.json`` records
  with ``doc_image`` / ``query_image`` (MBE) or ``image`` / ``image_path`` / ``img`` (M5Product) columns): the
  images go to ``OUT/images/fetched/`` and a copy of every input file is written under ``OUT/input/`` (same
  relative path) with the URLs that were fetched replaced by relative paths and other relative image paths
  made absolute, so ``moon3 data import mbe OUT/input`` finds both. The copy has a folder of its own because
  the importers read every ``.json`` below the path they are given (the report is one). The input itself is
  never modified.
- a **dataset folder** in our format (``products.parquet``, ``queries.parquet``; the ``image`` and
  ``query_image`` columns): the images go to ``ROOT/images/fetched/`` and the tables are rewritten in place.

Every distinct URL is fetched once, however many rows name it, and ends in exactly one outcome: ``fetched``
(downloaded by this run), ``cached`` (downloaded by an earlier run, the file is still there) or ``failed``
(with a reason), so ``urls = fetched + cached + failed``. A row whose URL failed keeps the URL: the importer
then skips it as ``remote_image_url``, and the validation gate quarantines it as ``image_missing`` (a URL is
not a file of the dataset). Rows are never dropped here, so every loss stays counted where it always was.

Each download: at most ``concurrency`` requests at once, a per-attempt timeout, retries with exponential
backoff and full jitter on 408, 429, 5xx, timeouts and dropped connections (a server's ``Retry-After`` wins), a
size limit (``Content-Length`` checked first, the body read is aborted past the limit), a ``Content-Type``
check (``image/*``) and a decode check (``PIL.Image.verify()``, then a full ``load()``). Files are named by
the SHA-256 of the URL plus the detected format's extension (``images/fetched/<sha256>.jpg``).

The manifest (``fetch_manifest.sqlite`` in the output folder) maps each URL to its file or its failure
reason; each outcome is committed as it completes, so a killed run resumes where it stopped. A re-run never
fetches a URL whose file is present, and retries earlier failures only with ``retry_failed``. The manifest is
keyed by the URL's SHA-256 and stores only the redacted URL: query strings (which may carry signatures) and
user info never reach the manifest, the report (``fetch_report.json``) or the logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import random
import sqlite3
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from moon3.common.redact import redact_url
from moon3.common.retry import backoff_delay, retry_after_s
from moon3.data import io as dio
from moon3.data.importers.common import find_inputs
from moon3.data.schema import PRODUCTS, QUERIES, read_table, table_path, write_table

log = logging.getLogger(__name__)

IMAGES_SUBDIR = "images/fetched"
INPUT_SUBDIR = "input"  # importer-input mode: the rewritten copy, OUT/input/...
MANIFEST_FILE = "fetch_manifest.sqlite"
REPORT_FILE = "fetch_report.json"
FETCHED, CACHED, FAILED = "fetched", "cached", "failed"
DATASET_COLUMNS = {PRODUCTS: "image", QUERIES: "query_image"}
INPUT_COLUMNS = ("doc_image", "query_image", "image", "image_path", "img")  # mbe, then m5product
INPUT_SUFFIXES = (".parquet", ".jsonl", ".json")
OCTET_STREAM_TYPES = ("application/octet-stream", "binary/octet-stream", "")
MAX_EXAMPLES = 5
_EXTENSIONS = {"jpeg": "jpg", "mpo": "jpg", "": "img"}
_CHUNK = 1 << 16


@dataclass
class FetchSettings:
    """How images are fetched (the ``fetch-images`` CLI options; not a ``params.yaml`` section).

    Attributes:
        concurrency: requests in flight at once.
        timeout_s: limit of one attempt (connect, headers and body together).
        max_retries: retries after the first attempt for 408, 429, 5xx, timeouts and dropped connections.
        backoff_base_s: ceiling of the first backoff; doubles per retry (full jitter).
        backoff_max_s: ceiling of every wait, ``Retry-After`` included.
        max_bytes: a larger body is a ``too_large`` failure (reading stops at the limit).
        retry_failed: fetch URLs that failed in an earlier run again (else they stay failed).
        allow_octet_stream: also accept ``application/octet-stream`` or no ``Content-Type`` (some buckets
            serve images so); the decode check still applies.
        max_redirects: redirects followed per request.
        user_agent: the ``User-Agent`` header.
        trust_env: use ``HTTP(S)_PROXY`` / ``NO_PROXY`` from the environment.
        progress_every_s: seconds between plain progress lines when stderr is not a terminal.
    """

    concurrency: int = 16
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_bytes: int = 20_000_000
    retry_failed: bool = False
    allow_octet_stream: bool = False
    max_redirects: int = 5
    user_agent: str = "moon3-fetch-images/0.1"
    trust_env: bool = True
    progress_every_s: float = 10.0


@dataclass(frozen=True)
class UrlResult:
    """What became of one distinct URL.

    Attributes:
        outcome: ``fetched``, ``cached`` or ``failed``.
        path: the file, relative to the output folder (None when failed).
        reason: the failure reason (``http_404``, ``timeout``, ``too_large``, ...), None when not failed.
        detail: one line about the failure (never the URL, never an exception's text).
        attempts: requests made for it in this run (0 when cached or an earlier failure was kept).
        nbytes: size of the image (0 when failed).
        earlier: a failure recorded by an earlier run and not retried (see ``FetchSettings.retry_failed``).
    """

    outcome: str
    path: str | None = None
    reason: str | None = None
    detail: str | None = None
    attempts: int = 0
    nbytes: int = 0
    earlier: bool = False

    @property
    def ok(self) -> bool:
        """The URL has a local file."""
        return self.outcome != FAILED


@dataclass
class FetchReport:
    """Counts of a fetch (also written as ``fetch_report.json``).

    ``urls`` counts distinct URLs: ``urls == fetched + cached + failed``. ``rows`` counts table cells holding
    a URL, per ``file:column``: ``url_rows == rewritten + kept_url``.
    """

    mode: str
    source: str
    out_dir: str
    urls: int = 0
    fetched: int = 0
    cached: int = 0
    failed: int = 0
    failed_earlier_not_retried: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    failure_examples: dict[str, list[str]] = field(default_factory=dict)
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    requests: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    results: dict[str, UrlResult] = field(default_factory=dict, repr=False)  # per URL; not in the JSON

    def add(self, url: str, result: UrlResult) -> None:
        """Count one distinct URL's outcome."""
        self.results[url] = result
        self.urls += 1
        if result.outcome == FETCHED:
            self.fetched += 1
            self.bytes_downloaded += result.nbytes
        elif result.outcome == CACHED:
            self.cached += 1
        else:
            self.failed += 1
            reason = result.reason or "unknown"
            self.failure_reasons[reason] = self.failure_reasons.get(reason, 0) + 1
            examples = self.failure_examples.setdefault(reason, [])
            if len(examples) < MAX_EXAMPLES:
                examples.append(redact_url(url))
        self.requests += result.attempts

    def check(self) -> None:
        """Raise unless every URL and every URL cell has exactly one outcome.

        Raises:
            RuntimeError: the counts do not add up (a bug, never bad input).
        """
        problems = []
        if self.urls != self.fetched + self.cached + self.failed:
            problems.append(f"urls {self.urls} != fetched {self.fetched} + cached {self.cached} + failed {self.failed}")
        if sum(self.failure_reasons.values()) != self.failed:
            problems.append(f"failure reasons {self.failure_reasons} do not sum to failed {self.failed}")
        for where, counts in self.rows.items():
            if counts["url_rows"] != counts["rewritten"] + counts["kept_url"]:
                problems.append(f"{where}: {counts}")
        if problems:
            raise RuntimeError("fetch-images lost count: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (without the per-URL results)."""
        data = asdict(self)
        data.pop("results")
        for key in ("failure_reasons", "failure_examples", "rows"):
            data[key] = dict(sorted(data[key].items()))
        return data

    def __str__(self) -> str:
        text = f"{self.urls} image URLs: {self.fetched} fetched, {self.cached} cached, {self.failed} failed"
        if self.failure_reasons:
            text += " (" + ", ".join(f"{k}={v}" for k, v in sorted(self.failure_reasons.items())) + ")"
        rewritten = sum(c["rewritten"] for c in self.rows.values())
        kept = sum(c["kept_url"] for c in self.rows.values())
        return text + f"; rows rewritten to local files: {rewritten}, rows keeping their URL: {kept}"


# ------------------------------------------------------------------------------------------------------- urls


def is_remote(value: Any) -> bool:
    """Whether a cell holds an http(s) URL."""
    return isinstance(value, str) and value.strip().lower().startswith(("http://", "https://"))


def url_key(url: str) -> str:
    """SHA-256 (hex) of the URL: the manifest key and the image file's stem."""
    return hashlib.sha256(url.strip().encode()).hexdigest()


def _valid_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------- manifest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fetches (
    key TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    status TEXT NOT NULL,
    path TEXT,
    reason TEXT,
    detail TEXT,
    bytes INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    updated REAL NOT NULL
)
"""


class Manifest:
    """URL -> file or failure, in SQLite (WAL, one committed row per outcome: a killed run loses only the
    downloads in flight).

    Args:
        path: the database file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def rows(self) -> dict[str, dict[str, Any]]:
        """Every row, by key."""
        cursor = self._db.execute("SELECT * FROM fetches")
        names = [d[0] for d in cursor.description]
        return {row[0]: dict(zip(names, row, strict=True)) for row in cursor}

    def put(self, url: str, result: UrlResult) -> None:
        """Record a URL's new outcome (``ok`` with its file, or ``failed`` with the reason)."""
        self._db.execute(
            "INSERT OR REPLACE INTO fetches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (url_key(url), redact_url(url), "ok" if result.ok else "failed", result.path, result.reason,
             result.detail, result.nbytes, result.attempts, time.time()),
        )  # fmt: skip

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def read_manifest(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The manifest of an output folder by key (:func:`url_key`): ``url`` (redacted), ``status`` (ok |
    failed), ``path``, ``reason``, ``detail``, ``bytes``, ``attempts``, ``updated``; empty when there is none."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        return {}
    manifest = Manifest(path)
    try:
        return manifest.rows()
    finally:
        manifest.close()


# --------------------------------------------------------------------------------------------------- download


class _Failure(Exception):
    """One attempt's failure: ``reason`` (stable code), ``detail`` (one line, no URL)."""

    def __init__(self, reason: str, detail: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.detail, self.retryable, self.retry_after = reason, detail, retryable, retry_after


def _content_type_ok(mime: str, settings: FetchSettings) -> bool:
    return mime.startswith("image/") or (settings.allow_octet_stream and mime in OCTET_STREAM_TYPES)


async def _get(session: aiohttp.ClientSession, url: str, settings: FetchSettings) -> bytes:
    """The body of one GET, after the status, type and size checks.

    Raises:
        _Failure: the answer is not a usable image body (retryable for 408, 429 and 5xx).
    """
    async with session.get(url, max_redirects=settings.max_redirects) as resp:
        status = resp.status
        if status in (408, 429) or status >= 500:
            raise _Failure(f"http_{status}", f"HTTP {status}", True, retry_after_s(resp.headers.get("Retry-After")))
        if not 200 <= status < 300:
            raise _Failure(f"http_{status}", f"HTTP {status}")
        mime = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not _content_type_ok(mime, settings):
            raise _Failure("not_image_content_type", f"Content-Type {mime[:60] or '(none)'}")
        declared = resp.content_length
        if declared is not None and declared > settings.max_bytes:
            raise _Failure("too_large", f"Content-Length {declared} > {settings.max_bytes} bytes")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > settings.max_bytes:  # leaving the block closes the connection: no more is read
                raise _Failure("too_large", f"body over {settings.max_bytes} bytes")
        return bytes(body)


def image_extension(data: bytes) -> str:
    """File extension of image bytes that pass ``verify()`` and a full decode (``png``, ``jpg``, ``webp``...).

    Raises:
        ValueError: the bytes are not a decodable image (the message names PIL's error type).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:  # verify() leaves the image unusable: open it again
            fmt = (img.format or "").lower()
            img.load()
    except Exception as err:  # noqa: BLE001  PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise ValueError(f"does not decode ({type(err).__name__})") from None
    return _EXTENSIONS.get(fmt, fmt)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def _download(
    session: aiohttp.ClientSession,
    url: str,
    folder: Path,
    settings: FetchSettings,
    slots: asyncio.Semaphore,
    rng: random.Random,
) -> UrlResult:
    """Fetch, check and store one URL; every exception ends as a failed :class:`UrlResult`."""
    if not _valid_url(url):
        return UrlResult(FAILED, reason="invalid_url", detail="not an http(s) URL with a host")
    attempt = 0
    while True:
        attempt += 1
        async with slots:  # held for the request only: a backing-off URL does not block the others
            try:
                async with asyncio.timeout(settings.timeout_s):
                    data = await _get(session, url, settings)
            except _Failure as exc:
                failure = exc
            except TimeoutError:
                failure = _Failure("timeout", f"no complete answer within {settings.timeout_s:g} s", True)
            except aiohttp.TooManyRedirects:
                failure = _Failure("too_many_redirects", f"more than {settings.max_redirects} redirects")
            except aiohttp.InvalidURL:
                failure = _Failure("invalid_url", "the URL or a redirect target is not valid")
            except (aiohttp.ClientError, OSError) as exc:  # refused, reset, dropped mid-body, DNS: no exc text
                failure = _Failure("connection_error", type(exc).__name__, True)
            else:
                break
        if not failure.retryable or attempt > settings.max_retries:
            log.debug("%s failed after %d attempt(s): %s", redact_url(url), attempt, failure.detail)
            return UrlResult(FAILED, reason=failure.reason, detail=failure.detail, attempts=attempt)
        delay = backoff_delay(attempt, settings.backoff_base_s, settings.backoff_max_s, failure.retry_after, rng)
        log.debug("%s attempt %d: %s; retrying in %.3f s", redact_url(url), attempt, failure.detail, delay)
        await asyncio.sleep(delay)
    try:
        ext = await asyncio.to_thread(image_extension, data)
    except ValueError as err:
        return UrlResult(FAILED, reason="undecodable_image", detail=str(err), attempts=attempt)
    rel = f"{IMAGES_SUBDIR}/{url_key(url)}.{ext}"
    await asyncio.to_thread(_write_atomic, folder / rel, data)
    return UrlResult(FETCHED, path=rel, attempts=attempt, nbytes=len(data))


class _Progress:
    """A tqdm bar on a terminal, else a plain line (done/total, rate, ETA, counts) every ``every_s`` seconds."""

    def __init__(self, total: int, enabled: bool, every_s: float, stream: TextIO | None = None):
        self.total, self.every_s, self.stream = total, every_s, stream or sys.stderr
        self.enabled = enabled and total > 0
        self.done = 0
        self.counts = {FETCHED: 0, FAILED: 0}
        self.start = self.last = time.monotonic()
        self.bar = None
        if self.enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", desc="fetch images", file=self.stream)

    def update(self, result: UrlResult) -> None:
        self.done += 1
        self.counts[FETCHED if result.ok else FAILED] += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(self.counts, refresh=False)
        elif self.enabled and (time.monotonic() - self.last >= self.every_s or self.done == self.total):
            self.last = time.monotonic()
            self._line()

    def _line(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f} s" if eta != float("inf") else "?"
        print(
            f"fetch images: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%), {rate:.1f} img/s,"
            f" ETA {eta_text}; fetched={self.counts[FETCHED]} failed={self.counts[FAILED]}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def fetch_urls(
    urls: Iterable[str], folder: str | Path, settings: FetchSettings | None = None, progress: bool = True
) -> dict[str, UrlResult]:
    """Fetch every distinct http(s) URL into ``folder/images/fetched/``, using and updating the manifest.

    Args:
        urls: URLs (surrounding blanks are ignored; duplicates are fetched once).
        folder: the output folder (holds ``images/fetched/`` and ``fetch_manifest.sqlite``).
        settings: how to fetch (defaults: :class:`FetchSettings`).
        progress: show progress (a bar on a terminal, plain lines otherwise).

    Returns:
        ``{url: UrlResult}`` for every distinct (stripped) URL, in first-seen order.
    """
    settings = settings or FetchSettings()
    if settings.concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {settings.concurrency}")
    folder = Path(folder)
    distinct = list(dict.fromkeys(u.strip() for u in urls))
    manifest = Manifest(folder / MANIFEST_FILE)
    try:
        known = manifest.rows()
        results: dict[str, UrlResult] = {}
        todo = []
        for url in distinct:
            row = known.get(url_key(url))
            if row and row["status"] == "ok" and _present(folder / row["path"], row["bytes"]):
                results[url] = UrlResult(CACHED, path=row["path"], nbytes=row["bytes"])
            elif row and row["status"] == "failed" and not settings.retry_failed:
                results[url] = UrlResult(FAILED, reason=row["reason"], detail=row["detail"], earlier=True)
            else:
                todo.append(url)
        if todo:
            fresh = await _fetch_all(todo, folder, settings, manifest, progress)
            results.update(fresh)
    finally:
        manifest.close()
    return {url: results[url] for url in distinct}


def _present(path: Path, nbytes: int) -> bool:
    try:
        return path.stat().st_size == nbytes
    except OSError:
        return False


async def _fetch_all(
    urls: list[str], folder: Path, settings: FetchSettings, manifest: Manifest, progress: bool
) -> dict[str, UrlResult]:
    slots = asyncio.Semaphore(settings.concurrency)
    live = asyncio.Semaphore(settings.concurrency * 4)  # tasks alive at once: a million URLs, a few hundred tasks
    rng = random.Random()
    bar = _Progress(len(urls), progress, settings.progress_every_s)
    results: dict[str, UrlResult] = {}
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),  # bounded by ``slots``
        headers={"User-Agent": settings.user_agent},
        trust_env=settings.trust_env,
    )

    async def one(url: str) -> None:
        try:
            try:
                result = await _download(session, url, folder, settings, slots, rng)
            except Exception as exc:  # a bug (or a disk error) fails its URL, not the run; the type only
                result = UrlResult(FAILED, reason="internal_error", detail=type(exc).__name__, attempts=1)
            results[url] = result
            manifest.put(url, result)
            bar.update(result)
        finally:
            live.release()

    tasks = []
    try:
        for url in urls:
            await live.acquire()
            tasks.append(asyncio.create_task(one(url)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        bar.close()
    return results


def fetch_urls_sync(
    urls: Iterable[str], folder: str | Path, settings: FetchSettings | None = None, progress: bool = True
) -> dict[str, UrlResult]:
    """:func:`fetch_urls` from synchronous code."""
    return asyncio.run(fetch_urls(urls, folder, settings, progress))


# -------------------------------------------------------------------------------------------------- entry point


def fetch_images(
    path: str | Path,
    out_dir: str | Path | None = None,
    settings: FetchSettings | None = None,
    progress: bool = True,
) -> FetchReport:
    """Fetch the image URLs of a dataset folder (in place) or of an importer input (into ``out_dir``).

    Args:
        path: a dataset folder (it holds ``products.parquet``) or an importer input file or folder.
        out_dir: where an importer input's fetched copy goes (required for one; must be None, or ``path``,
            for a dataset folder).
        settings: how to fetch (defaults: :class:`FetchSettings`).
        progress: show progress.

    Returns:
        The report, also written to ``fetch_report.json`` in the output folder.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a ``gs://`` path, a missing or clashing ``out_dir``, bad settings.
        moon3.data.importers.ImportFormatError: an importer input folder without input files.
    """
    settings = settings or FetchSettings()
    if dio.is_gcs(path):
        raise ValueError(f"{path}: fetch-images works on a local folder (download it first)")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    start = time.perf_counter()
    if path.is_dir() and table_path(path, PRODUCTS).exists():
        if out_dir is not None and Path(out_dir).resolve() != path.resolve():
            raise ValueError(f"{path} is a dataset folder: its tables are rewritten in place (leave out --out)")
        report = _fetch_dataset(path, settings, progress)
    else:
        if out_dir is None:
            raise ValueError(f"{path} is an importer input: name the folder for its fetched copy (--out)")
        report = _fetch_input(path, Path(out_dir), settings, progress)
    report.seconds = round(time.perf_counter() - start, 3)
    report.settings = asdict(settings)
    if report.failed_earlier_not_retried:
        report.notes.append(
            f"{report.failed_earlier_not_retried} URL(s) failed in an earlier run and were not retried"
            " (pass --retry-failed to retry them)"
        )
    if report.failed:
        then = "the importer skips them as remote_image_url" if report.mode == "import_input" else (
            "the validation gate quarantines them as image_missing")  # fmt: skip
        report.notes.append(f"rows whose image failed keep their URL: {then}")
    report.check()
    out = Path(report.out_dir)
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return report


def _count_results(report: FetchReport, results: dict[str, UrlResult]) -> None:
    for url, result in results.items():
        report.add(url, result)
        report.failed_earlier_not_retried += int(result.earlier)


def _rewrite_cell(value: Any, results: dict[str, UrlResult], counts: dict[str, int]) -> Any:
    """The cell with a fetched URL replaced by its file; other URLs kept (and counted)."""
    if not is_remote(value):
        return value
    counts["url_rows"] += 1
    result = results[value.strip()]
    if result.ok:
        counts["rewritten"] += 1
        return result.path
    counts["kept_url"] += 1
    return value


def _new_counts() -> dict[str, int]:
    return {"url_rows": 0, "rewritten": 0, "kept_url": 0}


# ----------------------------------------------------------------------------------------------- dataset mode


def _fetch_dataset(root: Path, settings: FetchSettings, progress: bool) -> FetchReport:
    report = FetchReport(mode="dataset", source=str(root), out_dir=str(root))
    frames = {t: read_table(table_path(root, t), t) for t in DATASET_COLUMNS if table_path(root, t).exists()}
    urls = [v for t, df in frames.items() for v in df[DATASET_COLUMNS[t]] if is_remote(v)]
    results = asyncio.run(fetch_urls(urls, root, settings, progress)) if urls else {}
    _count_results(report, results)
    for table, df in frames.items():
        column = DATASET_COLUMNS[table]
        counts = report.rows.setdefault(f"{table}.parquet:{column}", _new_counts())
        df[column] = [_rewrite_cell(v, results, counts) for v in df[column]]
        if counts["rewritten"]:  # write beside, then replace: a failed write leaves the old table whole
            target = table_path(root, table)
            tmp = target.with_name(f".{target.name}.tmp")
            write_table(df, tmp, table)
            os.replace(tmp, target)
    return report


# ------------------------------------------------------------------------------------------ importer-input mode


def _fetch_input(source: Path, out: Path, settings: FetchSettings, progress: bool) -> FetchReport:
    base = source if source.is_dir() else source.parent
    if out.resolve() == base.resolve():
        raise ValueError(f"--out {out} is the input folder: choose another folder (inputs are never modified)")
    report = FetchReport(mode="import_input", source=str(source), out_dir=str(out))
    files = find_inputs(source, INPUT_SUFFIXES, exclude=out)
    urls = [url for f in files for url in _input_urls(f)]
    out.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(fetch_urls(urls, out, settings, progress)) if urls else {}
    _count_results(report, results)
    for f in files:
        rel = f.relative_to(base)
        target = out / INPUT_SUBDIR / rel
        # A relative path in the copy resolves against the copy's folder first (as the importers try it).
        rewrite = _InputRewriter(results, f, base, target.parent, out, report.rows, str(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        if f.suffix == ".parquet":
            _rewrite_parquet(f, tmp, rewrite)
        else:
            _rewrite_json(f, tmp, rewrite)
        os.replace(tmp, target)
    report.notes.append(f"import the fetched copy with: moon3 data import <source> {out / INPUT_SUBDIR}")
    return report


class _InputRewriter:
    """Rewrites the image cells of one input file for its copy under ``out``."""

    def __init__(
        self,
        results: dict[str, UrlResult],
        source_file: Path,
        base: Path,
        target_dir: Path,
        out: Path,
        rows: dict[str, dict[str, int]],
        label: str,
    ):
        self.results, self.source_dir, self.base = results, source_file.parent, base
        self.target_dir, self.out, self.rows, self.label = target_dir, out, rows, label

    def __call__(self, column: str, value: Any) -> Any:
        if is_remote(value):
            counts = self.rows.setdefault(f"{self.label}:{column}", _new_counts())
            new = _rewrite_cell(value, self.results, counts)
            return new if new is value else os.path.relpath(self.out / new, self.target_dir)
        if isinstance(value, str) and value.strip() and not dio.is_gcs(value) and not os.path.isabs(value.strip()):
            for folder in (self.source_dir, self.base):  # where the importer would have looked in the input
                candidate = folder / value.strip()
                if candidate.is_file():
                    return str(candidate.resolve())
        return value


def _string_columns(schema: pa.Schema) -> list[str]:
    text = (pa.types.is_string, pa.types.is_large_string)
    return [c for c in INPUT_COLUMNS if c in schema.names and any(is_(schema.field(c).type) for is_ in text)]


def _input_urls(path: Path) -> Iterable[str]:
    """The http(s) URLs in the image columns of one input file."""
    if path.suffix == ".parquet":
        columns = _string_columns(pq.read_schema(path))
        if columns:
            table = pq.read_table(path, columns=columns)
            for column in columns:
                yield from (v for v in table.column(column).to_pylist() if is_remote(v))
        return
    for record in _json_records(path):
        yield from (record[c] for c in INPUT_COLUMNS if is_remote(record.get(c)))


def _json_records(path: Path) -> Iterable[dict[str, Any]]:
    """The records of a JSON / JSON Lines input (a list, an object of records, or one record per line)."""
    document = _json_document(path)
    if isinstance(document, list):
        yield from (r for r in document if isinstance(r, dict))
    elif isinstance(document, dict):
        yield from (r for r in document.values() if isinstance(r, dict))
    else:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                record = _json_line(line)
                if isinstance(record, dict):
                    yield record


def _json_document(path: Path) -> Any:
    """The whole ``.json`` document, or None for JSON Lines (a ``.jsonl`` or a ``.json`` that is not one
    document)."""
    if path.suffix != ".json":
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _json_line(line: str) -> Any:
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def _rewrite_record(record: Any, rewrite: _InputRewriter) -> Any:
    if isinstance(record, dict):
        for column in INPUT_COLUMNS:
            if column in record:
                record[column] = rewrite(column, record[column])
    return record


def _rewrite_json(path: Path, tmp: Path, rewrite: _InputRewriter) -> None:
    document = _json_document(path)
    if isinstance(document, list):
        document = [_rewrite_record(r, rewrite) for r in document]
    elif isinstance(document, dict):
        document = {k: _rewrite_record(r, rewrite) for k, r in document.items()}
    if document is not None:
        tmp.write_text(json.dumps(document, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    with path.open(encoding="utf-8") as src, tmp.open("w", encoding="utf-8") as dst:
        for line in src:
            record = _json_line(line)
            if isinstance(record, dict):  # other lines are copied as they are (the importer counts them)
                line = json.dumps(_rewrite_record(record, rewrite), ensure_ascii=False) + "\n"
            dst.write(line)


def _rewrite_parquet(path: Path, tmp: Path, rewrite: _InputRewriter) -> None:
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    columns = _string_columns(schema)
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for batch in parquet.iter_batches(batch_size=4096):
            for column in columns:
                i = batch.schema.get_field_index(column)
                values = [rewrite(column, v) for v in batch.column(i).to_pylist()]
                batch = batch.set_column(i, column, pa.array(values, type=batch.schema.field(i).type))
            writer.write_batch(batch)
