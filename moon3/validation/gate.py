"""The data validation gate: the first stage of every pipeline run (``moon3 validate``, DVC, Kubeflow).

Flow: read ``products``/``queries`` with Arrow and check the schema (a missing column or a wrong type fails the
gate with a message naming the file and the column) -> check each distinct image once -> compute the check
frames (:mod:`moon3.validation.checks`) -> run the GX suites on them (:mod:`moon3.validation.suites`) ->
quarantine rows that break row-level rules -> fail the gate on any table-level rule (uniqueness, split leakage,
empty table, reject fraction above ``max_reject_fraction``). An empty ``queries`` table (a products-only catalog)
is reported as a warning instead (:data:`EMPTY_QUERIES_RULES`).

Outputs:
    ``quarantine_dir/<table>.parquet``: rejected rows with a ``reasons`` column (list of rule names); always.
    ``out_dir/<table>.parquet``: accepted rows, same schema as the input; only when the gate passes.
    ``out_dir/attribute_vocabulary.json``: the attribute keys and values of the training split (see below).
    ``report_dir/gx_results.json``, ``validation_report.html``, ``validation_metrics.json``; always. Byte for byte
    the same for the same input (DVC outputs): the wall-clock ``seconds`` and ``rows_per_second`` (also in the
    returned metrics) go to ``report_dir/run.json`` instead, and GX's run ids and timestamps are left out.

Attribute vocabulary: learned from the data, not configured (:func:`.checks.learn_attribute_vocabulary`): the
training split's keys, and per key its values, with product counts. Eval products are checked against it: a
key or value never seen in training is flagged (``unseen_attribute_key`` / ``unseen_attribute_value``, reported
with the offending keys and values, never quarantined; :mod:`moon3.validation.checks` says why). The vocabulary's
counts and the unseen eval keys go into ``validation_metrics.json`` (``attribute_vocabulary``).
``validation.allowed_attribute_keys``, when set, restricts the keys in every split (``unknown_attribute_key``
quarantines the row).

Images are not copied. Relative image paths in the written tables are rebased so they still resolve:
by default relative to the folder the table is written to (``../prepared/images/...``), which works for DVC
(the input folder is a dependency of the stage, so it is always checked out beside the output) and on any one
filesystem. For a Kubeflow artifact handoff set ``validation.image_root`` to the input artifact's URI
(``gs://.../prepared``): paths become absolute URIs that resolve in any pod. Absolute paths and ``gs://`` URIs
in the input are kept as they are.

Hostile inputs (issue 14) are row reasons, never a hang or a traceback: image paths that are not regular files,
over the byte or pixel limits, outside the dataset folder or on an unreachable ``gs://`` (see
:mod:`moon3.validation.images`); when every ``gs://`` image fails, one blocking ``remote_images_unreadable``
failure says so. Columns outside the schema are dropped from the accepted tables and reported (an info failure
``dropped_columns`` naming them, and ``dropped_columns`` in the metrics).

A query whose positive product was quarantined is quarantined too (reason ``positive_product_quarantined``), so
no accepted query points at a product that is not in the accepted table.

Traces that arrive with the dataset (an optional ``traces.parquet``, ``TRACE_SCHEMA``) are carried through: a
schema error fails the gate like the other tables'; a trace whose product or query is missing or was quarantined
(``unknown_item``) or is not in the train split (``not_train_split``) is quarantined (two Arrow lookups, no GX
suite; these rows never fail the gate). Accepted traces go to ``out_dir/traces.parquet`` in input order; their
content is judged later by the trace gate of the ``synthesize`` stage. Rows in = accepted + quarantined here too.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moon3.common.provenance import RUN_FILE
from moon3.data.io import UnreadableFile, is_gcs, join_uri
from moon3.data.schema import PRODUCTS, QUERIES, SCHEMAS, TRACES, table_path
from moon3.validation.checks import (
    INFO,
    ROW,
    TABLE,
    TRACE_RULES,
    AttributeVocabulary,
    Check,
    learn_attribute_vocabulary,
    product_checks,
    product_frame,
    query_checks,
    query_frame,
    read_checked,
    trace_reasons,
)
from moon3.validation.config import ValidationConfig
from moon3.validation.images import REMOTE_ERROR, ImageLimits, check_images
from moon3.validation.report import render_html, write_json

TABLES = (PRODUCTS, QUERIES)
ID_COLUMN = {PRODUCTS: "product_id", QUERIES: "query_id", TRACES: "product_id"}
IMAGE_COLUMN = {PRODUCTS: "image", QUERIES: "query_image"}
TEXT_COLUMN = {PRODUCTS: "title", QUERIES: "query_text", TRACES: "query_id"}  # beside the id in quarantine examples
GX_RESULTS, HTML_REPORT, METRICS = "gx_results.json", "validation_report.html", "validation_metrics.json"
VOCABULARY = "attribute_vocabulary.json"  # in out_dir, beside the accepted tables
DETAILS_IN_MESSAGE = 10  # distinct offending keys/values a message names (with their row counts)
# An empty queries table is a products-only catalog, not a failure: these rules become warnings for it.
EMPTY_QUERIES_RULES = ("empty_table", "reject_fraction")
EMPTY_QUERIES_NOTE = (
    "no queries: a products-only catalog. Training uses intra-product pairs (title + attributes vs image); "
    "evaluation skips the query-based retrieval tasks"
)


@dataclass
class Failure:
    """A rule that failed: a GX expectation, a schema problem or an internal consistency check."""

    table: str
    check: str
    expectation: str
    column: str
    level: str  # table: fails the gate | row: rows quarantined | info: reported only
    count: int
    examples: list[str] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    message: str = ""

    @property
    def blocking(self) -> bool:
        """Whether this failure fails the gate."""
        return self.level == TABLE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``blocking``."""
        return {**asdict(self), "blocking": self.blocking}


@dataclass
class ValidationResult:
    """What :func:`validate` returns; it never raises on bad data."""

    passed: bool
    metrics: dict[str, Any]
    failures: list[Failure]
    out_dir: Path
    quarantine_dir: Path
    report_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def blocking(self) -> list[Failure]:
        """Failures that failed the gate."""
        return [f for f in self.failures if f.blocking]


def validate(
    cfg: ValidationConfig,
    in_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    quarantine_dir: str | Path | None = None,
    report_dir: str | Path | None = None,
    progress: bool = True,
) -> ValidationResult:
    """Validate a dataset folder; write accepted rows (on a pass), quarantine, GX results and reports.

    Args:
        cfg: the ``validation`` section; its folders are used where the arguments are ``None``.
        in_dir: dataset to validate (``products.parquet``, ``queries.parquet``, images, optional
            ``traces.parquet``).
        out_dir: accepted dataset, written only when the gate passes (stale tables there are removed first).
        quarantine_dir: ``<table>.parquet`` of rejected rows with ``reasons``.
        report_dir: ``gx_results.json``, ``validation_report.html``, ``validation_metrics.json``.
        progress: progress bars (image checks, GX suites).

    Returns:
        The verdict, metrics, failures and written paths. Bad data never raises; the caller decides (the CLI
        exits 1 when ``passed`` is false).
    """
    start = time.perf_counter()
    src = Path(in_dir or cfg.in_dir)
    out, quarantine, reports = (Path(p) for p in (out_dir or cfg.out_dir,
                                                  quarantine_dir or cfg.quarantine_dir,
                                                  report_dir or cfg.report_dir))  # fmt: skip
    run = _Run(cfg, src, out, quarantine, reports)
    run.clear_stale()
    if run.failures:
        return run.finish(start)
    arrow = run.read()
    if arrow is None:
        return run.finish(start)
    t = time.perf_counter()
    uris = arrow[PRODUCTS].column("image").unique().to_pylist()
    uris += [u for u in arrow[QUERIES].column("query_image").unique().to_pylist() if u is not None]
    limits = ImageLimits(
        max_bytes=cfg.max_image_bytes,
        max_pixels=cfg.max_image_pixels,
        remote_timeout_s=cfg.remote_timeout_s,
        allowed_dirs=tuple(cfg.allowed_image_dirs),
    )
    images = check_images(uris, src, decode=cfg.check_images, workers=cfg.image_workers, progress=progress,
                          limits=limits)  # fmt: skip
    run.timings["images"] = time.perf_counter() - t
    run.metrics["images"] = _image_metrics(images)
    run.check_remote(images)

    t = time.perf_counter()
    run.vocabulary = learn_attribute_vocabulary(arrow[PRODUCTS], cfg)
    frames = {PRODUCTS: product_frame(arrow[PRODUCTS], images, cfg, run.vocabulary)}
    checks = {PRODUCTS: product_checks(cfg), QUERIES: query_checks(cfg)}
    masks = {PRODUCTS: run.masks(PRODUCTS, frames[PRODUCTS], checks[PRODUCTS])}
    frames[QUERIES] = query_frame(arrow[QUERIES], arrow[PRODUCTS], run.quarantined[PRODUCTS], images)
    masks[QUERIES] = run.masks(QUERIES, frames[QUERIES], checks[QUERIES])
    if TRACES in arrow:
        run.check_traces(arrow)
    run.timings["checks"] = time.perf_counter() - t

    t = time.perf_counter()
    from moon3.validation.suites import run_suites

    for table in TABLES:
        results = run_suites(table, frames[table], checks[table], cfg.examples_per_failure, progress)
        run.gx_results[table] = [result.to_json_dict() for result in results]
        run.collect(table, frames[table], checks[table], masks[table], [r for res in results for r in res.results])
    run.timings["great_expectations"] = time.perf_counter() - t
    run.metrics[QUERIES]["split_leakage"] = _leakage(frames[QUERIES])
    run.metrics["attribute_vocabulary"] = _vocabulary_metrics(run.vocabulary, frames[PRODUCTS])

    t = time.perf_counter()
    run.write(arrow, frames)
    run.timings["write"] = time.perf_counter() - t
    return run.finish(start)


class _Run:
    """State of one gate run; keeps :func:`validate` a readable list of steps."""

    def __init__(self, cfg: ValidationConfig, src: Path, out: Path, quarantine: Path, reports: Path) -> None:
        self.cfg, self.src, self.out, self.quarantine, self.reports = cfg, src, out, quarantine, reports
        self.failures: list[Failure] = []
        self.metrics: dict[str, Any] = {"in_dir": str(src), "max_reject_fraction": cfg.max_reject_fraction}
        self.gx_results: dict[str, Any] = {}
        self.quarantined: dict[str, np.ndarray] = {}
        self.reasons: dict[str, list[list[str]]] = {}
        self.timings: dict[str, float] = {}
        self.paths: dict[str, Path] = {}
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self.vocabulary: AttributeVocabulary | None = None

    def clear_stale(self) -> None:
        """Refuse to write over the input; remove tables a previous run left in out_dir and quarantine_dir."""
        src = self.src.resolve()
        for name, folder in (("out_dir", self.out), ("quarantine_dir", self.quarantine)):
            if folder.resolve() == src:
                self._fail("config", f"{name}_is_in_dir", f"{name} {folder} is the input folder; it would be "
                           "overwritten: point it elsewhere")  # fmt: skip
        if self.failures:
            return
        for folder in (self.out, self.quarantine):
            for table in (*TABLES, TRACES):
                table_path(folder, table).unlink(missing_ok=True)
        (self.out / VOCABULARY).unlink(missing_ok=True)

    def read(self) -> dict[str, pa.Table] | None:
        """The input tables (``traces`` only when the dataset has one), or None after a schema error."""
        tables = {}
        optional = (TRACES,) if table_path(self.src, TRACES).exists() else ()
        for table in (*TABLES, *optional):
            arrow, errors, extra = read_checked(table_path(self.src, table), table)
            for err in errors:
                self._fail(table, "schema", err)
            if extra:
                self.metrics.setdefault("dropped_columns", {})[table] = extra
                message = (
                    f"{len(extra)} column{'' if len(extra) == 1 else 's'} not in the {table} schema "
                    f"{'is' if len(extra) == 1 else 'are'} dropped from the accepted table: {', '.join(extra)}"
                )
                self.failures.append(Failure(table, "dropped_columns", "schema", "", INFO, len(extra),
                                             list(extra), message=message))  # fmt: skip
            tables[table] = arrow
        return None if any(f.blocking for f in self.failures) else tables

    def check_remote(self, images: dict) -> None:
        """One blocking failure when there are ``gs://`` images and not one of them could be read (credentials,
        network): the rows are quarantined either way, but a whole remote catalog lost is a setup error."""
        remote = [(uri, c) for uri, c in images.items() if isinstance(uri, str) and is_gcs(uri)]
        if remote and all(c.status == REMOTE_ERROR for _, c in remote):
            self._fail("images", "remote_images_unreadable",
                       f"none of the {len(remote)} gs:// images could be read: {remote[0][1].error}; check "
                       "credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud auth application-default login) and "
                       "the network")  # fmt: skip

    def check_traces(self, arrow: dict[str, pa.Table]) -> None:
        """Quarantine traces whose item is not an accepted training product or query (see the module docstring)."""
        traces = arrow[TRACES]
        masks = trace_reasons(traces, arrow[PRODUCTS], arrow[QUERIES], self.quarantined)
        quarantined = np.logical_or.reduce(list(masks.values()))
        self.quarantined[TRACES] = quarantined
        self.reasons[TRACES] = [[name for name, mask in masks.items() if mask[i]] for i in np.flatnonzero(quarantined)]
        n, rejected = traces.num_rows, int(quarantined.sum())
        self.metrics[TRACES] = {
            "rows_in": n,
            "rows_accepted": n - rejected,
            "rows_quarantined": rejected,
            "reject_fraction": rejected / n if n else 0.0,
            "reasons": {name: int(mask.sum()) for name, mask in masks.items()},
        }
        if self.metrics[TRACES]["rows_accepted"] + rejected != n or len(self.reasons[TRACES]) != rejected:
            raise RuntimeError(f"traces: {n} rows in but {n - rejected} accepted + {rejected} quarantined")
        pairs = zip(traces.column("product_id").to_pylist(), traces.column("query_id").to_pylist(), strict=True)
        item_ids = [q if q is not None else p for p, q in pairs]
        k = self.cfg.examples_per_failure
        for name, mask in masks.items():
            count = int(mask.sum())
            if count:
                examples = [str(item_ids[i]) for i in np.flatnonzero(mask)[:k]]
                message = f"{TRACE_RULES[name]}: {count} row{'' if count == 1 else 's'} quarantined"
                self.failures.append(Failure(TRACES, name, name, "product_id/query_id", ROW, count, examples,
                                             message=message))  # fmt: skip

    def _fail(self, table: str, check: str, message: str) -> None:
        self.failures.append(Failure(table, check, check, "", TABLE, 1, message=message))

    def masks(self, table: str, frame: pd.DataFrame, checks: list[Check]) -> dict[str, np.ndarray]:
        """Evaluate each rule's mask; quarantine the union of the row-level ones (and add the column GX reads)."""
        masks = {c.name: np.asarray(c.bad(frame), dtype=bool) for c in checks if c.bad is not None}
        row = [c.name for c in checks if c.level == ROW]
        n = len(frame)
        stacked = np.stack([masks[name] for name in row], axis=1) if row else np.zeros((n, 0), dtype=bool)
        quarantined = stacked.any(axis=1)
        frame["quarantined"] = quarantined.astype(np.int8)
        self.quarantined[table] = quarantined
        picked = np.flatnonzero(quarantined)
        self.reasons[table] = [[row[j] for j in np.flatnonzero(r)] for r in stacked[picked]]
        accepted, rejected = int(n - len(picked)), int(len(picked))
        if accepted + rejected != n:  # cannot happen by construction; the gate promises it, so it checks it
            raise RuntimeError(f"{table}: {n} rows in but {accepted} accepted + {rejected} quarantined")
        self.metrics[table] = {
            "rows_in": n,
            "rows_accepted": accepted,
            "rows_quarantined": rejected,
            "reject_fraction": rejected / n if n else 0.0,
            "reasons": {name: int(masks[name].sum()) for name in row},
            "flagged": {c.name: int(masks[c.name].sum()) for c in checks if c.level == INFO},
        }
        return masks

    def collect(self, table: str, frame: pd.DataFrame, checks: list[Check], masks: dict, results: list) -> None:
        """Turn GX results into failures; cross-check GX's unexpected counts against the quarantine masks."""
        by_name = {c.name: c for c in checks}
        ids = frame[ID_COLUMN[table]].to_numpy()
        k = self.cfg.examples_per_failure
        for r in results:
            check = by_name[r.expectation_config.meta["check"]]
            res = r.result or {}
            mask = masks.get(check.name)
            gx_count = res.get("unexpected_count")
            if mask is not None and gx_count is not None and int(gx_count) != int(mask.sum()):
                self.failures.append(Failure(table, f"{check.name}_count_mismatch", r.expectation_config.type,
                                             check.column, TABLE, abs(int(gx_count) - int(mask.sum())),
                                             message=f"internal: GX counted {gx_count} unexpected rows, the "
                                             f"quarantine mask {int(mask.sum())}"))  # fmt: skip
            if r.success:
                continue
            exc = r.exception_info or {}
            if exc.get("raised_exception"):
                message = f"{check.description}: GX could not evaluate it: {exc.get('exception_message')}"
                self.failures.append(Failure(table, check.name, r.expectation_config.type, check.column,
                                             TABLE, 0, message=message))  # fmt: skip
                continue
            positions = res.get("partial_unexpected_index_list")
            if positions is None and mask is not None:
                positions = np.flatnonzero(mask)[:k].tolist()
            if check.name == "reject_fraction":
                positions = np.flatnonzero(self.quarantined[table])[:k].tolist()
            count = int(gx_count if gx_count is not None else self.metrics[table]["rows_quarantined"])
            level, message = check.level, _message(check, count, res, self.metrics[table])
            values = list(res.get("partial_unexpected_list", []))[:k]
            if check.detail and mask is not None:  # name what offends (keys, key=value), not the counted column
                positions = np.flatnonzero(mask)[:k].tolist()
                details = frame[check.detail].to_numpy()
                values = [", ".join(details[pos] or ()) for pos in positions]
                message += f"; {check.detail_name}: {_top_details(details[mask])}"
            if table == QUERIES and check.name in EMPTY_QUERIES_RULES and not self.metrics[table]["rows_in"]:
                level = INFO  # a products-only catalog: a warning row in the report, not a failure
                message = EMPTY_QUERIES_NOTE if check.name == "empty_table" else message
            self.failures.append(Failure(table, check.name, r.expectation_config.type, check.column, level,
                                         count, _ids(ids, positions or [])[:k],
                                         values, message))  # fmt: skip

    def write(self, arrow: dict[str, pa.Table], frames: dict[str, pd.DataFrame]) -> None:
        passed = not any(f.blocking for f in self.failures)
        tables = [t for t in (*TABLES, TRACES) if t in arrow]
        for table in tables:
            rejected = arrow[table].take(pa.array(np.flatnonzero(self.quarantined[table]), type=pa.int64()))
            if table in IMAGE_COLUMN:
                rejected = self._rebase(rejected, table, self.quarantine)
            rejected = rejected.append_column("reasons", pa.array(self.reasons[table], type=pa.list_(pa.string())))
            schema = pa.schema([f.with_nullable(True) for f in rejected.schema])  # missing ids must fit too
            path = table_path(self.quarantine, table)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(rejected.cast(schema), path, compression="zstd")
            self.paths[f"quarantine_{table}"] = path
            self.examples[table] = _examples(rejected, table)
        if not passed:
            return
        if self.vocabulary is not None:
            self.paths["attribute_vocabulary"] = write_json(self.out / VOCABULARY, self.vocabulary.to_dict())
        for table in tables:
            accepted = arrow[table].filter(pa.array(~self.quarantined[table]))
            if table in IMAGE_COLUMN:
                accepted = self._rebase(accepted, table, self.out)
            path = table_path(self.out, table)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Same schema and compression as moon3.data.schema.write_table, without the pandas round trip
            # (~10 s per 1M products).
            pq.write_table(pa.Table.from_arrays(accepted.columns, schema=SCHEMAS[table]), path, compression="zstd")
            self.paths[table] = path

    def _rebase(self, table: pa.Table, name: str, dest: Path) -> pa.Table:
        column = IMAGE_COLUMN[name]
        encoded = pc.dictionary_encode(table.column(column).combine_chunks())
        values = [_rebase_uri(u, self.src, dest, self.cfg.image_root) for u in encoded.dictionary.to_pylist()]
        rebased = pa.array(values, type=pa.string()).take(encoded.indices)
        return table.set_column(table.schema.get_field_index(column), table.schema.field(column), rebased)

    def finish(self, start: float) -> ValidationResult:
        self.failures.sort(key=lambda f: (not f.blocking, f.table, f.check))
        passed = not any(f.blocking for f in self.failures)
        total = time.perf_counter() - start
        rows = sum(self.metrics.get(t, {}).get("rows_in", 0) for t in TABLES)
        self.metrics.update(
            passed=passed,
            failed_rules=len(self.failures),
            blocking_failures=sum(f.blocking for f in self.failures),
            schema_errors=[f.message for f in self.failures if f.check == "schema"],
        )
        timing = {
            "seconds": {**{k: round(v, 3) for k, v in self.timings.items()}, "total": round(total, 3)},
            "rows_per_second": round(rows / total, 1) if total > 0 else 0.0,
        }
        failures = [f.to_dict() for f in self.failures]
        self.paths["gx_results"] = write_json(self.reports / GX_RESULTS, _without_run_ids(self.gx_results))
        self.paths["metrics"] = write_json(self.reports / METRICS, self.metrics)
        self.paths["run"] = write_json(self.reports / RUN_FILE, timing)
        html = render_html(passed, self.metrics, failures, self.gx_results, self.examples)
        self.paths["html_report"] = self.reports / HTML_REPORT
        self.paths["html_report"].write_text(html)
        self.metrics.update(timing)  # the caller's metrics keep them (bench, Kubeflow)
        return ValidationResult(passed, self.metrics, self.failures, self.out, self.quarantine, self.reports,
                                self.paths)  # fmt: skip


# What GX stamps on every validation result and that differs between two runs of the same data: ids and times.
GX_RUN_META = ("run_id", "validation_time", "validation_id")


def _without_run_ids(gx_results: dict[str, Any]) -> dict[str, Any]:
    """``{table: [suite result dict]}`` without :data:`GX_RUN_META` and ``batch_markers.ge_load_time`` in each
    ``meta``, and without each expectation's random ``id`` (its type, kwargs and ``meta.check`` name it)."""

    def suite(result: dict[str, Any]) -> dict[str, Any]:
        meta = {k: v for k, v in result.get("meta", {}).items() if k not in GX_RUN_META}
        if isinstance(meta.get("batch_markers"), dict):
            meta["batch_markers"] = {k: v for k, v in meta["batch_markers"].items() if k != "ge_load_time"}
        results = [
            {**r, "expectation_config": {k: v for k, v in r["expectation_config"].items() if k != "id"}}
            if isinstance(r.get("expectation_config"), dict) else r
            for r in result.get("results", [])
        ]  # fmt: skip
        return {**result, "meta": meta, "results": results}

    return {table: [suite(r) for r in results] for table, results in gx_results.items()}


def _rebase_uri(uri: str | None, src: Path, dest: Path, image_root: str) -> str | None:
    """Where ``uri`` (relative to ``src``) is found from a table written in ``dest``.

    Joined to an ``image_root`` the path is normalised (``a/./b`` -> ``a/b``); one that climbs out of it
    (``../x.png``, only ever in a quarantined row) is kept as the input wrote it, never turned into
    ``gs://b/run1/prepared/../x.png``.
    """
    if uri is None or is_gcs(uri) or os.path.isabs(uri):
        return uri
    if image_root:
        try:
            return join_uri(image_root, uri)
        except UnreadableFile:
            return uri
    return os.path.relpath(os.path.join(os.path.abspath(src), uri), os.path.abspath(dest))


def _ids(ids: np.ndarray, positions: list[int]) -> list[str]:
    out = []
    for pos in positions:
        value = ids[int(pos)]
        out.append(str(value) if isinstance(value, str) and value.strip() else f"row {int(pos)}")
    return out


def _message(check: Check, count: int, res: dict[str, Any], metrics: dict[str, Any]) -> str:
    if check.name == "reject_fraction" and not metrics["rows_in"]:
        return "no rows, so no reject fraction to measure"
    if check.name == "reject_fraction":
        return (f"{metrics['rows_quarantined']} of {metrics['rows_in']} rows quarantined "
                f"({metrics['reject_fraction']:.2%}); {check.description}")  # fmt: skip
    if check.name == "empty_table":
        return "the table has no rows"
    verb = {ROW: "quarantined", INFO: "flagged", TABLE: "break the rule"}[check.level]
    return f"{check.description}: {count} row{'' if count == 1 else 's'} {verb}"


def _top_details(rows: np.ndarray, limit: int = DETAILS_IN_MESSAGE) -> str:
    """``a (3 rows), b (1 row)``: the distinct offending items of the flagged rows, most frequent first."""
    counts = Counter(item for items in rows if items for item in set(items))
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{item} ({n} row{'' if n == 1 else 's'})" for item, n in top[:limit])
    return text + (f" and {len(top) - limit} more" if len(top) > limit else "")


def _vocabulary_metrics(vocabulary: AttributeVocabulary, products: pd.DataFrame) -> dict[str, Any]:
    """The vocabulary's counts plus what of the eval split it does not cover (keys by rows)."""
    unseen_keys = Counter(k for keys in products["unseen_attribute_keys"] if keys for k in set(keys))
    return {
        **vocabulary.summary(),
        "eval_products_with_unseen_keys": int((products["n_unseen_attribute_keys"] > 0).sum()),
        "eval_products_with_unseen_values": int((products["n_unseen_attribute_values"] > 0).sum()),
        "eval_unseen_keys": dict(sorted(unseen_keys.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def _examples(rejected: pa.Table, table: str, k: int = 10) -> list[dict[str, Any]]:
    head = rejected.slice(0, k).select([ID_COLUMN[table], TEXT_COLUMN[table], "reasons"])
    return head.to_pylist()


def _image_metrics(images: dict) -> dict[str, Any]:
    statuses = pd.Series([c.status for c in images.values()], dtype=object)
    return {"distinct": len(images), **{str(k): int(v) for k, v in statuses.value_counts().items()}}


def _leakage(frame: pd.DataFrame) -> dict[str, int]:
    q, p = frame["query_split"], frame["positive_split"]
    return {
        "train_query_eval_product": int(((q == "train") & (p == "eval")).sum()),
        "eval_query_train_product": int(((q == "eval") & (p == "train")).sum()),
    }
