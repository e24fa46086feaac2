"""The report's tables, as (columns, rows) of strings, from the summary :func:`moon3.eval.report.summarize` builds.

Cells: numbers with 3 decimals, ``skipped`` where a variant did not run a task, ``—`` where a reference row has
no value by construction (majority-class has no ranking).
"""

from __future__ import annotations

from typing import Any

from moon3.eval.tasks import (
    ATTRIBUTES,
    ATTRIBUTES_IMAGE,
    CLASSIFICATION,
    CLASSIFICATION_IMAGE,
    CLASSIFICATION_KINDS,
    RETRIEVAL,
    RETRIEVAL_TASKS,
)

TASK_LABELS = {
    "text_to_mm": "text→mm",
    "image_to_mm": "image→mm",
    "mm_to_mm": "mm→mm",
    "text_to_image": "text→image",
    "image_to_text": "image→text",
}
KIND_TITLES = {
    RETRIEVAL: "Retrieval",
    CLASSIFICATION: "Zero-shot category classification (product: image + title + attributes)",
    CLASSIFICATION_IMAGE: "Zero-shot category classification (product: image only)",
    ATTRIBUTES: "Zero-shot attribute prediction (product: image + title, never the attribute string)",
    ATTRIBUTES_IMAGE: "Zero-shot attribute prediction (product: image only)",
}
SKIPPED = "skipped"
NOT_APPLICABLE = "—"
TRACE_FIELDS = ("closure_rate", "mean_trace_tokens", "n")  # no timings: they are in run.json, not the report
ROLE_TITLES = {
    "ablation": "Ablations vs trained",
    "baseline": "Baselines vs trained",
    "reference": "Non-learned references vs trained",
}


def task_label(kind: str, name: str) -> str:
    """``text→mm``, ``category L2``, ``category L2 (image only)``, ``attribute color``, ..."""
    if kind == RETRIEVAL:
        return TASK_LABELS.get(name, name)
    image_only = " (image only)" if kind in (CLASSIFICATION_IMAGE, ATTRIBUTES_IMAGE) else ""
    if kind in (CLASSIFICATION, CLASSIFICATION_IMAGE):
        return f"category L{level_number(name)}{image_only}"
    return f"attribute {name}{image_only}"


def metric_label(metric: str) -> str:
    """``R@10``, ``MRR``, ``acc``."""
    if metric.startswith("recall_at_"):
        return "R@" + metric.removeprefix("recall_at_")
    return {"mrr": "MRR", "accuracy": "acc", "macro_f1": "macro-F1"}.get(metric, metric)


def level_number(name: str) -> int:
    """``level_3`` -> 3 (0 for other names)."""
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _task_order(name: str) -> tuple[int, int, str]:
    if name in RETRIEVAL_TASKS:
        return (0, RETRIEVAL_TASKS.index(name), name)
    return (1, level_number(name), name)


def fmt(value: Any) -> str:
    """A cell: ints as they are, floats with 3 decimals."""
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _cell(values: dict[str, Any] | None, key: str, missing: str = SKIPPED) -> str:
    if values is None or key not in values:
        return missing
    return fmt(values[key])


def _rows_of(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any], str, str]]:
    """(name, metrics block, mode label, missing-cell text) of every variant, then the reference rows."""
    modes = summary.get("modes", {})
    rows = [(v, m, modes.get(v, {}).get("label", NOT_APPLICABLE), SKIPPED) for v, m in summary["metrics"].items()]
    for name, block in summary.get("reference_rows", {}).items():
        rows.append((name, block, "reference row", NOT_APPLICABLE))
    return rows


def _names(summary: dict[str, Any], kind: str) -> list[str]:
    blocks = [*summary["metrics"].values(), *summary.get("reference_rows", {}).values()]
    return sorted({name for b in blocks for name in b.get(kind, {})}, key=_task_order)


def main_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison table: one row per variant, then ``chance`` and ``majority``.

    Columns: the mode, Recall@``main_k`` of each retrieval task, the mean MRR over the retrieval tasks the row
    ran, accuracy of each scored category level (full product, then image only), and the mean attribute
    accuracy (image + title, then image only).
    """
    k = summary["main_k"]
    levels = {kind: _names(summary, kind) for kind in (CLASSIFICATION, CLASSIFICATION_IMAGE)}
    columns = ["variant", "mode", *[f"{TASK_LABELS[t]} R@{k}" for t in RETRIEVAL_TASKS], "mean MRR"]
    for kind, names in levels.items():
        columns += [f"{task_label(kind, level)} acc" for level in names]
    columns += ["attribute acc (mean)", "attribute acc (image only, mean)"]
    rows = []
    for name, m, mode, missing in _rows_of(summary):
        row = [name, mode] + [_cell(m.get(RETRIEVAL, {}).get(t), f"recall_at_{k}", missing) for t in RETRIEVAL_TASKS]
        row.append(_cell(m.get("summary"), "retrieval_mean_mrr", missing))
        for kind, names in levels.items():
            row += [_cell(m.get(kind, {}).get(level), "accuracy", missing) for level in names]
        row.append(_cell(m.get("summary"), "attributes_mean_accuracy", missing))
        row.append(_cell(m.get("summary"), "attributes_image_mean_accuracy", missing))
        rows.append(row)
    return columns, rows


def detail_tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) per kind: every variant and reference row for each task, grouped by task."""
    tables = []
    for kind in (RETRIEVAL, *CLASSIFICATION_KINDS):
        names = _names(summary, kind)
        if not names:
            continue
        if kind == RETRIEVAL:  # every recall_at_K any row has, then mrr and n
            blocks = [m.get(kind, {}) for _, m, _, _ in _rows_of(summary)]
            seen = dict.fromkeys(key for b in blocks for v in b.values() for key in v)
            fields = [key for key in seen if key != "n"] + ["n"]
        else:
            fields = ["accuracy", "macro_f1", "n"]
        columns, rows = ["task", "variant", "mode", *[metric_label(f) for f in fields]], []
        for name in names:
            for variant, m, mode, missing in _rows_of(summary):
                values = m.get(kind, {}).get(name)
                if values is None and missing == NOT_APPLICABLE:
                    continue  # a reference row without this task (majority in retrieval)
                cells = [_cell(values, key, missing) for key in fields]
                rows.append([task_label(kind, name), variant, mode, *cells])
        tables.append((KIND_TITLES[kind], columns, rows))
    return tables


def mode_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Each variant's embedding mode and its trace statistics when it reasons (its wall-clock times, which change
    from run to run, are in ``run.json``: :func:`moon3.eval.report.run_record`)."""
    columns = ["variant", "mode", "trace closure rate", "mean trace tokens", "traces"]
    rows = []
    for variant, mode in summary.get("modes", {}).items():
        stats = mode.get("trace_stats", {})
        cells = [_cell(stats, key, NOT_APPLICABLE) for key in TRACE_FIELDS]
        rows.append([variant, mode.get("label", NOT_APPLICABLE), *cells])
    return columns, rows


def delta_tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) of the paired deltas vs the trained model (whose mode is in the main table), one
    table per variant role."""
    against = summary.get("against", "trained")
    roles = summary.get("roles", {})
    modes = summary.get("modes", {})
    columns = ["variant", "mode", "task", "metric", against, "variant value", f"delta vs {against}", "95% CI"]
    columns.append("verdict")
    tables = []
    for role, title in ROLE_TITLES.items():
        rows = [
            [
                d["variant"],
                modes.get(d["variant"], {}).get("label", NOT_APPLICABLE),
                task_label(d["kind"], d["task"]),
                metric_label(d["metric"]),
                fmt(d["base"]),
                fmt(d["value"]),
                f"{d['delta']:+.3f}",
                f"[{d['lo']:+.3f}, {d['hi']:+.3f}]",
                d["verdict"],
            ]
            for d in summary.get("deltas", [])
            if roles.get(d["variant"]) == role
        ]
        if rows:
            tables.append((title, columns, rows))
    return tables


def below_reference_lines(summary: dict[str, Any]) -> tuple[bool, list[str]]:
    """``(warning, lines)`` of the block at the top of the report: where the trained model does not beat the
    best non-learned reference, or that it beats them all."""
    below = summary.get("below_references")
    against = summary.get("against", "trained")
    if not below or not below.get("compared"):
        return False, ["No non-learned reference measured any task (eval.references is empty or all were skipped)."]
    compared = len(below["compared"])
    if not below["entries"]:
        return False, [f"The {against} model beats the best non-learned reference on all {compared} columns measured."]
    lines = [
        f"The {against} model does not beat the best non-learned reference on {len(below['entries'])} of "
        f"{compared} columns a reference measures:"
    ]
    for e in below["entries"]:
        lines.append(
            f"{task_label(e['kind'], e['task'])} {metric_label(e['metric'])}: {against} {e['trained']:.3f} vs "
            f"{e['reference']} {e['reference_value']:.3f} (reference − {against} {e['delta']:+.3f}, "
            f"95% CI [{e['lo']:+.3f}, {e['hi']:+.3f}], {e['verdict']})"
        )
    return True, lines


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_table_markdown(summary: dict[str, Any]) -> str:
    """The comparison table as Markdown (what ``moon3 evaluate`` and ``moon3 summary`` print)."""
    return markdown_table(*main_table(summary))
