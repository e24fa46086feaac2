"""Reference rows and non-learned reference variants, evaluated on the same split as the models.

- *chance* and *majority* (:func:`reference_rows`): what a model that learned nothing scores. Chance Recall@K
  is ``K / gallery size`` and chance MRR the mean of ``1/r`` over a uniformly random rank; chance accuracy is
  ``1 / n_classes``; majority accuracy is the share of the most frequent class among the scored eval items.
- ``ref_tfidf`` (character n-gram TF-IDF of the text, fit on the train-split product texts), ``ref_pixels``
  (raw 32x32 RGB pixels, mean-centred per image) and ``ref_tfidf_pixels`` (both, as two normalised halves):
  embedders that read only the modality they have (their ``modalities``), so a task with no shared modality is
  reported as skipped by :mod:`moon3.eval.tasks`, not scored as a miss.

A trained model that does not beat these on a task has not yet learned more than string or pixel overlap.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from moon3.eval.config import REFERENCE_NAMES, EvalConfig
from moon3.eval.data import QUERY_TASKS, EvalData
from moon3.eval.metrics import macro_f1
from moon3.eval.tasks import (
    CLASSIFICATION,
    CLASSIFICATION_IMAGE,
    CLASSIFICATION_KINDS,
    IMAGE,
    INTRA_TASKS,
    RETRIEVAL,
    TEXT,
    TaskResult,
    classification_task,
    view_rows,
)

# TF-IDF rows are searched densely (FAISS flat index): the vocabulary is capped so that a gallery row stays
# 64 KiB. Character 2-4-grams of product titles rarely need more; the most frequent n-grams are kept.
TFIDF_MAX_FEATURES = 1 << 14
PIXEL_SIDE = 32


def _with_unknown_axis(rows: np.ndarray) -> np.ndarray:
    """Append one axis for rows with nothing to embed (no known n-gram, a flat image): they get that axis
    alone, so they are unit-norm, tie with each other and with nothing else."""
    out = np.zeros((len(rows), rows.shape[1] + 1), dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1)
    known = norms > 1e-8
    out[known, :-1] = rows[known] / norms[known, None]
    out[~known, -1] = 1.0
    return out


class TfidfReference:
    """Character n-gram TF-IDF (``char_wb``, 2-4-grams, sublinear tf) of an item's text, cosine-compared.

    Args:
        train_texts: the corpus the vocabulary and idf are fit on (train-split product texts only, so no
            evaluation text informs the reference).
    """

    modalities = frozenset({TEXT})
    mode = "non-learned: char n-gram TF-IDF of the text"

    def __init__(self, train_texts: list[str]):
        from sklearn.feature_extraction.text import TfidfVectorizer

        if not train_texts:
            raise ValueError("no train-split product text to fit the TF-IDF vocabulary on")
        self.vectorizer = TfidfVectorizer(
            analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, max_features=TFIDF_MAX_FEATURES, dtype=np.float32
        )
        self.vectorizer.fit(train_texts)
        self.n_train_texts = len(train_texts)

    def __call__(self, items: list[dict[str, Any]]) -> np.ndarray:
        texts = [item.get("text") or "" for item in items]
        return _with_unknown_axis(self.vectorizer.transform(texts).toarray())


class PixelReference:
    """Raw pixels: the image resized to 32x32 RGB, flattened, mean-centred per image, cosine-compared."""

    modalities = frozenset({IMAGE})
    mode = "non-learned: raw 32x32 pixels"

    def __call__(self, items: list[dict[str, Any]]) -> np.ndarray:
        rows = np.zeros((len(items), 3 * PIXEL_SIDE * PIXEL_SIDE), dtype=np.float32)
        for i, item in enumerate(items):
            image = item.get("image")
            if image is not None:
                small = image.convert("RGB").resize((PIXEL_SIDE, PIXEL_SIDE), Image.Resampling.BILINEAR)
                pixels = np.asarray(small, dtype=np.float32).ravel() / 255.0
                rows[i] = pixels - pixels.mean()
        return _with_unknown_axis(rows)


def _shows(item: dict[str, Any], modality: str) -> bool:
    return item.get("image") is not None if modality == IMAGE else bool(item.get("text"))


class ConcatReference:
    """Several single-modality references side by side: each part embeds the items that show its modality
    (zeros for the others), then the concatenation is L2-normalised, so an image + text item is the two
    normalised halves with equal weight and a text query is compared through the text half only."""

    def __init__(self, parts: list[TfidfReference | PixelReference]):
        self.parts = parts
        self.modalities = frozenset().union(*(p.modalities for p in parts))
        self.mode = "non-learned: " + " + ".join(p.mode.removeprefix("non-learned: ") for p in parts)

    def __call__(self, items: list[dict[str, Any]]) -> np.ndarray:
        halves = []
        for part in self.parts:
            (modality,) = part.modalities
            shown = np.array([_shows(item, modality) for item in items], dtype=bool)
            half = part(items)
            half[~shown] = 0.0
            halves.append(half)
        joined = np.concatenate(halves, axis=1)
        # Every item shows at least one modality of a product or query, so no row is all zeros.
        return joined / np.maximum(np.linalg.norm(joined, axis=1, keepdims=True), 1e-12)


def build_references(names: list[str], data: EvalData) -> tuple[dict[str, Any], dict[str, str]]:
    """The reference embedders asked for, and why any of them cannot be built.

    Raises:
        ValueError: a name that is not one of :data:`moon3.eval.config.REFERENCE_NAMES`.
    """
    unknown = sorted(set(names) - set(REFERENCE_NAMES))
    if unknown:
        raise ValueError(f"eval.references: unknown reference(s) {unknown}; expected some of {list(REFERENCE_NAMES)}")
    built: dict[str, Any] = {}
    missing: dict[str, str] = {}
    tfidf: TfidfReference | None = None
    if {"ref_tfidf", "ref_tfidf_pixels"} & set(names):
        try:
            tfidf = TfidfReference(data.train_texts)
        except ValueError as err:
            missing.update({n: str(err) for n in ("ref_tfidf", "ref_tfidf_pixels") if n in names})
    for name in names:
        if name == "ref_pixels":
            built[name] = PixelReference()
        elif tfidf is not None:
            built[name] = tfidf if name == "ref_tfidf" else ConcatReference([tfidf, PixelReference()])
    return {n: built[n] for n in names if n in built}, missing


# --- chance and majority ----------------------------------------------------------------------------------


def _chance_retrieval(name: str, gallery: int, n_queries: int, ks: list[int]) -> TaskResult:
    metrics: dict[str, float] = {f"recall_at_{k}": min(k, gallery) / gallery for k in ks}
    metrics["mrr"] = float(np.sum(1.0 / np.arange(1, gallery + 1)) / gallery)
    metrics["n"] = n_queries
    return TaskResult(RETRIEVAL, name, metrics, details={"gallery_size": gallery})


def reference_rows(data: EvalData, cfg: EvalConfig) -> dict[str, list[TaskResult]]:
    """``{"chance": [...], "majority": [...]}``: task results of the two reference rows on this split.

    Majority has no retrieval results (it is not a ranking); tasks skipped for every variant (a single-value
    level, no queries of a type) have no reference either.
    """
    chance: list[TaskResult] = []
    majority: list[TaskResult] = []
    n_products = len(data.products)
    for qtype, task in QUERY_TASKS.items():
        if len(data.queries[qtype]):
            chance.append(_chance_retrieval(task, n_products, len(data.queries[qtype]), cfg.ks))
    n_both = len(np.intersect1d(*view_rows(data.products)))
    if n_both:
        for task in INTRA_TASKS:
            chance.append(_chance_retrieval(task, n_both, n_both, cfg.ks))
    for kind in CLASSIFICATION_KINDS:
        category = kind in (CLASSIFICATION, CLASSIFICATION_IMAGE)
        for name in [f"level_{level}" for level in data.categories] if category else list(data.attributes):
            spec = classification_task(data, kind, name, cfg)
            if spec.skipped is not None:
                continue
            n_classes, n = len(spec.labels), len(spec.y_true)
            counts = np.bincount(spec.y_true, minlength=n_classes)
            chance.append(TaskResult(kind, name, {"accuracy": 1.0 / n_classes, "n": n}))
            top_class = np.full(n, int(np.argmax(counts)), dtype=np.int64)
            metrics = {"accuracy": float(counts.max() / n), "macro_f1": macro_f1(spec.y_true, top_class), "n": n}
            majority.append(TaskResult(kind, name, metrics))
    return {"chance": chance, "majority": majority}
