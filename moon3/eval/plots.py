"""Plot data (CSV for ``dvc plots``) and PNGs (Recall@K curves, category confusion matrices) of the evaluation.

Labels can be in any script: the PNGs are drawn with DejaVu Sans and, for the glyphs it lacks, the first
installed font that covers Chinese/Japanese/Korean (:func:`cjk_fonts`; e.g. Debian's ``fonts-noto-cjk``, which the
Docker image installs). Without one the plots still render, with boxes for those glyphs; the HTML report's own
text is rendered by the browser either way.
"""

from __future__ import annotations

import csv
import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from moon3.eval.tables import TASK_LABELS
from moon3.eval.tasks import CLASSIFICATION, RETRIEVAL, RETRIEVAL_TASKS

# Families known to cover CJK, in order of preference (sans first, Simplified Chinese first); any other family
# fontconfig reports for Chinese comes after them.
CJK_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Noto Sans CJK HK",
    "Source Han Sans SC", "Source Han Sans CN", "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
    "Droid Sans Fallback", "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans GB", "Heiti SC",
    "Arial Unicode MS", "Noto Serif CJK SC", "AR PL UMing CN",
)  # fmt: skip
BASE_FONT = "DejaVu Sans"
MAX_FALLBACK_FONTS = 2  # each listed family is opened for every text drawn: the first covers CJK already


def _fontconfig_cjk_files() -> list[str]:
    """Font files fontconfig says cover Chinese (``fc-list :lang=zh``); empty without fontconfig."""
    if shutil.which("fc-list") is None:
        return []
    try:
        run = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    files = {line.strip().rstrip(":") for line in run.stdout.splitlines() if line.strip()}
    return sorted(f for f in files if f.lower().endswith((".ttf", ".otf", ".ttc")))


@functools.cache
def cjk_fonts() -> tuple[str, ...]:
    """Installed font families with CJK glyphs, best first; empty when there is none.

    Matplotlib's font cache may predate a font installed later, so the files fontconfig reports for Chinese are
    added to matplotlib's font list (in memory) when the cache knows none of :data:`CJK_FAMILIES`.
    """
    from matplotlib import font_manager

    manager = font_manager.fontManager
    found = [f for f in CJK_FAMILIES if f in {e.name for e in manager.ttflist}]
    if found:
        return tuple(found[:MAX_FALLBACK_FONTS])
    files = _fontconfig_cjk_files()
    for path in files:
        try:
            manager.addfont(path)
        except (OSError, RuntimeError, ValueError):
            continue
    names = {e.name for e in manager.ttflist}
    others = sorted({e.name for e in manager.ttflist if e.fname in set(files)} - set(CJK_FAMILIES))
    others.sort(key=lambda name: ("Mono" in name, "Serif" in name))
    return (*[f for f in CJK_FAMILIES if f in names], *others)[:MAX_FALLBACK_FONTS]


def font_settings() -> dict[str, Any]:
    """Matplotlib rc settings that draw any script: DejaVu Sans, then the CJK fonts for the glyphs it lacks."""
    return {"font.family": [BASE_FONT, *cjk_fonts()]}


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
    with matplotlib.rc_context(font_settings()):
        return _plot_recall_curves(summary, plot_dir)


def _plot_recall_curves(summary: dict[str, Any], plot_dir: Path) -> list[Path]:
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
    """Category confusion matrix PNG per variant and level that kept one (the first level with two or more names;
    rows true, columns predicted). Labels in any script (see the module docstring)."""
    with matplotlib.rc_context(font_settings()):
        return _plot_confusion(summary, plot_dir)


def _plot_confusion(summary: dict[str, Any], plot_dir: Path) -> list[Path]:
    written = []
    prefix = f"{CLASSIFICATION}/level_"
    for variant, d in summary["details"].items():
        for key, entry in d.items():
            if key.startswith(prefix) and entry and "confusion" in entry:
                written.append(_confusion_png(variant, key.removeprefix(prefix), entry, plot_dir))
    return written


def _confusion_png(variant: str, level: str, entry: dict[str, Any], plot_dir: Path) -> Path:
    labels, matrix = entry["labels"], entry["confusion"]
    size = min(16.0, max(3.5, 0.45 * len(labels) + 2))
    fig = Figure(figsize=(size, size), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Level-{level} categories: {variant}")
    if len(labels) <= 20:
        peak = max((max(r) for r in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                color = "white" if peak and count > peak / 2 else "black"
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    path = plot_dir / f"confusion_level_{level}_{_safe(variant)}.png"
    fig.savefig(path)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
