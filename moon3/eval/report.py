"""Evaluation outputs: the summary of all results, metrics JSON, plot data and PNGs, HTML + Markdown report.

Files written under ``out_dir``::

    metrics.json                      numbers (DVC metrics, KFP, MLflow): variant -> kind -> task -> metric,
                                      the ``chance`` and ``majority`` rows, ``deltas`` (variant -> kind/task ->
                                      metric -> delta, lo, hi) and ``below_references`` (a count); beside them,
                                      ``skipped`` (variant -> kind/task -> reason) and ``derived`` (kind/task ->
                                      how its queries were made) when there are any. Never NaN: a metric with
                                      nothing to measure is absent and listed in ``skipped``
    results.json                      everything else too: skipped tasks with reasons, modes and traces,
                                      provenance, curves, confusion matrix, delta rows, examples (no thumbnails)
    plots/recall_at_k/<task>.csv      DVC plot data: column ``k``, one Recall@K column per variant, ``chance``
    plots/recall_at_k_<task>.png      Recall@K curves, one line per variant
    plots/confusion_level_<n>_<v>.png category confusion matrix of variant ``v`` (first level with 2+ names)
    report.html                       one self-contained file (PNGs and thumbnails inlined), browsers and KFP UI
    report.md                         the same tables, PNGs linked
    run.json                          what changes from run to run of the same inputs, so it is in none of the
                                      files above (DVC outputs, reproduced byte for byte): seconds per variant,
                                      ms per generated trace, the git commit and dirty flag, the whole-config
                                      params hash and the date (:func:`run_record`)

Metric names avoid ``@`` (``recall_at_10``) because MLflow rejects it in metric keys.

The reports' "Trace synthesis" section reads the ``synthesis_report.json`` the synthesize stage writes beside the
traces (``eval.synthesis_report``, see :func:`synthesis_section`); it adds nothing to ``metrics.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moon3.common.provenance import RUN_FILE
from moon3.eval.compare import deltas_as_metrics
from moon3.eval.plots import plot_confusion, plot_recall_curves, write_plot_data
from moon3.eval.render import render_html, render_markdown
from moon3.eval.tasks import (
    ATTRIBUTES,
    ATTRIBUTES_IMAGE,
    CLASSIFICATION,
    CLASSIFICATION_IMAGE,
    KINDS,
    RETRIEVAL,
    TaskResult,
)


def _means(block: dict[str, Any], main_k: int) -> dict[str, float]:
    summary = {}
    for name, kind, metric in (
        (f"retrieval_mean_recall_at_{main_k}", RETRIEVAL, f"recall_at_{main_k}"),
        ("retrieval_mean_mrr", RETRIEVAL, "mrr"),
        ("classification_mean_accuracy", CLASSIFICATION, "accuracy"),
        ("classification_image_mean_accuracy", CLASSIFICATION_IMAGE, "accuracy"),
        ("attributes_mean_accuracy", ATTRIBUTES, "accuracy"),
        ("attributes_image_mean_accuracy", ATTRIBUTES_IMAGE, "accuracy"),
    ):
        values = [m[metric] for m in block[kind].values() if metric in m]
        if values:
            summary[name] = sum(values) / len(values)
    return summary


def metric_block(tasks: list[TaskResult], main_k: int) -> dict[str, Any]:
    """kind -> task -> metrics of the tasks that ran, plus ``summary`` means over them (skipped tasks count in
    no mean; a mean over no task is left out, not NaN)."""
    block: dict[str, Any] = {kind: {} for kind in KINDS}
    for task in tasks:
        if task.skipped is None:
            block[task.kind][task.name] = task.metrics
    block["summary"] = _means(block, main_k)
    return block


def summarize(
    results: dict[str, list[TaskResult]], main_k: int, reference_rows: dict[str, list[TaskResult]] | None = None
) -> dict[str, Any]:
    """Collect the task results into ``{"metrics", "skipped", "details", "notes", "main_k", "reference_rows"}``.

    ``details`` keeps curves, gallery sizes, labels and the confusion matrix; the per-item arrays stay out
    (they feed :mod:`moon3.eval.compare`, not the files). ``notes`` is ``kind/task`` -> how the task's queries
    were made, for the tasks measured on derived queries (the same data for every variant).
    """
    metrics: dict[str, Any] = {}
    skipped: dict[str, dict[str, str]] = {}
    details: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    for variant, tasks in results.items():
        metrics[variant] = metric_block(tasks, main_k)
        for task in tasks:
            if task.skipped is not None:
                skipped.setdefault(variant, {})[task.key] = task.skipped
            kept = {k: v for k, v in task.details.items() if k != "per_item"}
            if kept:
                details.setdefault(variant, {})[task.key] = kept
            if task.details.get("note"):
                notes.setdefault(task.key, task.details["note"])
    rows = {name: metric_block(tasks, main_k) for name, tasks in (reference_rows or {}).items()}
    return {"metrics": metrics, "skipped": skipped, "details": details, "notes": notes, "main_k": main_k,
            "reference_rows": rows}  # fmt: skip


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


def finite_only(node: Any, path: str = "", dropped: list[str] | None = None, as_null: bool = False) -> Any:
    """``node`` without its NaN / infinite numbers: dict entries and list items left out (``as_null``: replaced by
    None); their ``a/b/c`` paths are appended to ``dropped``."""
    dropped = [] if dropped is None else dropped
    bad = lambda v: isinstance(v, float) and not math.isfinite(v)  # noqa: E731
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            where = f"{path}/{key}" if path else str(key)
            if bad(value):
                dropped.append(where)
                if as_null:
                    out[key] = None
            else:
                out[key] = finite_only(value, where, dropped, as_null)
        return out
    if isinstance(node, list | tuple):
        out_list = []
        for i, value in enumerate(node):
            if bad(value):
                dropped.append(f"{path}/{i}")
                if as_null:
                    out_list.append(None)
            else:
                out_list.append(finite_only(value, f"{path}/{i}", dropped, as_null))
        return out_list
    return node


# Provenance entries that differ between two runs of the same stage inputs: the checkout (a new commit, uncommitted
# changes), the configuration outside the stage's DVC params, the clock. The code and params the stage reads are in
# its dvc.lock entry.
RUN_PROVENANCE_KEYS = ("code", "params", "date")
RUN_TRACE_KEYS = ("ms_per_trace",)  # wall-clock trace statistics


def run_record(summary: dict[str, Any]) -> dict[str, Any]:
    """What :data:`RUN_FILE` holds: the summary's wall-clock numbers (``seconds`` per variant, ``ms_per_trace``
    per reasoning variant) and its run-dependent provenance (``code``, ``params``, ``date``)."""
    prov = summary.get("provenance") or {}
    traces = {}
    for variant, mode in summary.get("modes", {}).items():
        timings = {k: v for k, v in (mode.get("trace_stats") or {}).items() if k in RUN_TRACE_KEYS}
        if timings:
            traces[variant] = timings
    return {
        "seconds": dict(summary.get("seconds", {})),
        "trace_stats": traces,
        **{key: prov[key] for key in RUN_PROVENANCE_KEYS if key in prov},
    }


def without_run_record(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` less what :func:`run_record` takes: what the DVC-tracked files are written from."""
    modes = {}
    for variant, mode in summary.get("modes", {}).items():
        stats = mode.get("trace_stats")
        modes[variant] = {**mode, "trace_stats": _without(stats, RUN_TRACE_KEYS)} if stats else mode
    out = {k: v for k, v in summary.items() if k != "seconds"}
    out["modes"] = modes
    if summary.get("provenance"):
        out["provenance"] = _without(summary["provenance"], RUN_PROVENANCE_KEYS)
    return out


def _without(values: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in keys}


def metrics_json(summary: dict[str, Any]) -> dict[str, Any]:
    """The document of ``metrics.json`` (see the module docstring): numbers, plus ``skipped`` and ``derived``
    when there are any; a number that is not finite is left out and listed in ``skipped["not_finite"]``."""
    out: dict[str, Any] = {}
    for variant, block in summary["metrics"].items():
        stats = summary.get("modes", {}).get(variant, {}).get("trace_stats")
        stats = _without(stats or {}, RUN_TRACE_KEYS)  # its timings go to run.json
        out[variant] = {**block, "reasoning": stats} if stats else block
    out.update(summary.get("reference_rows", {}))
    out["deltas"] = deltas_as_metrics(summary.get("deltas", []))
    if summary.get("below_references") is not None:
        out["below_references"] = len(summary["below_references"]["entries"])
    dropped: list[str] = []
    out = finite_only(out, dropped=dropped)
    skipped = {variant: dict(tasks) for variant, tasks in summary.get("skipped", {}).items() if tasks}
    if dropped:
        skipped["not_finite"] = {path: "not a finite number: left out" for path in dropped}
    if skipped:
        out["skipped"] = skipped
    if summary.get("notes"):
        out["derived"] = dict(summary["notes"])
    return out


def synthesis_section(path: str) -> dict[str, Any] | None:
    """What the report states about the traces the model was trained on, from the synthesize stage's report.

    Args:
        path: ``eval.synthesis_report``; ``''`` means no section.

    Returns:
        None for no section; ``{"path", "missing": reason}`` when the file is absent or unreadable (noted in the
        report, never an error); else ``path``, ``teacher``, the counts (``in``, ``accepted``, ``rejected`` by
        reason, ``failed``, ``not_asked``, ``covered_by_imported``), ``claim_accuracy``, ``mean_tokens``,
        ``imported`` (``in``, ``accepted``, ``rejected``; None without imported traces) and ``report_html``.
    """
    if not path:
        return None
    file = Path(path)
    if not file.is_file():
        return {"path": path, "missing": "no file there"}
    try:
        report = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        return {"path": path, "missing": f"unreadable: {err}"}
    imported = report.get("imported") or {}
    keys = ("teacher", "in", "accepted", "rejected", "failed", "not_asked", "covered_by_imported", "claim_accuracy",
            "mean_tokens", "report_html")  # fmt: skip
    return {
        "path": path,
        "missing": None,
        **{k: report.get(k) for k in keys},
        "imported": {k: imported.get(k) for k in ("in", "accepted", "rejected")} if imported.get("file") else None,
    }


def _without_thumbnails(summary: dict[str, Any]) -> dict[str, Any]:
    examples = [
        {**e, "query_thumb": None, "positive_thumb": None, "top": [{**p, "thumb": None} for p in e["top"]]}
        for e in summary.get("examples", [])
    ]
    return {**summary, "examples": examples}


def write_report(
    summary: dict[str, Any], out_dir: str | Path, title: str = "MOON3 evaluation", metrics: dict | None = None
) -> dict[str, str]:
    """Write every output file (see the module docstring) and return their paths by role.

    ``metrics`` is :func:`metrics_json` of ``summary`` when the caller has it already.
    """
    out = Path(out_dir)
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    run = run_record(summary)
    (out / RUN_FILE).write_text(json.dumps(finite_only(run, as_null=True), indent=2, default=str) + "\n")
    summary = without_run_record(summary)
    metrics = metrics_json(summary) if metrics is None else metrics
    (out / "metrics.json").write_text(json.dumps(finite_only(metrics), indent=2, allow_nan=False) + "\n")
    results = json.loads(json.dumps(_without_thumbnails(summary), default=str))  # plain JSON types, then finite
    (out / "results.json").write_text(json.dumps(finite_only(results, as_null=True), indent=2, allow_nan=False) + "\n")
    csvs = write_plot_data(summary, plot_dir)
    pngs = plot_recall_curves(summary, plot_dir) + plot_confusion(summary, plot_dir)
    (out / "report.md").write_text(render_markdown(summary, pngs, out, title))
    (out / "report.html").write_text(render_html(summary, pngs, title, out))
    return {
        "metrics": str(out / "metrics.json"),
        "results": str(out / "results.json"),
        "html": str(out / "report.html"),
        "markdown": str(out / "report.md"),
        "plots": str(plot_dir),
        "plot_data": ";".join(str(p) for p in csvs),
        "run": str(out / RUN_FILE),
    }
