"""Plot data (CSV for ``dvc plots``) and PNGs (Recall@K curves, level-1 confusion matrices) of the evaluation."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from moon3.eval.tables import TASK_LABELS
from moon3.eval.tasks import CLASSIFICATION, RETRIEVAL, RETRIEVAL_TASKS


def _curves(summary: dict[str, Any], task: str) -> dict[str, dict]:
    """Variant -> {K: Recall@K} of one retrieval task, plus ``chance`` (K / gallery size) when any variant ran it."""
    key = f"{RETRIEVAL}/{task}"
    ran = {v: d[key] for v, d in summary["details"].items() if key in d and d[key].get("curve")}
    curves = {v: entry["curve"] for v, entry in ran.items()}
    if ran:
        gallery = next(iter(ran.values()))["gallery_size"]
        ks = sorted({int(k) for c in curves.values() for k in c})
        curves["chance"] = {k: min(k, gallery) / gallery for k in ks}
    return curves


def _value(curve: dict, k: int) -> float | None:
    return curve.get(k, curve.get(str(k)))


def write_plot_data(summary: dict[str, Any], plot_dir: Path) -> list[Path]:
    """One CSV per retrieval task: ``k``, one Recall@K column per variant that ran the task, then ``chance``."""
    written = []
    for task in RETRIEVAL_TASKS:
        curves = _curves(summary, task)
        if not curves:
            continue
        ks = sorted({int(k) for c in curves.values() for k in c})
        path = plot_dir / "recall_at_k" / f"{task}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["k", *curves])
            for k in ks:
                values = [_value(c, k) for c in curves.values()]
                writer.writerow([k, *["" if v is None else f"{v:.6f}" for v in values]])
        written.append(path)
    return written


def plot_recall_curves(summary: dict[str, Any], plot_dir: Path) -> list[Path]:
    """One PNG per retrieval task with a Recall@K line per variant and the chance line (log-scaled K)."""
    written = []
    for task in RETRIEVAL_TASKS:
        curves = _curves(summary, task)
        if not curves:
            continue
        fig = Figure(figsize=(5, 3.6), dpi=100)
        ax = fig.add_subplot()
        for variant, curve in curves.items():
            ks = sorted(int(k) for k in curve)
            style = {"linestyle": "--", "color": "grey"} if variant == "chance" else {"marker": "o", "markersize": 3}
            ax.plot(ks, [_value(curve, k) for k in ks], label=variant, **style)
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


def plot_confusion(summary: dict[str, Any], plot_dir: Path) -> list[Path]:
    """Level-1 confusion matrix PNG per variant that scored level 1 (rows true, columns predicted)."""
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
