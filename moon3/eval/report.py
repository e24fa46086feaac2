"""Evaluation outputs: metrics JSON, DVC plot data, matplotlib PNGs, and an HTML + Markdown report.

Files written under ``out_dir``::

    metrics.json                      numbers only, nested variant -> kind -> task -> metric (DVC metrics, MLflow)
    results.json                      everything: metrics, skipped tasks with reasons, curves, confusion matrix
    plots/recall_at_k/<task>.csv      DVC plot data: column ``k`` plus one Recall@K column per variant
    plots/recall_at_k_<task>.png      Recall@K curves, one line per variant
    plots/confusion_level_1_<v>.png   level-1 category confusion matrix of variant ``v``
    report.html                       one self-contained file (PNGs inlined as base64), for browsers and KFP UI
    report.md                         the same tables, PNGs linked

Metric names avoid ``@`` (``recall_at_10``) because MLflow rejects it in metric keys.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from moon3.eval.tasks import ATTRIBUTES, CLASSIFICATION, RETRIEVAL, RETRIEVAL_TASKS, TaskResult

TASK_LABELS = {
    "text_to_mm": "text→mm",
    "image_to_mm": "image→mm",
    "mm_to_mm": "mm→mm",
    "text_to_image": "text→image",
    "image_to_text": "image→text",
}
SKIPPED = "skipped"


def summarize(results: dict[str, list[TaskResult]], main_k: int) -> dict[str, Any]:
    """Collect task results of every variant into ``{"metrics", "skipped", "details"}``.

    ``metrics[variant]`` also gets a ``summary`` block with means over the tasks that ran:
    ``retrieval_mean_recall_at_{main_k}``, ``retrieval_mean_mrr``, ``classification_mean_accuracy`` and
    ``attributes_mean_accuracy`` (a mean over no task is left out, not NaN).
    """
    metrics: dict[str, Any] = {}
    skipped: dict[str, dict[str, str]] = {}
    details: dict[str, dict[str, Any]] = {}
    for variant, tasks in results.items():
        block: dict[str, Any] = {RETRIEVAL: {}, CLASSIFICATION: {}, ATTRIBUTES: {}}
        for task in tasks:
            if task.skipped is not None:
                skipped.setdefault(variant, {})[task.key] = task.skipped
            else:
                block[task.kind][task.name] = task.metrics
            if task.details:
                details.setdefault(variant, {})[task.key] = task.details
        summary = {}
        for name, kind, metric in (
            (f"retrieval_mean_recall_at_{main_k}", RETRIEVAL, f"recall_at_{main_k}"),
            ("retrieval_mean_mrr", RETRIEVAL, "mrr"),
            ("classification_mean_accuracy", CLASSIFICATION, "accuracy"),
            ("attributes_mean_accuracy", ATTRIBUTES, "accuracy"),
        ):
            values = [m[metric] for m in block[kind].values() if metric in m]
            if values:
                summary[name] = sum(values) / len(values)
        block["summary"] = summary
        metrics[variant] = block
    return {"metrics": metrics, "skipped": skipped, "details": details, "main_k": main_k}


def flatten_metrics(metrics: dict[str, Any], sep: str = "/") -> dict[str, float]:
    """``{"trained/retrieval/text_to_mm/mrr": 0.41, ...}`` for MLflow and KFP ``Metrics``."""
    flat: dict[str, float] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{sep}{key}" if prefix else str(key))
        elif isinstance(node, int | float) and not isinstance(node, bool) and math.isfinite(node):
            flat[prefix] = float(node)

    walk(metrics, "")
    return flat


# --- tables -----------------------------------------------------------------------------------------------


def main_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison table: one row per variant, columns = the main metrics.

    Columns: Recall@``main_k`` of each retrieval task, the mean MRR over retrieval tasks, accuracy of each
    category level, and the mean attribute accuracy. A task the variant skipped shows ``skipped``.
    """
    k = summary["main_k"]
    metrics = summary["metrics"]
    levels = sorted({name for m in metrics.values() for name in m[CLASSIFICATION]}, key=_level_number)
    columns = ["variant", *[f"{TASK_LABELS[t]} R@{k}" for t in RETRIEVAL_TASKS], "mean MRR"]
    columns += [f"category L{_level_number(level)} acc" for level in levels] + ["attribute acc (mean)"]
    rows = []
    for variant, m in metrics.items():
        row = [variant] + [_cell(m[RETRIEVAL].get(t), f"recall_at_{k}") for t in RETRIEVAL_TASKS]
        row.append(_cell(m["summary"], "retrieval_mean_mrr"))
        row += [_cell(m[CLASSIFICATION].get(level), "accuracy") for level in levels]
        row.append(_cell(m["summary"], "attributes_mean_accuracy"))
        rows.append(row)
    return columns, rows


def detail_tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) for retrieval per task, classification per level, attributes per type."""
    metrics = summary["metrics"]
    tables = []
    for kind, title, fields in (
        (RETRIEVAL, "Retrieval", None),
        (CLASSIFICATION, "Zero-shot category classification", ["accuracy", "macro_f1", "n"]),
        (ATTRIBUTES, "Zero-shot attribute prediction", ["accuracy", "macro_f1", "n"]),
    ):
        names = sorted({n for m in metrics.values() for n in m[kind]}, key=_task_order)
        if not names:
            continue
        if fields is None:  # retrieval: every recall_at_K any variant has, then mrr and n
            seen = dict.fromkeys(key for m in metrics.values() for v in m[kind].values() for key in v)
            fields = [key for key in seen if key != "n"] + ["n"]
        columns, rows = ["variant", "task", *fields], []
        for variant, m in metrics.items():
            for name in names:
                values = m[kind].get(name)
                rows.append([variant, TASK_LABELS.get(name, name)] + [_cell(values, key) for key in fields])
        tables.append((title, columns, rows))
    return tables


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_table_markdown(summary: dict[str, Any]) -> str:
    """The comparison table as Markdown (what ``moon3 evaluate`` prints)."""
    return markdown_table(*main_table(summary))


def _level_number(name: str) -> int:
    return int(name.rsplit("_", 1)[-1]) if name.rsplit("_", 1)[-1].isdigit() else 0


def _task_order(name: str) -> tuple[int, int, str]:
    if name in RETRIEVAL_TASKS:
        return (0, RETRIEVAL_TASKS.index(name), name)
    return (1, _level_number(name), name)


def _cell(values: dict[str, Any] | None, key: str) -> str:
    if values is None or key not in values:
        return SKIPPED
    value = values[key]
    return str(value) if isinstance(value, int) else f"{value:.3f}"


# --- files ------------------------------------------------------------------------------------------------


def write_plot_data(summary: dict[str, Any], plot_dir: Path) -> list[Path]:
    """One CSV per retrieval task: ``k`` then one Recall@K column per variant that ran the task."""
    written = []
    for task in RETRIEVAL_TASKS:
        curves = {
            v: d[f"{RETRIEVAL}/{task}"]["curve"]
            for v, d in summary["details"].items()
            if f"{RETRIEVAL}/{task}" in d and "curve" in d[f"{RETRIEVAL}/{task}"]
        }
        if not curves:
            continue
        ks = sorted({int(k) for c in curves.values() for k in c})
        path = plot_dir / "recall_at_k" / f"{task}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["k", *curves])
            for k in ks:
                writer.writerow([k, *[_curve_value(c, k) for c in curves.values()]])
        written.append(path)
    return written


def _curve_value(curve: dict, k: int) -> str:
    value = curve.get(k, curve.get(str(k)))
    return "" if value is None else f"{value:.6f}"


def plot_recall_curves(summary: dict[str, Any], plot_dir: Path) -> list[Path]:
    """One PNG per retrieval task with a Recall@K line per variant (log-scaled K)."""
    written = []
    for task in RETRIEVAL_TASKS:
        key = f"{RETRIEVAL}/{task}"
        curves = {v: d[key]["curve"] for v, d in summary["details"].items() if key in d and d[key].get("curve")}
        if not curves:
            continue
        fig = Figure(figsize=(5, 3.6), dpi=100)
        ax = fig.add_subplot()
        for variant, curve in curves.items():
            ks = sorted(int(k) for k in curve)
            ax.plot(ks, [_curve_float(curve, k) for k in ks], marker="o", markersize=3, label=variant)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K")
        ax.set_title(f"Recall@K: {TASK_LABELS[task]}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = plot_dir / f"recall_at_k_{task}.png"
        fig.savefig(path)
        written.append(path)
    return written


def _curve_float(curve: dict, k: int) -> float:
    return float(curve.get(k, curve.get(str(k))))


def plot_confusion(summary: dict[str, Any], plot_dir: Path) -> list[Path]:
    """Level-1 confusion matrix PNG per variant (rows true, columns predicted)."""
    written = []
    for variant, d in summary["details"].items():
        entry = d.get(f"{CLASSIFICATION}/level_1")
        if not entry or "confusion" not in entry:
            continue
        labels, matrix = entry["labels"], entry["confusion"]
        size = max(3.5, 0.45 * len(labels) + 2)
        fig = Figure(figsize=(size, size), dpi=100)
        ax = fig.add_subplot()
        image = ax.imshow(matrix, cmap="Blues")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Level-1 categories: {variant}")
        if len(labels) <= 20:
            peak = max((max(r) for r in matrix), default=0)
            for i, row in enumerate(matrix):
                for j, count in enumerate(row):
                    color = "white" if peak and count > peak / 2 else "black"
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
        fig.tight_layout()
        path = plot_dir / f"confusion_level_1_{_safe(variant)}.png"
        fig.savefig(path)
        written.append(path)
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_report(summary: dict[str, Any], out_dir: str | Path, title: str = "MOON3 evaluation") -> dict[str, str]:
    """Write every output file (see the module docstring) and return their paths by role."""
    out = Path(out_dir)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary["metrics"], indent=2, sort_keys=False) + "\n")
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    csvs = write_plot_data(summary, plot_dir)
    pngs = plot_recall_curves(summary, plot_dir) + plot_confusion(summary, plot_dir)
    (out / "report.md").write_text(render_markdown(summary, pngs, out, title))
    (out / "report.html").write_text(render_html(summary, pngs, title))
    return {
        "metrics": str(out / "metrics.json"),
        "results": str(out / "results.json"),
        "html": str(out / "report.html"),
        "markdown": str(out / "report.md"),
        "plots": str(plot_dir),
        "plot_data": ";".join(str(p) for p in csvs),
    }


def _skipped_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"{variant}: not evaluated: {reason}" for variant, reason in summary.get("missing", {}).items()]
    lines += [f"{variant}: {key}: {reason}" for variant, s in summary["skipped"].items() for key, reason in s.items()]
    return lines


def render_markdown(summary: dict[str, Any], pngs: list[Path], out: Path, title: str) -> str:
    """The report as Markdown: main table, detail tables, skipped tasks, linked plots."""
    parts = [f"# {title}", "", "## Comparison", "", main_table_markdown(summary), ""]
    for table_title, columns, rows in detail_tables(summary):
        parts += [f"## {table_title}", "", markdown_table(columns, rows), ""]
    skipped = _skipped_lines(summary)
    if skipped:
        parts += ["## Skipped", "", *[f"- {line}" for line in skipped], ""]
    if pngs:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in pngs] + [""]
    return "\n".join(parts)


def _html_table(columns: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"skip" if c == SKIPPED else ""}">{html.escape(c)}</td>' for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
    "td.skip{color:#999;font-style:italic}img{max-width:520px;margin:8px}"
)


def render_html(summary: dict[str, Any], pngs: list[Path], title: str) -> str:
    """The report as one self-contained HTML page (PNGs inlined as base64 data URIs)."""
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        "<h2>Comparison</h2>",
        _html_table(*main_table(summary)),
    ]
    for table_title, columns, rows in detail_tables(summary):
        parts += [f"<h2>{html.escape(table_title)}</h2>", _html_table(columns, rows)]
    skipped = _skipped_lines(summary)
    if skipped:
        parts += ["<h2>Skipped</h2><ul>"] + [f"<li>{html.escape(line)}</li>" for line in skipped] + ["</ul>"]
    if pngs:
        parts.append("<h2>Plots</h2><div>")
        for path in pngs:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f"<img alt='{html.escape(path.stem)}' src='data:image/png;base64,{data}'>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
