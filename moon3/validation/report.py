"""The human report of the gate: one self-contained HTML file (no scripts, inline CSS).

It renders in a browser and in the Kubeflow UI (an HTML artifact / ``Markdown``-free visualisation): verdict,
row counts per table, the failed rules with counts and example ids, and every expectation GX evaluated.

The building blocks (:data:`CSS`, :func:`esc`, :func:`short`, :func:`html_table`, :func:`page`,
:func:`write_json`) are public: the trace gate of the ``synthesize`` stage renders its report with them.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;font-size:14px}
th{background:#f3f3f3}.pass{color:#137333}.fail{color:#c5221f}.warning{color:#b06000}.info{color:#555}
code{font-size:12px}pre{white-space:pre-wrap;font-size:12px;background:#f7f7f7;padding:4px;margin:0}
"""


def esc(value: Any) -> str:
    """``value`` as escaped HTML text."""
    return html.escape(str(value))


def html_table(header: list[str], rows: list[list[Any]], raw: Iterable[int] = frozenset()) -> str:
    """An HTML table; every cell is escaped except the columns whose positions are in ``raw`` (markup)."""
    raw = set(raw)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if i in raw else esc(c)}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def short(value: Any, limit: int = 160) -> str:
    """``value`` as text (JSON unless a string), cut to ``limit`` characters with ``...``."""
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def page(title: str, parts: Iterable[str]) -> str:
    """A self-contained HTML page: ``title`` as its title and heading, then ``parts`` (markup) in order."""
    head = f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style>"
    return "\n".join([f"{head}</head><body><h1>{esc(title)}</h1>", *parts, "</body></html>"])


def render_html(
    passed: bool,
    metrics: dict[str, Any],
    failures: list[dict[str, Any]],
    gx_results: dict[str, Any],
    quarantine_examples: dict[str, list[dict[str, Any]]],
) -> str:
    """Render the report.

    Args:
        passed: the verdict.
        metrics: ``validation_metrics.json`` content.
        failures: failed rules (``Failure.to_dict()``), blocking ones first.
        gx_results: ``{table: [ExpectationSuiteValidationResult.to_json_dict(), ...]}`` (one suite per
            check-frame column); empty after a schema error.
        quarantine_examples: a few quarantined rows per table (id, title/text, reasons).
    """
    verdict = '<h2 class="pass">PASSED</h2>' if passed else '<h2 class="fail">FAILED</h2>'
    parts = [verdict]
    parts.append(f"<p>input <code>{esc(metrics.get('in_dir', ''))}</code>; "
                 f"max reject fraction {metrics.get('max_reject_fraction', 0):.2%}</p>")  # fmt: skip
    counts = []
    for table in ("products", "queries", "traces"):
        m = metrics.get(table) or {}
        if m:
            counts.append([table, m.get("rows_in"), m.get("rows_accepted"), m.get("rows_quarantined"),
                           f"{m.get('reject_fraction', 0):.3%}"])  # fmt: skip
    if counts:
        parts.append("<h2>Rows</h2>" + html_table(["table", "in", "accepted", "quarantined", "fraction"], counts))
    dropped = metrics.get("dropped_columns") or {}
    if dropped:
        rows = [[table, ", ".join(names)] for table, names in dropped.items()]
        parts.append("<h2>Dropped columns</h2><p>not part of the schema; left out of the accepted tables</p>"
                     + html_table(["table", "columns"], rows))  # fmt: skip
    parts.extend(_vocabulary_section(metrics.get("attribute_vocabulary")))
    parts.append("<h2>Failed rules</h2>")
    if failures:
        rows = []
        for f in failures:
            level = f"<span class='{'fail' if f['blocking'] else 'warning'}'>{esc(f['level'])}</span>"
            rows.append([f["table"], f["check"], level, f["count"], ", ".join(map(str, f["examples"])),
                         short(f.get("values", [])), f["message"]])  # fmt: skip
        header = ["table", "rule", "level", "count", "example ids", "example values", "message"]
        parts.append(html_table(header, rows, raw={2}))
    else:
        parts.append("<p>none</p>")
    for table, rows in quarantine_examples.items():
        if rows:
            parts.append(f"<h3>Quarantined {esc(table)} (first {len(rows)})</h3>")
            parts.append(html_table(list(rows[0]), [[short(v, 80) for v in r.values()] for r in rows]))
    for table, suites in gx_results.items():
        parts.append(f"<h2>Expectations: {esc(table)}</h2>")
        rows = []
        for r in (r for suite in suites for r in suite.get("results", [])):
            cfg = r.get("expectation_config", {})
            res = r.get("result", {})
            kwargs = {k: v for k, v in cfg.get("kwargs", {}).items() if k != "batch_id"}
            ok = "<span class='pass'>pass</span>" if r.get("success") else "<span class='fail'>fail</span>"
            observed = res.get("observed_value", res.get("unexpected_count", ""))
            rows.append([cfg.get("meta", {}).get("check", ""), cfg.get("type", ""), short(kwargs),
                         cfg.get("severity", ""), ok, short(observed),
                         short(res.get("partial_unexpected_list", []))])  # fmt: skip
        header = ["rule", "expectation", "kwargs", "severity", "result", "observed / unexpected", "examples"]
        parts.append(html_table(header, rows, raw={4}))
    return page("moon3 data validation", parts)


def _vocabulary_section(vocabulary: dict[str, Any] | None, max_keys: int = 50) -> list[str]:
    """The attribute vocabulary the gate learned: keys with their distinct values, and what eval adds."""
    if not vocabulary:
        return []
    allowed = vocabulary.get("allowed_attribute_keys")
    origin = f"override allowed_attribute_keys {esc(allowed)}, values from" if allowed else "learned from"
    v = vocabulary.get
    text = (
        f"<p>{origin} the training split ({v('train_products', 0)} products): {v('keys', 0)} keys, "
        f"{v('values', 0)} distinct values. Eval products with a key never seen in training: "
        f"{v('eval_products_with_unseen_keys', 0)}; with an unseen value: {v('eval_products_with_unseen_values', 0)} "
        "(flagged, not quarantined).</p>"
    )
    per_key = list(vocabulary.get("values_per_key", {}).items())
    rows = [[key, n] for key, n in per_key[:max_keys]]
    if len(per_key) > max_keys:
        rows.append([f"... {len(per_key) - max_keys} more keys", ""])
    unseen = vocabulary.get("eval_unseen_keys") or {}
    parts = ["<h2>Attribute vocabulary</h2>", text, html_table(["key", "distinct values"], rows)]
    if unseen:
        parts.append(html_table(["eval-only key", "eval products"], [[k, n] for k, n in unseen.items()]))
    return parts


def write_json(path: Path, payload: Any) -> Path:
    """Write indented UTF-8 JSON (numpy scalars and paths as plain values; any script stays readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_plain, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
