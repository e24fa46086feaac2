"""Synthesis client, trace cache and OpenAI teacher against a real scripted HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moon3.synthesis.cache import TraceCache
from moon3.synthesis.client import backoff_delay, run_teacher_sync
from moon3.synthesis.openai_teacher import OpenAITeacher
from moon3.synthesis.teacher import SynthesisItem

WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
from synth_server import ScriptedServer  # noqa: E402

KEY = "sk-test-7f3a9c-never-logged"
FAST = dict(timeout_s=0.3, max_retries=2, backoff_base_s=0.01, backoff_max_s=1.0, progress=False)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("SYNTH_TEST_KEY", KEY)


def product(text: str, item_id: str | None = None, **kw) -> SynthesisItem:
    return SynthesisItem(item_id or text, "product", text, None, ".", **kw)


def teacher(server: ScriptedServer, **kw) -> OpenAITeacher:
    return OpenAITeacher(server.base_url, "scripted-vl", api_key_env="SYNTH_TEST_KEY", max_tokens=64, **kw)


def key_leaks(*texts: str) -> list[str]:
    return [t[:80] for t in texts if KEY in t]


def test_faults_end_as_trace_or_recorded_failure(tmp_path, caplog, capfd):
    """500s, 429s, timeouts, drops and bad JSON: every item ends ok or failed, with the attempts it took."""
    caplog.set_level(logging.DEBUG)
    script = {
        "always500": ["500"],
        "flaky500": ["500", "500", "ok"],
        "slow": ["slow", "ok"],
        "drop": ["drop", "ok"],
        "badjson": ["badjson", "nochoices", "ok"],
        "bad400": ["400"],
        "unauthorized": ["401"],
        "limited": ["429:0.3", "ok"],
        "think": ["think"],
    }
    expected = {  # text -> (status, attempts)
        "always500": ("failed", 3), "flaky500": ("ok", 3), "slow": ("ok", 2), "drop": ("ok", 2),
        "badjson": ("ok", 3), "bad400": ("failed", 1), "unauthorized": ("failed", 1), "limited": ("ok", 2),
        "think": ("ok", 1),
    } | {f"plain {i}": ("ok", 1) for i in range(10)}  # fmt: skip
    items = [product(text) for text in expected]
    with ScriptedServer(script, slow_s=1.5) as server, TraceCache(tmp_path / "c.db") as cache:
        outcomes = run_teacher_sync(items, teacher(server), cache=cache, concurrency=4, **FAST)
        seen = list(server.seen)
        cached_rows = len(cache)

        got = {o.item_id: (o.status, o.attempts) for o in outcomes}
        assert got == expected
        assert [o.item_id for o in outcomes] == [i.item_id for i in items]  # input order
        n_ok = sum(o.status == "ok" for o in outcomes)
        assert n_ok + sum(o.status == "failed" for o in outcomes) == len(items) == 19 and n_ok == 16
        assert cached_rows == n_ok  # successes stored, failures not
        # Each attempt is one request: the server saw exactly the attempts.
        assert {t: server.texts().count(t) for t in expected} == {t: a for t, (_, a) in expected.items()}
        for o in outcomes:
            if o.status == "ok":
                assert o.trace.startswith(f"category: shop > {o.item_id}\nsignature: ") and o.error is None
                assert "<think>" not in o.trace and "</think>" not in o.trace
        errors = {o.item_id: o.error for o in outcomes if o.status == "failed"}
        assert errors["always500"].startswith("HTTP 500") and errors["bad400"].startswith("HTTP 400 Bad Request")
        assert "scripted_401" in errors["unauthorized"]

        # Retry-After: 0.3 s asked, honoured (no jittered 10 ms retry), not stretched much either.
        limited = [s.arrived for s in seen if s.text == "limited"]
        assert 0.3 <= limited[1] - limited[0] < 0.6, limited

        # The key reaches the server, and nothing else.
        assert {s.authorization for s in seen} == {f"Bearer {KEY}"}
        assert not key_leaks(repr(outcomes), caplog.text, *capfd.readouterr())
        db_bytes = b"".join(p.read_bytes() for p in tmp_path.iterdir())
        assert KEY.encode() not in db_bytes

        # A rerun asks only for what failed: cached traces cost no request.
        before = len(server.seen)
        again = run_teacher_sync(items, teacher(server), cache=cache, concurrency=4, **FAST)
        assert sorted(server.texts()[before:]) == ["always500"] * 3 + ["bad400", "unauthorized"]
        assert [(o.status, o.trace) for o in again] == [(o.status, o.trace) for o in outcomes]
        assert all(o.cached and o.attempts == 0 for o in again if o.status == "ok")


def test_retry_after_capped_by_backoff_max():
    with ScriptedServer({"busy": ["429:30", "ok"]}) as server:
        start = time.monotonic()
        [out] = run_teacher_sync([product("busy")], teacher(server), **(FAST | {"backoff_max_s": 0.1}))
        assert out.status == "ok" and out.attempts == 2
        assert time.monotonic() - start < 2.0


def test_backoff_is_full_jitter_within_ceiling():
    import random

    rng = random.Random(0)
    delays = [backoff_delay(3, 0.5, 1.5, rng=rng) for _ in range(2000)]
    assert 0.0 <= min(delays) < 0.05 and 1.45 < max(delays) <= 1.5  # min(1.5, 0.5 * 2**2) = 1.5
    assert abs(np.mean(delays) - 0.75) < 0.05
    assert backoff_delay(1, 0.5, 1.5, retry_after=1.0) == 1.0 and backoff_delay(1, 0.5, 1.5, retry_after=9) == 1.5


def test_concurrency_bound_and_duplicate_content_asked_once():
    items = [product(f"thing {i}") for i in range(12)] + [product("thing 0", "copy-a"), product("thing 0", "copy-b")]
    with ScriptedServer(latency_s=0.05) as server:
        outcomes = run_teacher_sync(items, teacher(server), concurrency=3, **FAST)
        assert server.max_in_flight == 3
        assert len(server.seen) == 12
    assert all(o.status == "ok" for o in outcomes)
    assert outcomes[12].trace == outcomes[13].trace == outcomes[0].trace


def test_image_sent_as_data_url_with_same_pixels_and_no_attributes(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    item = SynthesisItem("p1", "product", "red mug", "img.png", str(tmp_path),
                         category_path=("Home", "Kitchen"), attributes=(("colour", "vermilion"),))  # fmt: skip
    with ScriptedServer() as server:
        [out] = run_teacher_sync([item], teacher(server, temperature=0.2, seed=7), **FAST)
        body = server.seen[0].body
    assert out.status == "ok"
    user = body["messages"][-1]["content"]
    [url] = [part["image_url"]["url"] for part in user if part["type"] == "image_url"]
    assert url.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    assert np.array_equal(decoded, pixels)
    text = json.dumps(body)
    assert "vermilion" not in text and "Kitchen" not in text  # the teacher must read the product itself
    assert (body["model"], body["temperature"], body["seed"], body["max_tokens"]) == ("scripted-vl", 0.2, 7, 64)
    assert json.loads(out.decoding) == {"max_tokens": 64, "seed": 7, "temperature": 0.2}


def test_cache_key_follows_content_and_teacher_not_id(tmp_path):
    t = OpenAITeacher("http://127.0.0.1:9/v1", "m", api_key_env="SYNTH_TEST_KEY")
    key = TraceCache.key_for(product("a", "id1"), t)
    assert TraceCache.key_for(product("a", "id2"), t) == key
    assert TraceCache.key_for(product("b", "id1"), t) != key
    assert TraceCache.key_for(product("a"), OpenAITeacher("http://x/v1", "m", temperature=0.5)) != key
    assert TraceCache.key_for(product("a"), OpenAITeacher("http://x/v1", "m2")) != key
    with TraceCache(tmp_path / "c.db") as cache:
        cache.put(key, "category: a", {"teacher": "openai"})
    with TraceCache(tmp_path / "c.db") as cache:  # committed and readable after reopening
        hit = cache.get(key)
        assert (hit.trace, hit.meta, len(cache)) == ("category: a", {"teacher": "openai"}, 1)
        assert cache.get("missing") is None
    with closing(sqlite3.connect(tmp_path / "c.db")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _worker(server: ScriptedServer, db: Path, out: Path) -> list[str]:
    return [sys.executable, str(WORKERS / "synth_run.py"), server.base_url, str(db), str(out), "40", "2"]


def test_sigkill_mid_run_then_rerun_equals_uninterrupted_run(tmp_path):
    """Killed half-way, a rerun finishes with the uninterrupted run's traces and never re-asks a cached item."""
    env = dict(os.environ, SYNTH_TEST_KEY=KEY)
    db, out = tmp_path / "killed.db", tmp_path / "killed.json"
    with ScriptedServer(latency_s=0.08) as server:
        proc = subprocess.Popen(_worker(server, db, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        rows = 0
        while rows < 12 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
            if db.exists():
                try:
                    with closing(sqlite3.connect(db)) as conn:
                        rows = conn.execute("SELECT COUNT(*) FROM traces").fetchone()[0]
                except sqlite3.OperationalError:  # the table is not created yet
                    pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        time.sleep(0.2)  # let the server read any request that was already in the socket when the worker died
        assert not out.exists(), "the worker finished before the kill"
        with TraceCache(db) as cache:
            cached_before = cache.keys()
        assert 12 <= len(cached_before) < 40

        mark = len(server.seen)
        rerun = subprocess.run(_worker(server, db, out), env=env, capture_output=True, text=True, timeout=60)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        asked_after = server.texts()[mark:]
        clean = subprocess.run(_worker(server, tmp_path / "clean.db", tmp_path / "clean.json"), env=env,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert clean.returncode == 0, clean.stderr[-2000:]

    t = OpenAITeacher("http://unused/v1", "scripted-vl", api_key_env="SYNTH_TEST_KEY", max_tokens=64)
    key_of_text = {f"widget number {i}": TraceCache.key_for(product(f"widget number {i}"), t) for i in range(40)}
    assert not [text for text in asked_after if key_of_text[text] in cached_before]
    assert len(asked_after) == 40 - len(cached_before)

    resumed, uninterrupted = json.loads(out.read_text()), json.loads((tmp_path / "clean.json").read_text())
    assert len(resumed) == len(uninterrupted) == 40
    assert all(o["status"] == "ok" for o in resumed + uninterrupted)
    assert {o["item_id"]: o["trace"] for o in resumed} == {o["item_id"]: o["trace"] for o in uninterrupted}
    assert sum(o["cached"] for o in resumed) == len(cached_before)
    assert not key_leaks(rerun.stderr, rerun.stdout, clean.stderr, out.read_text())
