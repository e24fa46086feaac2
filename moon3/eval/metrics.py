"""Metrics of the MBE3.0-style protocol, from embeddings and ranks only (numpy in, numbers out).

Conventions:
- Ranks are 1-based with ties counted against the query (:func:`moon3.eval.search.rank_of_positive`).
- Nothing to measure (zero queries, zero items) gives ``None``, never NaN or an exception: the caller reports
  the task as skipped.
- Zero-shot prediction is the argmax of cosine similarity; among equal maxima the lowest class index wins
  (numpy's argmax), which is deterministic and gives a collapsed model chance-level accuracy, not a perfect one.
- Macro-F1 averages over the classes that occur in the truth or in the predictions (scikit-learn's default
  label set); a class with no true and no predicted item has no F1 and is left out, a class with predictions
  but no true items (or the reverse) scores F1 = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def retrieval_recall_at_k(ranks: np.ndarray, k: int) -> float | None:
    """Share of queries whose positive ranks within the first ``k``; ``None`` without queries."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return None
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float(np.mean(ranks <= k))


def recall_curve(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Recall@K for every K in ``ks``; empty without queries."""
    values = {int(k): retrieval_recall_at_k(ranks, int(k)) for k in ks}
    return {k: v for k, v in values.items() if v is not None}


def mean_reciprocal_rank(ranks: np.ndarray) -> float | None:
    """Mean of 1/rank over queries (full ranking, no cut-off); ``None`` without queries."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        return None
    if (ranks < 1).any():
        raise ValueError(f"ranks are 1-based; got a rank of {ranks.min():g}")
    return float(np.mean(1.0 / ranks))


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    """Share of exact matches; ``None`` for no items."""
    y_true, y_pred = _pair(y_true, y_pred)
    if y_true.size == 0:
        return None
    return float(np.mean(y_true == y_pred))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; row = true class index, column = predicted class index."""
    y_true, y_pred = _pair(y_true, y_pred)
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{name} has a class index outside [0, {n_classes})")
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return matrix


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    """Unweighted mean of per-class F1 over the classes seen in truth or predictions; ``None`` for no items."""
    y_true, y_pred = _pair(y_true, y_pred)
    if y_true.size == 0:
        return None
    scores = []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_true == c) & (y_pred == c))
        fp = np.sum((y_true != c) & (y_pred == c))
        fn = np.sum((y_true == c) & (y_pred != c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def _pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of one length, got {y_true.shape} and {y_pred.shape}")
    return y_true, y_pred


def zero_shot_predict(item_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """Index of the most similar class text for each item (ties: lowest class index).

    Args:
        item_emb: (n_items, dim) unit rows.
        class_emb: (n_classes, dim) unit rows, one per class text.
    """
    item_emb, class_emb = np.asarray(item_emb, np.float32), np.asarray(class_emb, np.float32)
    if class_emb.shape[0] == 0:
        raise ValueError("no class texts to predict among")
    if item_emb.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    if item_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(f"item dim {item_emb.shape[1]} != class dim {class_emb.shape[1]}")
    return np.argmax(item_emb @ class_emb.T, axis=1).astype(np.int64)


def classification_metrics(
    item_emb: np.ndarray, class_emb: np.ndarray, y_true: np.ndarray, with_confusion: bool = False
) -> dict | None:
    """Zero-shot classification: accuracy, macro-F1, item count (and the confusion matrix if asked).

    Args:
        item_emb: (n_items, dim) embeddings of the items to classify.
        class_emb: (n_classes, dim) embeddings of the class texts (category names, "attribute: value").
        y_true: (n_items,) true class index of each item.
        with_confusion: also return ``confusion`` as a nested list (rows true, columns predicted).

    Returns:
        ``{"accuracy", "macro_f1", "n", ["confusion"]}``, or ``None`` when there is no item.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) != len(item_emb):
        raise ValueError(f"{len(item_emb)} item embeddings but {len(y_true)} labels")
    if len(y_true) == 0:
        return None
    return prediction_metrics(y_true, zero_shot_predict(item_emb, class_emb), len(class_emb), with_confusion)


def prediction_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, with_confusion: bool = False) -> dict:
    """:func:`classification_metrics` from predictions already made (``{"accuracy", "macro_f1", "n",
    ["confusion"]}``), for callers that also need the per-item predictions."""
    out = {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred), "n": len(y_true)}
    if with_confusion:
        out["confusion"] = confusion_matrix(y_true, y_pred, n_classes).tolist()
    return out


def retrieval_metrics(ranks: np.ndarray, ks: Sequence[int]) -> dict | None:
    """``{"recall_at_K": ..., "mrr": ..., "n": ...}`` from positive ranks; ``None`` without queries."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return None
    out: dict = {f"recall_at_{k}": v for k, v in recall_curve(ranks, ks).items()}
    out["mrr"] = mean_reciprocal_rank(ranks)
    out["n"] = int(ranks.size)
    return out
