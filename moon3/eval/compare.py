"""Paired comparisons of variants: deltas vs the trained model with bootstrap intervals, and the reference check.

Every delta is ``variant - trained`` on the same queries (retrieval: hit@K, reciprocal rank) or the same items
(classification: correct or not), so the interval reflects the difference between the two on this split, not
the spread of either alone. A delta whose 95% interval contains 0 reads as *within noise*.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moon3.eval.tasks import KINDS, RETRIEVAL, RETRIEVAL_TASKS, TaskResult

# Resample blocks are bounded so that (resamples x items) index arrays stay ~16 MB whatever the item count.
_BLOCK_ELEMENTS = 2_000_000
BETTER, WORSE, NOISE = "better", "worse", "within noise"


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean paired difference ``mean(b - a)`` and its percentile 95% bootstrap interval.

    Items (queries, products) are resampled with replacement ``n_boot`` times; the same indices are used for
    ``a`` and ``b``, so what varies together cancels. Deterministic for given inputs, ``n_boot`` and ``seed``.

    Args:
        a: per-item outcomes of the reference (e.g. the trained model's hit@10 per query).
        b: per-item outcomes of the other variant, same items in the same order.
        n_boot: resamples.
        seed: seed of the resampling.

    Returns:
        ``(delta, lo, hi)``.

    Raises:
        ValueError: different lengths, no item, or ``n_boot < 1``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be 1-D of one length, got {a.shape} and {b.shape}")
    if a.size == 0 or n_boot < 1:
        raise ValueError(f"need at least one item and one resample, got {a.size} items, n_boot={n_boot}")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    block = max(1, _BLOCK_ELEMENTS // diff.size)
    for start in range(0, n_boot, block):
        idx = rng.integers(0, diff.size, size=(min(block, n_boot - start), diff.size))
        means[start : start + len(idx)] = diff[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def verdict(lo: float, hi: float) -> str:
    """``better`` / ``worse`` when the whole interval is above / below 0, else ``within noise``."""
    return BETTER if lo > 0 else WORSE if hi < 0 else NOISE


def per_item_outcomes(task: TaskResult, main_k: int) -> dict[str, np.ndarray]:
    """Per-query / per-item outcomes whose means are the task's headline metrics.

    Retrieval: ``recall_at_{main_k}`` (hit or not) and ``mrr`` (1/rank); classification: ``accuracy``.
    Empty for a skipped task.
    """
    per_item = task.details.get("per_item")
    if task.skipped is not None or not per_item:
        return {}
    if task.kind == RETRIEVAL:
        ranks = np.asarray(per_item["rank"], dtype=np.float64)
        return {f"recall_at_{main_k}": (ranks <= main_k).astype(np.float64), "mrr": 1.0 / ranks}
    return {"accuracy": np.asarray(per_item["correct"], dtype=np.float64)}


def _same_items(a: TaskResult, b: TaskResult) -> bool:
    rows_a, rows_b = a.details["per_item"].get("row"), b.details["per_item"].get("row")
    return rows_a is None or rows_b is None or np.array_equal(rows_a, rows_b)


def variant_deltas(
    results: dict[str, list[TaskResult]], against: str, main_k: int, n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Every other variant vs ``against`` on every task both ran: one row per (variant, task, metric).

    Returns:
        Rows ``{variant, kind, task, metric, base, value, delta, lo, hi, n, verdict}`` in variant and task
        order; ``base`` is ``against``'s value, ``value`` the variant's.
    """
    base = {t.key: t for t in results[against]}
    rows = []
    for variant, tasks in results.items():
        if variant == against:
            continue
        for task in tasks:
            reference = base.get(task.key)
            ours, theirs = per_item_outcomes(task, main_k), per_item_outcomes(reference, main_k) if reference else {}
            if not ours or not theirs or not _same_items(reference, task):
                continue
            for metric, values in ours.items():
                delta, lo, hi = paired_bootstrap(theirs[metric], values, n_boot=n_boot, seed=seed)
                rows.append(
                    {
                        "variant": variant,
                        "kind": task.kind,
                        "task": task.name,
                        "metric": metric,
                        "base": float(theirs[metric].mean()),
                        "value": float(values.mean()),
                        "delta": delta,
                        "lo": lo,
                        "hi": hi,
                        "n": int(values.size),
                        "verdict": verdict(lo, hi),
                    }
                )
    return rows


def deltas_as_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Nested numbers for ``metrics.json``: variant -> ``kind/task`` -> metric -> {delta, lo, hi}."""
    out: dict[str, Any] = {}
    for row in rows:
        entry = out.setdefault(row["variant"], {}).setdefault(f"{row['kind']}/{row['task']}", {})
        entry[row["metric"]] = {"delta": row["delta"], "lo": row["lo"], "hi": row["hi"]}
    return out


def _report_order(key: tuple[str, str, str]) -> tuple[int, int, str, bool]:
    """Kinds as the tasks run, retrieval tasks in their fixed order, then by name; Recall@K before MRR."""
    kind, task, metric = key
    return KINDS.index(kind), RETRIEVAL_TASKS.index(task) if task in RETRIEVAL_TASKS else 0, task, metric == "mrr"


def below_references(rows: list[dict[str, Any]], references: list[str]) -> dict[str, Any]:
    """Where the trained model does not beat the best non-learned reference (its point estimate is not above).

    Args:
        rows: :func:`variant_deltas` rows against the trained model.
        references: names of the reference variants.

    Returns:
        ``entries``: one per (task, metric) the trained model does not beat, with the best reference, both
        values and that reference's delta and interval; ``compared``: every ``kind/task/metric`` a reference
        measured.
    """
    best: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        if row["variant"] not in references:
            continue
        key = (row["kind"], row["task"], row["metric"])
        if key not in best or row["value"] > best[key]["value"]:
            best[key] = row
    best = {key: best[key] for key in sorted(best, key=_report_order)}
    entries = [
        {
            "kind": r["kind"],
            "task": r["task"],
            "metric": r["metric"],
            "trained": r["base"],
            "reference": r["variant"],
            "reference_value": r["value"],
            "delta": r["delta"],
            "lo": r["lo"],
            "hi": r["hi"],
            "verdict": r["verdict"],
        }
        for r in best.values()
        if r["value"] >= r["base"]
    ]
    return {"entries": entries, "compared": ["/".join(key) for key in best]}
