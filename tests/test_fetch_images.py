"""``moon3 data fetch-images`` against a scripted image server on 127.0.0.1 (no network beyond loopback)."""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import logging
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from moon3.common.retry import backoff_delay, retry_after_s
from moon3.data import io as dio
from moon3.data.fetch import (
    FAILED,
    FETCHED,
    MANIFEST_FILE,
    REPORT_FILE,
    FetchSettings,
    UrlResult,
    _Progress,
    fetch_images,
    read_manifest,
    redact_url,
    url_key,
)
from moon3.data.importers import import_dataset
from moon3.data.schema import PRODUCTS, QUERIES, read_dataset, records_to_frame, table_path, write_table
from moon3.data.schema import ProductRecord as P
from moon3.data.schema import QueryRecord as Q
from moon3.validation.images import MISSING, check_image

SECRET = "sig-5ecr3t-never-logged"
SLOW_S = 2.0
FAST = FetchSettings(concurrency=4, timeout_s=1.0, max_retries=2, backoff_base_s=0.01, backoff_max_s=0.5,
                     max_bytes=200_000, trust_env=False)  # fmt: skip


def _image(fmt: str, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format=fmt)
    return buf.getvalue()


PNG, JPEG = _image("PNG", (200, 30, 30)), _image("JPEG", (30, 30, 200))


class ImageServer:
    """Plain asyncio HTTP/1.1 (keep-alive) in a thread. ``script``: request target -> actions for its 1st, 2nd...
    request (the last repeats). ``requests`` counts requests per target as they arrive."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = script
        self.requests: Counter[str] = Counter()

    def __enter__(self) -> ImageServer:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: self._loop.run_until_complete(self._main(ready)), daemon=True)
        self._thread.start()
        assert ready.wait(10), "image server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()

    def url(self, target: str) -> str:
        return f"http://127.0.0.1:{self.port}{target}"

    async def _main(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                target = head.split(" ", 2)[1]
                n = self.requests[target]
                self.requests[target] += 1
                actions = self.script.get(target, ["404"])
                if not await self._answer(actions[min(n, len(actions) - 1)], writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _send(writer: asyncio.StreamWriter, status: str, ctype: str, body: bytes, extra: str = "") -> None:
        head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
        writer.write(head.encode() + body)

    async def _answer(self, action: str, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False closes the connection."""
        if action == "slow":
            await asyncio.sleep(SLOW_S)
            action = "png"
        if action == "png":
            self._send(writer, "200 OK", "image/png", PNG)
        elif action == "jpg":
            self._send(writer, "200 OK", "image/jpeg", JPEG)
        elif action in ("404", "500"):
            self._send(writer, f"{action} Oops", "text/plain", b"no")
        elif action == "429":
            self._send(writer, "429 Too Many Requests", "text/plain", b"later", "Retry-After: 0\r\n")
        elif action == "html":
            self._send(writer, "200 OK", "text/html; charset=utf-8", b"<html>not an image</html>")
        elif action == "bogus":
            self._send(writer, "200 OK", "image/png", b"\x89PNG\r\n\x1a\n but not really a png")
        elif action == "drop":  # promises a body, sends part of it, hangs up
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n" + PNG[:50])
            await writer.drain()
            return False
        elif action == "declared_huge":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 50000000\r\n\r\n" + PNG)
            await writer.drain()
            await asyncio.sleep(SLOW_S)
            return False
        elif action == "huge":  # chunked, no Content-Length: only reading tells the size
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = PNG + bytes(65536 - len(PNG))
            for _ in range(64):  # 4 MiB unless the client hangs up first
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


SCRIPT = {
    "/good.png": ["png"],
    f"/good.jpg?sig={SECRET}": ["jpg"],
    "/missing.png": ["404"],
    "/flaky.png": ["500", "png"],
    "/ratelimited.png": ["429", "png"],
    "/slow-once.png": ["slow", "png"],
    "/slow.png": ["slow"],
    "/drop-once.png": ["drop", "png"],
    "/huge.png": ["huge"],
    "/declared-huge.png": ["declared_huge"],
    "/page.html": ["html"],
    "/bogus.png": ["bogus"],
}
# target -> (outcome, failure reason, attempts) of the first run
EXPECTED = {
    "/good.png": (FETCHED, None, 1),
    f"/good.jpg?sig={SECRET}": (FETCHED, None, 1),
    "/missing.png": (FAILED, "http_404", 1),
    "/flaky.png": (FETCHED, None, 2),
    "/ratelimited.png": (FETCHED, None, 2),
    "/slow-once.png": (FETCHED, None, 2),
    "/slow.png": (FAILED, "timeout", 3),
    "/drop-once.png": (FETCHED, None, 2),
    "/huge.png": (FAILED, "too_large", 1),
    "/declared-huge.png": (FAILED, "too_large", 1),
    "/page.html": (FAILED, "not_image_content_type", 1),
    "/bogus.png": (FAILED, "undecodable_image", 1),
}
N_OK = sum(o == FETCHED for o, _, _ in EXPECTED.values())
N_FAILED = len(EXPECTED) - N_OK


def _catalog(root: Path, server: ImageServer) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A dataset whose products name every scripted URL (good.png twice) plus one local image."""
    images = [server.url(t) for t in SCRIPT] + [server.url("/good.png"), "images/local.png"]
    products = [
        P(f"p{i}", f"product {i}", image, ["shop", "things"], {"color": "red"}) for i, image in enumerate(images)
    ]
    queries = [
        Q("q0", None, server.url(f"/good.jpg?sig={SECRET}"), "p1", query_type="image"),
        Q("q1", "red things", None, "p0"),
        Q("q2", None, server.url("/missing.png"), "p2", query_type="image"),
    ]
    frames = records_to_frame(products, PRODUCTS), records_to_frame(queries, QUERIES)
    (root / "images").mkdir(parents=True)
    (root / "images" / "local.png").write_bytes(PNG)
    _write(root, frames)
    return frames


def _write(root: Path, frames: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    write_table(frames[0], table_path(root, PRODUCTS), PRODUCTS)
    write_table(frames[1], table_path(root, QUERIES), QUERIES)


def _outcomes(report) -> tuple[int, int, int, int]:
    return report.fetched, report.cached, report.failed, report.failed_earlier_not_retried


def test_dataset_outcomes_rewrite_and_resume(tmp_path, caplog):
    """Every fault ends as its outcome; counts reconcile; tables point at decodable files; a re-run asks nothing."""
    caplog.set_level(logging.DEBUG, logger="moon3.data.fetch")
    root = tmp_path / "ds"
    with ImageServer(SCRIPT) as server:
        original = _catalog(root, server)
        report = fetch_images(root, settings=FAST, progress=False)

        for target, (outcome, reason, attempts) in EXPECTED.items():
            got = report.results[server.url(target)]
            assert (got.outcome, got.reason, got.attempts) == (outcome, reason, attempts), target
            assert server.requests[target] == attempts, target  # good.png: two rows, one request
        assert (report.urls, report.fetched, report.cached, report.failed) == (len(SCRIPT), N_OK, 0, N_FAILED)
        assert report.failure_reasons == {"http_404": 1, "timeout": 1, "too_large": 2, "not_image_content_type": 1,
                                          "undecodable_image": 1}  # fmt: skip
        assert report.requests == sum(server.requests.values())
        assert report.rows == {
            "products.parquet:image": {"url_rows": len(SCRIPT) + 1, "rewritten": N_OK + 1, "kept_url": N_FAILED},
            "queries.parquet:query_image": {"url_rows": 2, "rewritten": 1, "kept_url": 1},
        }

        products, queries = read_dataset(root)
        for image in [*products["image"], *queries["query_image"].dropna()]:
            if image.startswith("http"):
                assert report.results[image].outcome == FAILED
                assert check_image(image, root).status == MISSING  # the gate quarantines it as image_missing
            else:
                assert dio.load_image(image, root).size == (24, 16)
        assert products["image"].iloc[-1] == "images/local.png"
        assert products["image"].iloc[0] == f"images/fetched/{url_key(server.url('/good.png'))}.png"
        assert products["image"].iloc[1].endswith(".jpg")

        saved = json.loads((root / REPORT_FILE).read_text())
        assert saved["urls"] == saved["fetched"] + saved["cached"] + saved["failed"] == len(SCRIPT)
        assert saved["failure_examples"]["http_404"] == [server.url("/missing.png")]
        manifest = read_manifest(root)
        assert manifest[url_key(server.url(f"/good.jpg?sig={SECRET}"))]["url"].endswith("/good.jpg?<redacted>")
        leaks = [(root / REPORT_FILE).read_text(), caplog.text, (root / MANIFEST_FILE).read_bytes().decode("latin-1")]
        assert not [text for text in leaks if SECRET in text]

        # Re-run on the original tables (a re-import, or a run killed before the rewrite): nothing is asked again.
        _write(root, original)
        before = sum(server.requests.values())
        again = fetch_images(root, settings=FAST, progress=False)
        assert sum(server.requests.values()) == before
        assert _outcomes(again) == (0, N_OK, N_FAILED, N_FAILED)
        assert again.failure_reasons == report.failure_reasons and again.requests == 0
        assert read_dataset(root)[0]["image"].tolist() == products["image"].tolist()

        # --retry-failed asks only the failures again; a cached file that went missing is fetched again.
        _write(root, original)
        (root / products["image"].iloc[0]).unlink()
        before = server.requests.copy()
        third = fetch_images(root, settings=replace(FAST, retry_failed=True), progress=False)
        asked = {t for t in SCRIPT if server.requests[t] > before[t]}
        assert asked == {t for t, (o, _, _) in EXPECTED.items() if o == FAILED} | {"/good.png"}
        assert _outcomes(third) == (1, N_OK - 1, N_FAILED, 0)
        assert dio.load_image(products["image"].iloc[0], root).size == (24, 16)


def _mbe_input(raw: Path, server: ImageServer) -> None:
    """MBE layout: a parquet file (with a query image and a local image) and a JSON Lines file in a subfolder."""
    (raw / "imgs").mkdir(parents=True)
    (raw / "imgs" / "local.png").write_bytes(PNG)
    rows = [
        {"doc_id": "a", "doc_title": "红色 T恤", "doc_image": server.url("/good.png"), "doc_cate1_name": "服装",
         "doc_attributes": "颜色:红色", "query": "红色 上衣", "query_image": server.url(f"/good.jpg?sig={SECRET}")},
        {"doc_id": "b", "doc_title": "蓝色 杯子", "doc_image": server.url("/missing.png"), "doc_cate1_name": "家居",
         "doc_attributes": "颜色:蓝色", "query": "蓝色 杯子", "query_image": None},
        {"doc_id": "c", "doc_title": "本地 图片", "doc_image": "imgs/local.png", "doc_cate1_name": "家居",
         "doc_attributes": "颜色:白色", "query": None, "query_image": None},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), raw / "part-0.parquet")
    (raw / "more").mkdir()
    lines = [
        {"doc_id": "d", "doc_title": "绿色 帽子", "doc_image": server.url("/flaky.png"), "doc_cate1_name": "服装"},
        {"doc_id": "e", "doc_title": "网页", "doc_image": server.url("/page.html"), "doc_cate1_name": "服装"},
    ]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in lines) + "\nnot json\n"
    (raw / "more" / "part-1.jsonl").write_text(text, encoding="utf-8")


def test_importer_input_fetched_copy_imports(tmp_path):
    """An MBE input is copied with local paths; the import then skips only the rows whose image failed."""
    raw, fetched = tmp_path / "raw", tmp_path / "raw-fetched"
    with ImageServer(SCRIPT) as server:
        _mbe_input(raw, server)
        inputs = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}
        report = fetch_images(raw, fetched, settings=FAST, progress=False)
        assert (report.urls, report.fetched, report.cached, report.failed) == (5, 3, 0, 2)
        assert report.failure_reasons == {"http_404": 1, "not_image_content_type": 1}
        assert report.rows == {
            "part-0.parquet:doc_image": {"url_rows": 2, "rewritten": 1, "kept_url": 1},
            "part-0.parquet:query_image": {"url_rows": 1, "rewritten": 1, "kept_url": 0},
            "more/part-1.jsonl:doc_image": {"url_rows": 2, "rewritten": 1, "kept_url": 1},
        }
        assert {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()} == inputs  # the input is untouched
        assert (fetched / "input" / "more" / "part-1.jsonl").read_text().endswith("not json\n")

        imported = import_dataset("mbe", fetched / "input", tmp_path / "ds")
        assert imported.products_written == 3 and imported.queries_written == 1  # a, c, d; a's query
        assert imported.skipped == {"remote_image_url": 2, "malformed_record": 1}
        products, queries = read_dataset(tmp_path / "ds")
        assert sorted(products["product_id"]) == ["a", "c", "d"]
        assert queries["query_image"].notna().all()

        before = sum(server.requests.values())
        again = fetch_images(raw, fetched, settings=FAST, progress=False)
        assert sum(server.requests.values()) == before
        assert (again.fetched, again.cached, again.failed) == (0, 3, 2)


def test_cli_fetch_images_plain_progress(tmp_path):
    from moon3.cli import app

    root = tmp_path / "ds"
    with ImageServer(SCRIPT) as server:
        products = [P(f"p{i}", "a", server.url(t), ["x"], {}) for i, t in enumerate(["/good.png", "/missing.png"])]
        _write(root, (records_to_frame(products, PRODUCTS), records_to_frame([], QUERIES)))
        result = CliRunner().invoke(app, ["data", "fetch-images", str(root), "--timeout", "2", "--backoff", "0.01"])
    assert result.exit_code == 0, result.output
    assert "2 image URLs: 1 fetched, 0 cached, 1 failed (http_404=1)" in result.output
    assert "fetch images: 2/2 (100%)" in result.output and "ETA" in result.output  # not a tty: plain lines
    assert json.loads((root / REPORT_FILE).read_text())["rows"]["products.parquet:image"]["rewritten"] == 1
    missing_out = CliRunner().invoke(app, ["data", "fetch-images", str(tmp_path / "raw-input")])
    assert missing_out.exit_code == 1


def test_cli_defaults_match_settings():
    """The CLI options carry the same defaults as FetchSettings (which the library API uses)."""
    import inspect

    from moon3.data.cli import fetch_images_cmd

    params = {name: p.default.default for name, p in inspect.signature(fetch_images_cmd).parameters.items()}
    s = FetchSettings()
    assert (params["concurrency"], params["timeout_s"], params["retries"], params["backoff_s"]) == (
        s.concurrency, s.timeout_s, s.max_retries, s.backoff_base_s)  # fmt: skip
    assert (params["backoff_max_s"], params["max_mb"] * 1_000_000) == (s.backoff_max_s, s.max_bytes)
    assert (params["retry_failed"], params["allow_octet_stream"]) == (s.retry_failed, s.allow_octet_stream)


def test_redaction_backoff_and_progress_lines():
    assert redact_url("https://u:p@cdn.example.com/a/b.jpg?Signature=x&Expires=1#f") == (
        "https://<redacted>@cdn.example.com/a/b.jpg?<redacted>"
    )
    assert redact_url("http://cdn.example.com/a.png") == "http://cdn.example.com/a.png"
    assert backoff_delay(3, base_s=100.0, max_s=5.0, retry_after=0.0) == 0.0  # Retry-After wins
    assert backoff_delay(1, base_s=1.0, max_s=5.0, retry_after=120.0) == 5.0  # capped
    assert all(0 <= backoff_delay(4, 0.5, 60.0) <= 4.0 for _ in range(50))  # full jitter under base * 2**3
    assert retry_after_s("7") == 7.0 and retry_after_s("soon") is None and retry_after_s(None) is None
    assert retry_after_s(email.utils.formatdate(1_000_030, usegmt=True), now=1_000_000) == pytest.approx(30.0)

    class Pipe(io.StringIO):
        def isatty(self) -> bool:
            return False

    stream = Pipe()
    bar = _Progress(3, enabled=True, every_s=0.0, stream=stream)
    for outcome in (FETCHED, FAILED, FETCHED):
        bar.update(UrlResult(outcome))
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("fetch images: 3/3 (100%)") and "img/s, ETA 0 s" in lines[-1]
    assert lines[-1].endswith("fetched=2 failed=1")
