"""The MBE3.0-style tasks (method.md section 6) over a dataset's eval split, written against an abstract embedder.

An embedder is any ``embed_fn(items) -> array`` that maps a list of ``{"image": PIL.Image | None, "text": str |
None}`` dicts to an (n, dim) array (numpy or torch) of unit-norm rows. The tasks never see a model; the stage
function in :mod:`moon3.eval.evaluate` passes one embedder per variant. A non-learned reference declares
``modalities`` (a subset of ``{"image", "text"}``) and compares like with like only; a task whose two sides
share none of its modalities is skipped with the reason rather than scored as a miss.

Rows become items through :mod:`moon3.model.items`, the same code training and serving use. Product views:

- *gallery*: image + title + attributes, as training sees a product;
- *image + title*: the attribute task's input, which must not contain the attribute string it asks about;
- *image*: the picture alone (intra-product retrieval and the image-only classification tasks);
- *text*: title + attributes alone (intra-product retrieval).

Tasks, all on the eval split:

- ``retrieval``: ``text_to_mm`` / ``image_to_mm`` / ``mm_to_mm`` (queries of that type against the gallery; the
  positive is ``positive_product_id``) and ``text_to_image`` / ``image_to_text`` (a product's text view against
  the image views of all eval products that have both, and the reverse; the positive is the same product). A
  catalog without text (or image) queries has them derived from its multimodal queries' text (or image) view;
  such a task says so in ``details["note"]`` ("derived from multimodal queries ..."). A catalog without any
  query (products only) has only the intra-product tasks; the others are skipped with the reason.
- ``classification`` / ``classification_image``: gallery view / image view against the category names of each
  level (every name used at that level in the catalog), argmax wins; the first level with more than one name
  (level 1 on most catalogs) keeps its confusion matrix. A level with a single name in the catalog is skipped:
  there is nothing to tell apart.
- ``attributes`` / ``attributes_image``: image + title view / image view against ``attribute_text(type,
  value)`` for every value of that type in the catalog; products without that attribute sit it out.

A task with nothing to measure comes back with ``skipped`` set to the reason instead of metrics; it never raises
and never produces NaN. Every task that ran keeps its per-query / per-item outcomes in ``details["per_item"]``
(ranks and top-5 rows; correctness), so variants can be compared pairwise on the same queries and items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from moon3.common.progress import Progress
from moon3.eval.config import EvalConfig
from moon3.eval.data import DERIVED_VIEWS, QUERY_TASKS, EvalData
from moon3.eval.metrics import prediction_metrics, recall_curve, retrieval_metrics, zero_shot_predict
from moon3.eval.search import positive_ranks
from moon3.model.items import attribute_text, product_item, product_text, query_item

EmbedFn = Callable[[list[dict[str, Any]]], Any]

RETRIEVAL = "retrieval"
CLASSIFICATION = "classification"
CLASSIFICATION_IMAGE = "classification_image"
ATTRIBUTES = "attributes"
ATTRIBUTES_IMAGE = "attributes_image"
KINDS = (RETRIEVAL, CLASSIFICATION, CLASSIFICATION_IMAGE, ATTRIBUTES, ATTRIBUTES_IMAGE)
CLASSIFICATION_KINDS = KINDS[1:]
INTRA_TASKS = ("text_to_image", "image_to_text")
RETRIEVAL_TASKS = (*QUERY_TASKS.values(), *INTRA_TASKS)
TOP_KEPT = 5  # neighbours kept per query for the qualitative examples

IMAGE, TEXT = "image", "text"
BOTH = frozenset({IMAGE, TEXT})
# What each side of a task shows the embedder: (queries or items, gallery or class texts).
SIDES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "text_to_mm": (frozenset({TEXT}), BOTH),
    "image_to_mm": (frozenset({IMAGE}), BOTH),
    "mm_to_mm": (BOTH, BOTH),
    "text_to_image": (frozenset({TEXT}), frozenset({IMAGE})),
    "image_to_text": (frozenset({IMAGE}), frozenset({TEXT})),
    CLASSIFICATION: (BOTH, frozenset({TEXT})),
    CLASSIFICATION_IMAGE: (frozenset({IMAGE}), frozenset({TEXT})),
    ATTRIBUTES: (BOTH, frozenset({TEXT})),
    ATTRIBUTES_IMAGE: (frozenset({IMAGE}), frozenset({TEXT})),
}


@dataclass
class TaskResult:
    """One task of one variant: metrics, or the reason it was skipped.

    Attributes:
        kind: one of :data:`KINDS`.
        name: e.g. ``text_to_mm``, ``level_1``, ``color``.
        metrics: numbers (``recall_at_K``, ``mrr``, ``accuracy``, ``macro_f1``, ``n``); ``None`` when skipped.
        skipped: why there is nothing to measure; ``None`` when it ran.
        details: plot data (``curve``: {K: recall}, ``gallery_size``), ``labels`` and the ``confusion`` of the first
            scored level, ``note`` (how the task's queries were made, when derived), and ``per_item`` (numpy
            arrays, in memory only): ``rank`` and ``top`` rows per query for retrieval, ``correct`` and ``row``
            (product row) per item for classification.
    """

    kind: str
    name: str
    metrics: dict[str, float] | None
    skipped: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``kind/name``."""
        return f"{self.kind}/{self.name}"


# --- embedding --------------------------------------------------------------------------------------------


def check_embeddings(out: Any, n: int, what: str, atol: float = 1e-3) -> np.ndarray:
    """Convert an embedder's output to float32 numpy and check it: n rows, finite, unit norm.

    Raises:
        ValueError: naming ``what`` and the first offending rows.
    """
    if hasattr(out, "detach"):  # torch tensor
        out = out.detach().float().cpu().numpy()
    out = np.asarray(out, dtype=np.float32)
    if out.ndim != 2 or len(out) != n:
        raise ValueError(f"{what}: embed_fn returned shape {out.shape} for {n} items; expected ({n}, dim)")
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if bad.size:
        raise ValueError(f"{what}: embed_fn returned non-finite values in row(s) {bad[:5].tolist()}")
    norms = np.linalg.norm(out, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > atol)
    if bad.size:
        raise ValueError(
            f"{what}: embed_fn must return unit-norm rows; row(s) {bad[:5].tolist()} have norm(s) "
            f"{np.round(norms[bad[:5]], 4).tolist()}"
        )
    return out


def embed_rows(
    embed_fn: EmbedFn,
    frame: pd.DataFrame,
    to_item: Callable[[dict[str, Any]], dict[str, Any]],
    chunk: int,
    what: str,
    progress: bool = False,
) -> np.ndarray:
    """Embed every row of ``frame`` (as a dict) chunk by chunk; images are loaded per chunk, so memory stays
    bounded. ``to_item`` raises a ``ValueError`` naming the row for a row it cannot turn into an item."""
    records = frame.to_dict("records")
    parts = []
    starts = range(0, len(records), chunk)
    for start in Progress(starts, desc=f"embed {what}", unit="chunk", disable=not progress):
        items = [to_item(row) for row in records[start : start + chunk]]
        parts.append(check_embeddings(embed_fn(items), len(items), what))
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def embed_texts(embed_fn: EmbedFn, texts: Sequence[str], what: str) -> np.ndarray:
    """Embed plain texts (category names, ``"type: value"`` label prompts)."""
    items = [{"image": None, "text": t} for t in texts]
    return check_embeddings(embed_fn(items), len(items), what)


def blind_spot(embed_fn: EmbedFn, sides: tuple[frozenset[str], frozenset[str]]) -> str | None:
    """Why ``embed_fn`` cannot compare the two sides of a task, or None.

    An embedder without ``modalities`` is a joint model: it compares any side with any other. One that declares
    ``modalities`` (a non-learned reference) compares like with like only, so both sides must show a modality
    it reads.
    """
    seen = getattr(embed_fn, "modalities", None)
    if seen is None or sides[0] & sides[1] & frozenset(seen):
        return None
    return f"reads only {'+'.join(sorted(seen))} and compares like with like: the two sides share no such modality"


def _has_image(row: dict[str, Any]) -> bool:
    return isinstance(row.get("image"), str) and bool(row["image"].strip())


def view_rows(products: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(image_rows, text_rows)``: the product rows that have an image, and those that have a text."""
    records = products.to_dict("records")
    image_rows = np.array([i for i, r in enumerate(records) if _has_image(r)], dtype=np.int64)
    text_rows = np.array([i for i, r in enumerate(records) if product_text(r)], dtype=np.int64)
    return image_rows, text_rows


class ProductViews:
    """Embeddings of the eval products in each view, computed on first use (a variant that skips every task
    of a view never embeds it)."""

    def __init__(self, data: EvalData, embed_fn: EmbedFn, cfg: EvalConfig, variant: str, progress: bool):
        self.data, self.embed_fn, self.cfg, self.variant, self.progress = data, embed_fn, cfg, variant, progress
        self.image_rows, self.text_rows = view_rows(data.products)
        self._cache: dict[str, np.ndarray] = {}
        self._texts: dict[tuple[str, ...], np.ndarray] = {}

    def get(self, view: str) -> np.ndarray:
        """Embeddings of view ``gallery`` / ``image_title`` (every product) or ``image`` / ``text`` (the products
        in :attr:`image_rows` / :attr:`text_rows`, in that order)."""
        if view not in self._cache:
            root, products = self.data.root, self.data.products
            to_item, rows = {
                "gallery": (lambda r: product_item(r, root), None),
                "image_title": (lambda r: product_item(r, root, attributes=False), None),
                "image": (lambda r: product_item(r, root, title=False, attributes=False), self.image_rows),
                "text": (lambda r: {"image": None, "text": product_text(r)}, self.text_rows),
            }[view]
            frame = products if rows is None else products.iloc[rows]
            what = f"{self.variant} products ({view.replace('_', ' + ')} view)"
            self._cache[view] = embed_rows(self.embed_fn, frame, to_item, self.cfg.embed_chunk, what, self.progress)
        return self._cache[view]

    def texts(self, texts: list[str], what: str) -> np.ndarray:
        """Embeddings of label texts, cached (both views of a classification task share them)."""
        key = tuple(texts)
        if key not in self._texts:
            self._texts[key] = embed_texts(self.embed_fn, texts, f"{self.variant} {what}")
        return self._texts[key]


# --- tasks ------------------------------------------------------------------------------------------------


def _retrieval(
    name: str, queries: np.ndarray, gallery: np.ndarray, positives: np.ndarray, cfg: EvalConfig
) -> TaskResult:
    ks = sorted(set(cfg.ks) | set(cfg.curve_ks) | {TOP_KEPT})
    result = positive_ranks(queries, gallery, positives, k=max(ks), batch_size=cfg.search_batch)
    return TaskResult(
        RETRIEVAL,
        name,
        retrieval_metrics(result.ranks, cfg.ks),
        details={
            "curve": recall_curve(result.ranks, cfg.curve_ks),
            "gallery_size": len(gallery),
            "per_item": {"rank": result.ranks, "top": result.indices[:, :TOP_KEPT]},
        },
    )


def run_tasks(
    data: EvalData, embed_fn: EmbedFn, cfg: EvalConfig, progress: bool = False, variant: str = "model"
) -> list[TaskResult]:
    """Run every task for one embedder.

    Args:
        data: from :func:`moon3.eval.data.load_eval_data`.
        embed_fn: the variant's embedder (unit-norm rows out; optional ``modalities``).
        cfg: cut-offs, batch sizes, class template.
        progress: progress bars while embedding.
        variant: name used in progress bars and error messages.

    Returns:
        One :class:`TaskResult` per task in the order of :data:`KINDS`: retrieval, category levels (gallery
        view, then image view), attribute types (image + title view, then image view).
    """
    views = ProductViews(data, embed_fn, cfg, variant, progress)
    results = []
    for qtype, task in QUERY_TASKS.items():
        if (reason := blind_spot(embed_fn, SIDES[task])) is not None:
            results.append(TaskResult(RETRIEVAL, task, None, skipped=reason))
        elif data.queries[qtype].empty:
            results.append(TaskResult(RETRIEVAL, task, None, skipped=_no_queries(qtype)))
        else:
            what = f"{variant} {qtype} queries"
            to_item = lambda r: query_item(r, data.root)  # noqa: E731
            q = embed_rows(embed_fn, data.queries[qtype], to_item, cfg.embed_chunk, what, progress)
            result = _retrieval(task, q, views.get("gallery"), data.positives[qtype], cfg)
            if qtype in data.derived:
                result.details["note"] = data.derived[qtype]
            results.append(result)

    # Intra-product: the text view against the image view, for the products that have both.
    both = np.intersect1d(views.image_rows, views.text_rows)
    for task, (query_view, gallery_view) in zip(INTRA_TASKS, (("text", "image"), ("image", "text")), strict=True):
        if (reason := blind_spot(embed_fn, SIDES[task])) is not None:
            results.append(TaskResult(RETRIEVAL, task, None, skipped=reason))
        elif both.size == 0:
            results.append(TaskResult(RETRIEVAL, task, None, skipped="no eval product has both a text and an image"))
        else:
            q = _rows_of(views, query_view, both)
            g = _rows_of(views, gallery_view, both)
            results.append(_retrieval(task, q, g, np.arange(len(both), dtype=np.int64), cfg))

    confusion = next((f"level_{level}" for level, names in data.categories.items() if len(names) > 1), None)
    for kind, view in ((CLASSIFICATION, "gallery"), (CLASSIFICATION_IMAGE, "image")):
        for level in data.categories:
            name = f"level_{level}"
            results.append(_classify(data, views, kind, view, name, cfg, kind == CLASSIFICATION and name == confusion))
    for kind, view in ((ATTRIBUTES, "image_title"), (ATTRIBUTES_IMAGE, "image")):
        for key in data.attributes:
            results.append(_classify(data, views, kind, view, key, cfg))
    return results


def _no_queries(qtype: str) -> str:
    """Why a query-based retrieval task has nothing to measure."""
    if qtype in DERIVED_VIEWS:
        return f"no eval queries of type {qtype!r}, and no multimodal query to derive them from"
    return f"no eval queries of type {qtype!r}"


def _rows_of(views: ProductViews, view: str, rows: np.ndarray) -> np.ndarray:
    """Embeddings of product ``rows`` in ``view`` (image and text views only hold some rows)."""
    held = views.image_rows if view == "image" else views.text_rows if view == "text" else None
    emb = views.get(view)
    if held is None:
        return emb[rows]
    return emb[np.searchsorted(held, rows)]


@dataclass
class ClassificationTask:
    """What a zero-shot classification task asks: which products, their true class, the class label texts.

    Attributes:
        rows: eval product rows scored (those with a label, and an image for the image-only kinds).
        y_true: true class index of each scored row.
        labels: class names, in index order.
        prompts: the texts embedded for the classes.
        skipped: why the task cannot be scored (then the other fields may be empty).
    """

    rows: np.ndarray
    y_true: np.ndarray
    labels: list[str]
    prompts: list[str]
    skipped: str | None = None


def classification_task(data: EvalData, kind: str, name: str, cfg: EvalConfig) -> ClassificationTask:
    """The items, truth and label prompts of one classification task (also used for chance and majority)."""
    empty = np.zeros(0, dtype=np.int64)
    if kind in (CLASSIFICATION, CLASSIFICATION_IMAGE):
        level = int(name.rsplit("_", 1)[1])
        labels = data.categories[level]
        if len(labels) < 2:
            reason = f"level {level} has a single value in the catalog ({labels[0]!r}): nothing to tell apart"
            return ClassificationTask(empty, empty, labels, [], skipped=reason)
        truth = [p[level - 1] if p is not None and len(p) >= level else None for p in data.products["category_path"]]
        prompts = [cfg.class_template.format(name=n) for n in labels]
        missing = f"no eval product has a level-{level} category"
    else:
        labels = data.attributes[name]
        if len(labels) < 2:
            reason = f"attribute {name!r} has a single value in the catalog ({labels[0]!r}): nothing to tell apart"
            return ClassificationTask(empty, empty, labels, [], skipped=reason)
        truth = [a.get(name) if a else None for a in data.products["attributes"]]
        prompts = [attribute_text(name, v) for v in labels]
        missing = f"no eval product has attribute {name!r}"
    image_only = kind in (CLASSIFICATION_IMAGE, ATTRIBUTES_IMAGE)
    has_image = [_has_image(r) for r in data.products.to_dict("records")] if image_only else None
    rows = np.array(
        [i for i, t in enumerate(truth) if t is not None and (has_image is None or has_image[i])], dtype=np.int64
    )
    if rows.size == 0:
        skipped = f"{missing} and an image" if image_only else missing
        return ClassificationTask(empty, empty, labels, prompts, skipped=skipped)
    index = {label: i for i, label in enumerate(labels)}
    y_true = np.array([index[truth[i]] for i in rows], dtype=np.int64)
    return ClassificationTask(rows, y_true, labels, prompts)


def _classify(
    data: EvalData, views: ProductViews, kind: str, view: str, name: str, cfg: EvalConfig, confusion: bool = False
) -> TaskResult:
    task = classification_task(data, kind, name, cfg)
    if task.skipped is not None:
        return TaskResult(kind, name, None, skipped=task.skipped)
    if (reason := blind_spot(views.embed_fn, SIDES[kind])) is not None:
        return TaskResult(kind, name, None, skipped=reason)
    what = f"level-{name.rsplit('_', 1)[1]} category names" if kind.startswith(CLASSIFICATION) else f"{name!r} labels"
    class_emb = views.texts(task.prompts, what)
    items = _rows_of(views, view, task.rows)
    y_pred = zero_shot_predict(items, class_emb)  # once: the metrics and the per-item outcomes share it
    out = prediction_metrics(task.y_true, y_pred, len(class_emb), with_confusion=confusion) if len(y_pred) else None
    details: dict[str, Any] = {"labels": task.labels}
    if out is not None and "confusion" in out:
        details["confusion"] = out.pop("confusion")
    correct = y_pred == task.y_true
    details["per_item"] = {"correct": correct, "row": task.rows}
    return TaskResult(kind, name, out, details=details)
