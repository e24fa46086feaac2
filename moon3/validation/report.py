"""The human report of the gate: one self-contained HTML file (no scripts, inline CSS).

It renders in a browser and in the Kubeflow UI (an HTML artifact / ``Markdown``-free visualisation): verdict,
row counts per table, the failed rules with counts and example ids, and every expectation GX evaluated.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;font-size:14px}
th{background:#f3f3f3}.pass{color:#137333}.fail{color:#c5221f}.warning{color:#b06000}.info{color:#555}
code{font-size:12px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]], raw: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if i in raw else _e(c)}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>moon3 validation</title>"
             f"<style>{_CSS}</style></head><body><h1>moon3 data validation</h1>{verdict}"]  # fmt: skip
    parts.append(f"<p>input <code>{_e(metrics.get('in_dir', ''))}</code>; "
                 f"max reject fraction {metrics.get('max_reject_fraction', 0):.2%}</p>")  # fmt: skip
    counts = []
    for table in ("products", "queries"):
        m = metrics.get(table) or {}
        if m:
            counts.append([table, m.get("rows_in"), m.get("rows_accepted"), m.get("rows_quarantined"),
                           f"{m.get('reject_fraction', 0):.3%}"])  # fmt: skip
    if counts:
        parts.append("<h2>Rows</h2>" + _table(["table", "in", "accepted", "quarantined", "fraction"], counts))
    parts.append("<h2>Failed rules</h2>")
    if failures:
        rows = []
        for f in failures:
            level = f"<span class='{'fail' if f['blocking'] else 'warning'}'>{_e(f['level'])}</span>"
            rows.append([f["table"], f["check"], level, f["count"], ", ".join(map(str, f["examples"])),
                         _short(f.get("values", [])), f["message"]])  # fmt: skip
        header = ["table", "rule", "level", "count", "example ids", "example values", "message"]
        parts.append(_table(header, rows, raw={2}))
    else:
        parts.append("<p>none</p>")
    for table, rows in quarantine_examples.items():
        if rows:
            parts.append(f"<h3>Quarantined {_e(table)} (first {len(rows)})</h3>")
            parts.append(_table(list(rows[0]), [[_short(v, 80) for v in r.values()] for r in rows]))
    for table, suites in gx_results.items():
        parts.append(f"<h2>Expectations: {_e(table)}</h2>")
        rows = []
        for r in (r for suite in suites for r in suite.get("results", [])):
            cfg = r.get("expectation_config", {})
            res = r.get("result", {})
            kwargs = {k: v for k, v in cfg.get("kwargs", {}).items() if k != "batch_id"}
            ok = "<span class='pass'>pass</span>" if r.get("success") else "<span class='fail'>fail</span>"
            observed = res.get("observed_value", res.get("unexpected_count", ""))
            rows.append([cfg.get("meta", {}).get("check", ""), cfg.get("type", ""), _short(kwargs),
                         cfg.get("severity", ""), ok, _short(observed),
                         _short(res.get("partial_unexpected_list", []))])  # fmt: skip
        header = ["rule", "expectation", "kwargs", "severity", "result", "observed / unexpected", "examples"]
        parts.append(_table(header, rows, raw={4}))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_json(path: Path, payload: Any) -> Path:
    """Write indented JSON (numpy scalars and paths as plain values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    return path


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
