"""The evaluation report as Markdown and as one self-contained HTML page (plots and thumbnails inlined).

Section order: provenance, trace synthesis (the counts of the traces the model was trained on), the "below the
non-learned references" block, the comparison table (with chance and majority rows, and the tasks measured on
queries derived from multimodal ones), reasoning modes and traces, paired deltas vs the trained model (ablations,
baselines, references), per-task details, qualitative examples, what was not scored, plots.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from moon3.eval.tables import (
    NOT_APPLICABLE,
    ROLE_TITLES,
    SKIPPED,
    TASK_LABELS,
    below_reference_lines,
    delta_tables,
    detail_tables,
    main_table,
    markdown_table,
    mode_table,
)

DELTA_NOTE = (
    "Delta = variant − trained on the same queries / items; 95% CI = paired bootstrap percentile interval; "
    "an interval containing 0 reads as within noise."
)
MEANS_NOTE = (
    "Means are over the tasks each row ran (a reference skips the tasks whose sides share none of its "
    "modalities). Chance: K / gallery size, 1 / classes; majority: share of the most frequent class."
)

DERIVED_TITLE = "Tasks measured on derived queries (the catalog has none of that type)"


NO_ABLATIONS = (
    "No ablation model was evaluated: eval.ablation_dirs lists none, or none of its folders holds a saved model "
    "(see Not scored)."
)


def _has_ablations(summary: dict[str, Any]) -> bool:
    return "ablation" in summary.get("roles", {}).values()


def _yes_no(value: Any) -> str:
    return {True: "yes", False: "no"}.get(value, "unknown")


def provenance_lines(prov: dict[str, Any]) -> list[str]:
    """The provenance block as plain lines (dataset, models, code and params, date)."""
    if not prov:
        return []
    d = prov["dataset"]
    counts = lambda c: ", ".join(f"{k} {v}" for k, v in c.items())  # noqa: E731
    source = d.get("source") or "unknown"
    source_from = f", from {d['source_from']}" if d.get("source_from") else ""
    lines = [
        f"Dataset: {d['data_dir']} (source: {source}{source_from})",
        f"Products by split: {counts(d['products_by_split'])}; queries by split: {counts(d['queries_by_split'])}",
        f"Eval queries by type: {counts(d['eval_queries_by_type'])} (category queries are a training signal, "
        "measured by zero-shot classification, not retrieval)",
        f"Evaluated: gallery of {d['gallery_size']} eval products; queries {counts(d['evaluated_queries'])}",
    ]
    folders: dict[str, list[str]] = {}
    for variant, m in prov.get("models", {}).items():
        folders.setdefault(m["path"], []).append(variant)
    for variants in folders.values():
        m = prov["models"][variants[0]]
        t, c = m.get("training", {}), m.get("contract", {})
        switches = ", ".join(f"{k} {'on' if v else 'off'}" for k, v in (t.get("switches") or m["switches"]).items())
        training = (
            f"stage {t.get('stage', 'unknown')}, {t.get('steps', '?')} steps, traces {_yes_no(t.get('traces'))}, "
            f"seed {t.get('seed', '?')}, ablation {t.get('ablation') or 'none'}"
            if t
            else "no training record in moon3_config.json"
        )
        lines.append(
            f"Model {', '.join(variants)}: {m['path']}: {training}; switches {switches}; contract reasoning "
            f"{'on' if c.get('reasoning') else 'off'}, trained with traces {_yes_no(c.get('trained_with_traces'))}"
        )
    if "code" not in prov:  # the report files: what changes from run to run is in run.json beside them
        lines.append(
            "Code and params of a DVC run: its dvc.lock entry (md5 of the code the stage imports, the params it "
            "reads); this run's git commit, whole-config params hash, date and timings: run.json beside this report"
        )
        return lines
    code, params = prov["code"], prov["params"]
    dirty = {True: " (dirty: uncommitted changes)", False: "", None: ""}[code.get("dirty")]
    lines.append(
        f"Code: git {code.get('git_sha') or 'unknown'}{dirty}; params hash {params['hash']} ({params['scope']}); "
        f"date {prov['date']}"
    )
    return lines


SYNTHESIS_TITLE = "Trace synthesis"


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _reasons(rejected: dict[str, int] | None) -> str:
    rejected = rejected or {}
    detail = ", ".join(f"{reason} {n}" for reason, n in sorted(rejected.items()))
    return f"{sum(rejected.values())} rejected" + (f" ({detail})" if detail else "")


def synthesis_lines(summary: dict[str, Any]) -> list[str]:
    """The trace synthesis section as plain lines (empty: no section, ``eval.synthesis_report`` is '')."""
    syn = summary.get("synthesis")
    if not syn:
        return []
    if syn.get("missing"):
        return [f"Synthesis report {syn['path']}: missing ({syn['missing']}); the traces' counts are not known here."]
    mean_tokens = "n/a" if syn.get("mean_tokens") is None else f"{syn['mean_tokens']:.1f}"
    lines = [
        f"Teacher {syn.get('teacher')}: {syn.get('in')} in, {syn.get('accepted')} accepted, "
        f"{_reasons(syn.get('rejected'))}, {syn.get('failed')} failed; claim accuracy "
        f"{_fraction(syn.get('claim_accuracy'))}, mean trace tokens {mean_tokens}",
        f"Not asked: {syn.get('not_asked')} items the teacher has no facts for, {syn.get('covered_by_imported')} "
        "with an accepted imported trace",
    ]
    imported = syn.get("imported")
    if imported:
        lines.append(
            f"Imported traces: {imported.get('in')} in, {imported.get('accepted')} accepted, "
            f"{_reasons(imported.get('rejected'))}"
        )
    trained = ((summary.get("provenance") or {}).get("models") or {}).get(summary.get("against", "trained"), {})
    if (trained.get("training") or {}).get("traces") is False:
        lines.append("The trained model's record says it was trained without traces: these counts did not reach it")
    lines.append(f"Full report: {syn.get('report_html') or 'unknown'} (counts from {syn['path']})")
    return lines


def derived_lines(summary: dict[str, Any]) -> list[str]:
    """One line per task measured on derived queries (e.g. text views of multimodal queries), saying so."""
    return [f"{_task_name(key)}: {note}" for key, note in (summary.get("notes") or {}).items()]


def _task_name(key: str) -> str:
    kind, _, name = key.partition("/")
    return TASK_LABELS.get(name, name) if kind == "retrieval" else key


def not_scored_lines(summary: dict[str, Any]) -> list[str]:
    """Variants not evaluated, then skipped tasks: once for all variants when they all skip a task for the same
    reason, else per variant with the tasks that share a reason on one line."""
    lines = [f"{variant}: not evaluated: {reason}" for variant, reason in summary.get("missing", {}).items()]
    skipped = summary["skipped"]
    variants = list(summary["metrics"])
    shared = {}
    for key in dict.fromkeys(key for s in skipped.values() for key in s):
        reasons = {skipped.get(v, {}).get(key) for v in variants}
        if len(reasons) == 1 and None not in reasons:
            shared[key] = reasons.pop()
    lines += [f"all variants: {key}: {reason}" for key, reason in shared.items()]
    for variant, tasks in skipped.items():
        by_reason: dict[str, list[str]] = {}
        for key, reason in tasks.items():
            if key not in shared:
                by_reason.setdefault(reason, []).append(key)
        lines += [f"{variant}: {reason}: {', '.join(keys)}" for reason, keys in by_reason.items()]
    return lines


def printable(text: str) -> str:
    """``text`` with control and undecodable characters escaped (a forced trace can contain any byte)."""
    return "".join(c if c.isprintable() and c != "\ufffd" else c.encode("unicode_escape").decode("ascii") for c in text)


def _example_caption(e: dict[str, Any]) -> str:
    return f"{TASK_LABELS[e['task']]} query {e['query_id']} (positive {e['positive_id']} at rank {e['rank']})"


# --- Markdown ---------------------------------------------------------------------------------------------


def render_markdown(summary: dict[str, Any], pngs: list[Path], out: Path, title: str) -> str:
    """The report as Markdown (plots linked, examples listed by product id)."""
    parts = [f"# {title}", "", "## Provenance", ""]
    parts += [f"- {line}" for line in provenance_lines(summary.get("provenance"))]
    synthesis = synthesis_lines(summary)
    if synthesis:
        parts += ["", f"## {SYNTHESIS_TITLE}", "", *[f"- {line}" for line in synthesis]]
    warning, lines = below_reference_lines(summary)
    head = "## ⚠ Below the non-learned references" if warning else "## Non-learned references"
    parts += ["", head, "", *[f"- {line}" if i else line for i, line in enumerate(lines)], ""]
    parts += ["## Comparison", "", markdown_table(*main_table(summary)), "", MEANS_NOTE, ""]
    derived = derived_lines(summary)
    if derived:
        parts += [DERIVED_TITLE + ":", "", *[f"- {line}" for line in derived], ""]
    parts += ["## Reasoning modes", "", markdown_table(*mode_table(summary)), ""]
    for variant, mode in summary.get("modes", {}).items():
        for trace in mode.get("example_traces", []):
            parts.append(f"- {variant} trace: `{printable(trace)}`")
    for table_title, columns, rows in delta_tables(summary):
        parts += ["", f"## {table_title}", "", DELTA_NOTE, "", markdown_table(columns, rows)]
    if not _has_ablations(summary):
        parts += ["", f"## {ROLE_TITLES['ablation']}", "", NO_ABLATIONS]
    for table_title, columns, rows in detail_tables(summary):
        parts += ["", f"## {table_title}", "", markdown_table(columns, rows)]
    examples = summary.get("examples", [])
    if examples:
        parts += ["", f"## Examples: {summary.get('against', 'trained')} top-5", ""]
        for e in examples:
            top = ", ".join(p["product_id"] + (" ✓" if p["positive"] else "") for p in e["top"])
            query = f" “{e['query_text']}”" if e.get("query_text") else ""
            parts.append(f"- {_example_caption(e)}{query}: {top}")
            if e.get("trace"):
                parts.append(f"  - trace: `{printable(e['trace'])}`")
    skipped = not_scored_lines(summary)
    if skipped:
        parts += ["", "## Not scored", "", *[f"- {line}" for line in skipped]]
    if pngs:
        parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in pngs]
    return "\n".join(parts) + "\n"


# --- HTML -------------------------------------------------------------------------------------------------

_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
    "td.skip{color:#999;font-style:italic}img.plot{max-width:520px;margin:8px}"
    ".warn{background:#fff3cd;border:2px solid #d39e00;padding:0.5em 1em}"
    ".ok{background:#e8f5e9;border:1px solid #4caf50;padding:0.5em 1em}"
    ".ex{display:flex;gap:6px;align-items:flex-start;margin:6px 0}.ex figure{margin:0;width:96px;font-size:11px}"
    ".ex img{border:3px solid transparent}.ex .pos img{border-color:#2e7d32}.ex .query{width:180px}"
    "pre{white-space:pre-wrap;font-size:12px;background:#f7f7f7;padding:4px}"
)


def _html_table(columns: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"skip" if c in (SKIPPED, NOT_APPLICABLE) else ""}">{html.escape(c)}</td>' for c in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(thumb: str | None, caption: str, css: str = "") -> str:
    image = f"<img src='{thumb}' alt=''>" if thumb else ""
    return f"<figure class='{css}'>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _pos(product: dict[str, Any]) -> str:
    return "pos" if product["positive"] else ""


def _examples_html(examples: list[dict[str, Any]]) -> list[str]:
    parts = []
    for e in examples:
        query = _figure(e.get("query_thumb"), e.get("query_text") or "(image query)", "query")
        top = "".join(
            _figure(p["thumb"], f"{'✓ ' if p['positive'] else ''}{p['product_id']}: {p['title']}", _pos(p))
            for p in e["top"]
        )
        if not any(p["positive"] for p in e["top"]):  # show what should have been found
            caption = f"positive at rank {e['rank']}: {e['positive_id']}: {e['positive_title']}"
            top += "<span>…</span>" + _figure(e.get("positive_thumb"), caption, "pos")
        parts.append(f"<h4>{html.escape(_example_caption(e))}</h4><div class='ex'>{query}{top}</div>")
        if e.get("trace"):
            parts.append(f"<pre>trace: {html.escape(printable(e['trace']))}</pre>")
    return parts


def _synthesis_html(summary: dict[str, Any], out: Path | None) -> list[str]:
    lines = synthesis_lines(summary)
    if not lines:
        return []
    items = [f"<li>{html.escape(line)}</li>" for line in lines]
    syn = summary["synthesis"]
    report = syn.get("report_html")
    if report and out is not None and not syn.get("missing"):  # the last line names the full report: link it
        href = Path(report) if Path(report).is_absolute() else Path(os.path.relpath(report, out))
        link = f"<a href='{html.escape(href.as_posix())}'>{html.escape(report)}</a>"
        items[-1] = f"<li>Full report: {link} (counts from {html.escape(syn['path'])})</li>"
    return [f"<h2>{SYNTHESIS_TITLE}</h2><ul>", *items, "</ul>"]


def render_html(summary: dict[str, Any], pngs: list[Path], title: str, out: Path | None = None) -> str:
    """The report as one self-contained HTML page (PNGs and thumbnails inlined as base64 data URIs); ``out``, its
    folder, makes the link to the full synthesis report relative."""
    esc = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>",
        "<h2>Provenance</h2><ul>",
        *[f"<li>{esc(line)}</li>" for line in provenance_lines(summary.get("provenance"))],
        "</ul>",
        *_synthesis_html(summary, out),
    ]
    warning, lines = below_reference_lines(summary)
    head = "⚠ Below the non-learned references" if warning else "Non-learned references"
    items = "".join(f"<li>{esc(line)}</li>" for line in lines[1:])
    parts.append(
        f"<div class='{'warn' if warning else 'ok'}'><h2>{head}</h2><p>{esc(lines[0])}</p>"
        + (f"<ul>{items}</ul>" if items else "")
        + "</div>"
    )
    parts += ["<h2>Comparison</h2>", _html_table(*main_table(summary)), f"<p>{esc(MEANS_NOTE)}</p>"]
    derived = derived_lines(summary)
    if derived:
        parts += [f"<p>{esc(DERIVED_TITLE)}:</p><ul>", *[f"<li>{esc(line)}</li>" for line in derived], "</ul>"]
    parts += ["<h2>Reasoning modes</h2>", _html_table(*mode_table(summary))]
    for variant, mode in summary.get("modes", {}).items():
        parts += [f"<pre>{esc(variant)} trace: {esc(printable(t))}</pre>" for t in mode.get("example_traces", [])]
    for table_title, columns, rows in delta_tables(summary):
        parts += [f"<h2>{esc(table_title)}</h2><p>{esc(DELTA_NOTE)}</p>", _html_table(columns, rows)]
    if not _has_ablations(summary):
        parts.append(f"<h2>{esc(ROLE_TITLES['ablation'])}</h2><p>{esc(NO_ABLATIONS)}</p>")
    for table_title, columns, rows in detail_tables(summary):
        parts += [f"<h2>{esc(table_title)}</h2>", _html_table(columns, rows)]
    if summary.get("examples"):
        parts.append(f"<h2>Examples: {esc(summary.get('against', 'trained'))} top-5</h2>")
        parts += _examples_html(summary["examples"])
    skipped = not_scored_lines(summary)
    if skipped:
        parts += ["<h2>Not scored</h2><ul>"] + [f"<li>{esc(line)}</li>" for line in skipped] + ["</ul>"]
    if pngs:
        parts.append("<h2>Plots</h2><div>")
        for path in pngs:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f"<img class='plot' alt='{esc(path.stem)}' src='data:image/png;base64,{data}'>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
