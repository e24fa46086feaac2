"""The MBE3.0-style tasks (method.md section 6) over a dataset folder, written against an abstract embedder.

An embedder is any ``embed_fn(items) -> array`` that maps a list of ``{"image": PIL.Image | None, "text": str |
None}`` dicts to an (n, dim) array (numpy or torch) of unit-norm rows. The tasks never see a model; the stage
function in :mod:`moon3.eval.evaluate` passes one embedder per model variant.

Rows become items through :mod:`moon3.model.items`, the same code training and serving use.

Tasks, all on the ``eval`` split:

- retrieval ``text_to_mm`` / ``image_to_mm`` / ``mm_to_mm``: queries of that ``query_type`` against the gallery
  of eval products embedded as image + title; the positive is ``positive_product_id``.
- retrieval ``text_to_image`` / ``image_to_text``: intra-product, a product's text (title and attributes, as
  :func:`moon3.model.items.product_text` builds it for training) against the images of all eval products (and
  the reverse); the positive is the same product. Products without a text or an image sit these two out.
- classification ``level_N``: the product embedding against the category names of level N (every name used at
  that level anywhere in the catalog), argmax wins; level 1 also keeps its confusion matrix.
- attributes ``<type>``: the product embedding against ``"<type>: <value>"`` for every value of that type in the
  catalog; products without that attribute sit it out. A type with a single value is skipped (nothing to tell).

A task with nothing to measure (no image queries, say) comes back with ``skipped`` set to the reason instead of
metrics; it never raises and never produces NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from moon3.data.schema import read_dataset
from moon3.eval.config import EvalConfig
from moon3.eval.metrics import classification_metrics, recall_curve, retrieval_metrics
from moon3.eval.search import positive_ranks
from moon3.model.items import product_item, product_text, query_item

EmbedFn = Callable[[list[dict[str, Any]]], Any]

RETRIEVAL = "retrieval"
CLASSIFICATION = "classification"
ATTRIBUTES = "attributes"
QUERY_TASKS = {"text": "text_to_mm", "image": "image_to_mm", "multimodal": "mm_to_mm"}
INTRA_TASKS = ("text_to_image", "image_to_text")
RETRIEVAL_TASKS = (*QUERY_TASKS.values(), *INTRA_TASKS)


# --- data -------------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """One task of one variant: metrics, or the reason it was skipped.

    Attributes:
        kind: ``retrieval``, ``classification`` or ``attributes``.
        name: e.g. ``text_to_mm``, ``level_1``, ``color``.
        metrics: numbers (``recall_at_K``, ``mrr``, ``accuracy``, ``macro_f1``, ``n``); ``None`` when skipped.
        skipped: why there is nothing to measure; ``None`` when it ran.
        details: plot data (``curve``: {K: recall}) and the level-1 confusion matrix with its ``labels``.
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


@dataclass
class EvalData:
    """The eval split of a dataset, indexed for the tasks.

    Attributes:
        root: dataset folder (images are relative to it).
        products: eval-split products; their row order is the gallery order.
        queries: eval-split queries per query type (capped at ``max_queries_per_task``).
        positives: per query type, each query's gallery row.
        categories: per level (1-based), the category names of that level across the whole catalog.
        attributes: per attribute type, its values across the whole catalog.
    """

    root: Path
    products: pd.DataFrame
    queries: dict[str, pd.DataFrame]
    positives: dict[str, np.ndarray]
    categories: dict[int, list[str]]
    attributes: dict[str, list[str]]


def _cap(frame: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    if limit <= 0 or len(frame) <= limit:
        return frame
    keep = np.sort(np.random.default_rng(seed).choice(len(frame), size=limit, replace=False))
    return frame.iloc[keep].reset_index(drop=True)


def load_eval_data(data_dir: str | Path, cfg: EvalConfig) -> EvalData:
    """Read a dataset folder and index its eval split for the tasks.

    With ``cfg.max_products`` the gallery is a seeded sample of the eval products and only the queries of
    sampled products are kept; ``cfg.max_queries_per_task`` then samples queries per type.

    Raises:
        ValueError: no eval products, an unknown query type, or eval queries whose positive is not an eval
            product (the message names the query ids).
    """
    root = Path(data_dir)
    all_products, all_queries = read_dataset(root)
    products = all_products[all_products["split"] == "eval"].reset_index(drop=True)
    if products.empty:
        raise ValueError(f"{root}: no products with split == 'eval'; nothing to evaluate against")
    queries = all_queries[all_queries["split"] == "eval"].reset_index(drop=True)
    unknown_types = sorted(set(queries["query_type"]) - set(QUERY_TASKS))
    if unknown_types:
        bad = queries.loc[queries["query_type"].isin(unknown_types), "query_id"].head(5).tolist()
        raise ValueError(f"{root}: query_type {unknown_types} is not one of {list(QUERY_TASKS)}, e.g. {bad}")
    position = {pid: i for i, pid in enumerate(products["product_id"])}
    known = queries["positive_product_id"].isin(position)
    if not known.all():
        bad = queries.loc[~known, "query_id"].head(5).tolist()
        raise ValueError(
            f"{root}: {int((~known).sum())} eval queries point at products outside the eval split, e.g. {bad}"
        )
    if 0 < cfg.max_products < len(products):
        products = _cap(products, cfg.max_products, cfg.seed)
        queries = queries[queries["positive_product_id"].isin(set(products["product_id"]))].reset_index(drop=True)
        position = {pid: i for i, pid in enumerate(products["product_id"])}
    by_type, positives = {}, {}
    for qtype in QUERY_TASKS:
        frame = _cap(queries[queries["query_type"] == qtype].reset_index(drop=True), cfg.max_queries_per_task, cfg.seed)
        by_type[qtype] = frame
        positives[qtype] = frame["positive_product_id"].map(position).to_numpy(dtype=np.int64)
    categories: dict[int, list[str]] = {}
    for path in all_products["category_path"]:
        for level, name in enumerate(path or [], start=1):
            categories.setdefault(level, set()).add(name)  # type: ignore[arg-type]
    attributes: dict[str, set[str]] = {}
    for attrs in all_products["attributes"]:
        for key, value in (attrs or {}).items():
            attributes.setdefault(key, set()).add(value)
    return EvalData(
        root=root,
        products=products,
        queries=by_type,
        positives=positives,
        categories={level: sorted(names) for level, names in sorted(categories.items())},
        attributes={key: sorted(values) for key, values in sorted(attributes.items())},
    )


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
    for start in tqdm(starts, desc=f"embed {what}", disable=not progress):
        items = [to_item(row) for row in records[start : start + chunk]]
        parts.append(check_embeddings(embed_fn(items), len(items), what))
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def embed_texts(embed_fn: EmbedFn, texts: Sequence[str], what: str) -> np.ndarray:
    """Embed plain texts (class names, ``"type: value"`` strings)."""
    items = [{"image": None, "text": t} for t in texts]
    return check_embeddings(embed_fn(items), len(items), what)


# --- tasks ------------------------------------------------------------------------------------------------


def _retrieval(
    name: str, queries: np.ndarray, gallery: np.ndarray, positives: np.ndarray, cfg: EvalConfig, skip_reason: str
) -> TaskResult:
    if len(queries) == 0:
        return TaskResult(RETRIEVAL, name, None, skipped=skip_reason)
    ks = sorted(set(cfg.ks) | set(cfg.curve_ks))
    result = positive_ranks(queries, gallery, positives, k=max(ks), batch_size=cfg.search_batch)
    return TaskResult(
        RETRIEVAL,
        name,
        retrieval_metrics(result.ranks, cfg.ks),
        details={"curve": recall_curve(result.ranks, cfg.curve_ks), "gallery_size": len(gallery)},
    )


def run_tasks(
    data: EvalData, embed_fn: EmbedFn, cfg: EvalConfig, progress: bool = False, variant: str = "model"
) -> list[TaskResult]:
    """Run every task for one embedder.

    Args:
        data: from :func:`load_eval_data`.
        embed_fn: the variant's embedder (unit-norm rows out).
        cfg: cut-offs, batch sizes, text templates.
        progress: progress bars while embedding.
        variant: name used in progress bars and error messages.

    Returns:
        One :class:`TaskResult` per task, retrieval first, then classification levels, then attribute types.
    """
    chunk, root = cfg.embed_chunk, data.root
    products = data.products
    mm = embed_rows(embed_fn, products, lambda r: product_item(r, root), chunk, f"{variant} products", progress)
    results = []
    for qtype, task in QUERY_TASKS.items():
        what = f"{variant} {qtype} queries"
        q = embed_rows(embed_fn, data.queries[qtype], lambda r: query_item(r, root), chunk, what, progress)
        results.append(_retrieval(task, q, mm, data.positives[qtype], cfg, f"no eval queries of type {qtype!r}"))

    # Intra-product: the text side alone against the image side alone, for products that have both.
    has_both = [
        bool(product_text(r)) and isinstance(r["image"], str) and bool(r["image"].strip())
        for r in products.to_dict("records")
    ]
    both = products[has_both].reset_index(drop=True)
    text_item = lambda r: {"image": None, "text": product_text(r)}  # noqa: E731
    image_item = lambda r: {"image": product_item(r, root)["image"], "text": None}  # noqa: E731
    texts = embed_rows(embed_fn, both, text_item, chunk, f"{variant} product texts", progress)
    images = embed_rows(embed_fn, both, image_item, chunk, f"{variant} product images", progress)
    same = np.arange(len(both), dtype=np.int64)
    reason = "no eval product has both a text and an image"
    results.append(_retrieval("text_to_image", texts, images, same, cfg, reason))
    results.append(_retrieval("image_to_text", images, texts, same, cfg, reason))

    for level, names in data.categories.items():
        results.append(_classify_level(data, mm, level, names, embed_fn, cfg, variant))
    for key, values in data.attributes.items():
        results.append(_predict_attribute(data, mm, key, values, embed_fn, cfg, variant))
    return results


def _classify_level(
    data: EvalData, mm: np.ndarray, level: int, names: list[str], embed_fn: EmbedFn, cfg: EvalConfig, variant: str
) -> TaskResult:
    name = f"level_{level}"
    index = {n: i for i, n in enumerate(names)}
    paths = data.products["category_path"]
    rows = np.array([i for i, p in enumerate(paths) if p is not None and len(p) >= level], dtype=np.int64)
    if rows.size == 0:
        return TaskResult(CLASSIFICATION, name, None, skipped=f"no eval product has a level-{level} category")
    y_true = np.array([index[paths.iloc[i][level - 1]] for i in rows], dtype=np.int64)
    class_emb = embed_texts(
        embed_fn, [cfg.class_template.format(name=n) for n in names], f"{variant} level-{level} category names"
    )
    out = classification_metrics(mm[rows], class_emb, y_true, with_confusion=level == 1)
    details = {"labels": names}
    if out is not None and "confusion" in out:
        details["confusion"] = out.pop("confusion")
    return TaskResult(CLASSIFICATION, name, out, details=details)


def _predict_attribute(
    data: EvalData, mm: np.ndarray, key: str, values: list[str], embed_fn: EmbedFn, cfg: EvalConfig, variant: str
) -> TaskResult:
    if len(values) < 2:
        return TaskResult(ATTRIBUTES, key, None, skipped=f"attribute {key!r} has a single value in the catalog")
    index = {v: i for i, v in enumerate(values)}
    attrs = data.products["attributes"]
    rows = np.array([i for i, a in enumerate(attrs) if a and key in a], dtype=np.int64)
    if rows.size == 0:
        return TaskResult(ATTRIBUTES, key, None, skipped=f"no eval product has attribute {key!r}")
    y_true = np.array([index[attrs.iloc[i][key]] for i in rows], dtype=np.int64)
    texts = [cfg.attribute_template.format(type=key, value=v) for v in values]
    value_emb = embed_texts(embed_fn, texts, f"{variant} attribute {key!r} values")
    return TaskResult(ATTRIBUTES, key, classification_metrics(mm[rows], value_emb, y_true), details={"labels": values})
