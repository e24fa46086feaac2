"""The eval split of a dataset folder, indexed for the tasks (:mod:`moon3.eval.tasks`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from moon3.data.schema import read_dataset
from moon3.eval.config import EvalConfig
from moon3.model.items import product_text

# Query type -> retrieval task against the gallery. Category queries (a category name whose positive is one
# product under it) are a training signal; category names are measured by zero-shot classification instead.
QUERY_TASKS = {"text": "text_to_mm", "image": "image_to_mm", "multimodal": "mm_to_mm"}
NOT_RETRIEVAL_QUERY_TYPES = ("category",)
# A single-modality query type a catalog lacks is derived from its multimodal queries: the column kept, the
# other one blanked (a text+image query yields its text-only and its image-only view).
DERIVED_VIEWS = {"text": ("query_text", "query_image"), "image": ("query_image", "query_text")}
DERIVED_NOTE = (
    "derived from multimodal queries: their {qtype}-only view ({n} queries; the catalog has no {qtype} queries)"
)


def _present(values: pd.Series) -> np.ndarray:
    """Non-null, non-blank entries of a string column."""
    return (values.notna() & (values.astype(str).str.strip() != "")).to_numpy(dtype=bool)


def derive_single_modality(queries: pd.DataFrame, qtype: str) -> pd.DataFrame:
    """The ``qtype`` (``text`` / ``image``) view of the multimodal queries in ``queries``.

    Rows keep their ``query_id`` and positive; ``query_type`` becomes ``qtype``; only multimodal queries that have
    the kept input are used. Callers derive only when the catalog has no native ``qtype`` queries (never mixed).
    """
    keep, drop = DERIVED_VIEWS[qtype]
    multimodal = queries[queries["query_type"] == "multimodal"]
    view = multimodal[_present(multimodal[keep])].copy()
    view[drop] = None
    view["query_type"] = qtype
    return view.reset_index(drop=True)


def queries_by_type(queries: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Retrieval queries per type (:data:`QUERY_TASKS`), with text / image views derived from the multimodal
    queries when a type has no native query; ``notes`` says which types were derived (type -> note)."""
    by_type, notes = {}, {}
    for qtype in QUERY_TASKS:
        frame = queries[queries["query_type"] == qtype].reset_index(drop=True)
        if frame.empty and qtype in DERIVED_VIEWS:
            frame = derive_single_modality(queries, qtype)
            if not frame.empty:
                notes[qtype] = DERIVED_NOTE.format(qtype=qtype, n=len(frame))
        by_type[qtype] = frame
    return by_type, notes


@dataclass
class EvalData:
    """The eval split of a dataset, indexed for the tasks.

    Attributes:
        root: dataset folder (images are relative to it).
        products: eval-split products; their row order is the gallery order.
        queries: eval-split queries per query type (capped at ``max_queries_per_task``).
        positives: per query type, each query's gallery row.
        derived: query type -> note, for the types whose queries are views of the multimodal queries (the catalog
            has none of that type; :func:`queries_by_type`).
        categories: per level (1-based), the category names of that level across the whole catalog.
        attributes: per attribute type, its values across the whole catalog.
        train_texts: texts of the train-split products (title and attributes), what a reference may fit on.
        counts: products and queries per split, and eval queries per type, in the whole dataset before caps and
            before category queries are left out (for the provenance block).
    """

    root: Path
    products: pd.DataFrame
    queries: dict[str, pd.DataFrame]
    positives: dict[str, np.ndarray]
    categories: dict[int, list[str]]
    attributes: dict[str, list[str]]
    train_texts: list[str]
    counts: dict[str, dict[str, int]]
    derived: dict[str, str] = field(default_factory=dict)


def _cap(frame: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    if limit <= 0 or len(frame) <= limit:
        return frame
    keep = np.sort(np.random.default_rng(seed).choice(len(frame), size=limit, replace=False))
    return frame.iloc[keep].reset_index(drop=True)


def _counts(values: pd.Series) -> dict[str, int]:
    return {"total": len(values), **{str(k): int(v) for k, v in values.value_counts().sort_index().items()}}


def load_eval_data(data_dir: str | Path, cfg: EvalConfig) -> EvalData:
    """Read a dataset folder and index its eval split for the tasks.

    With ``cfg.max_products`` the gallery is a seeded sample of the eval products and only the queries of
    sampled products are kept; ``cfg.max_queries_per_task`` then samples queries per type. Category queries
    are left out (see :data:`NOT_RETRIEVAL_QUERY_TYPES`). A text or image type without eval queries is derived
    from the eval multimodal queries (:func:`queries_by_type`, listed in ``derived``).

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
    unknown_types = sorted(set(queries["query_type"]) - set(QUERY_TASKS) - set(NOT_RETRIEVAL_QUERY_TYPES))
    if unknown_types:
        bad = queries.loc[queries["query_type"].isin(unknown_types), "query_id"].head(5).tolist()
        known = [*QUERY_TASKS, *NOT_RETRIEVAL_QUERY_TYPES]
        raise ValueError(f"{root}: query_type {unknown_types} is not one of {known}, e.g. {bad}")
    queries = queries[queries["query_type"].isin(QUERY_TASKS)].reset_index(drop=True)
    position = {pid: i for i, pid in enumerate(products["product_id"])}
    known_positive = queries["positive_product_id"].isin(position)
    if not known_positive.all():
        bad = queries.loc[~known_positive, "query_id"].head(5).tolist()
        raise ValueError(
            f"{root}: {int((~known_positive).sum())} eval queries point at products outside the eval split, e.g. {bad}"
        )
    if 0 < cfg.max_products < len(products):
        products = _cap(products, cfg.max_products, cfg.seed)
        queries = queries[queries["positive_product_id"].isin(set(products["product_id"]))].reset_index(drop=True)
        position = {pid: i for i, pid in enumerate(products["product_id"])}
    by_type, derived = queries_by_type(queries)
    positives = {}
    for qtype, frame in by_type.items():
        by_type[qtype] = frame = _cap(frame, cfg.max_queries_per_task, cfg.seed)
        positives[qtype] = frame["positive_product_id"].map(position).to_numpy(dtype=np.int64)
    categories: dict[int, set[str]] = {}
    for path in all_products["category_path"]:
        for level, name in enumerate(path if path is not None else [], start=1):
            categories.setdefault(level, set()).add(name)
    attributes: dict[str, set[str]] = {}
    for attrs in all_products["attributes"]:
        for key, value in (attrs or {}).items():
            attributes.setdefault(key, set()).add(value)
    train = all_products[all_products["split"] == "train"]
    return EvalData(
        root=root,
        products=products,
        queries=by_type,
        positives=positives,
        categories={level: sorted(names) for level, names in sorted(categories.items())},
        attributes={key: sorted(values) for key, values in sorted(attributes.items())},
        train_texts=[t for t in (product_text(r) for r in train.to_dict("records")) if t],
        counts={
            "products_by_split": _counts(all_products["split"]),
            "queries_by_split": _counts(all_queries["split"]),
            "eval_queries_by_type": _counts(all_queries.loc[all_queries["split"] == "eval", "query_type"]),
        },
        derived=derived,
    )
