"""Qualitative examples for the report: a few queries of each type with a variant's top-5 products.

Thumbnails are small PNGs as base64 data URIs, so the HTML report stays one self-contained file. The examples
are a seeded sample of the eval queries, the same for every run with the same data and seed.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

from moon3.data.io import load_image
from moon3.eval.config import EvalConfig
from moon3.eval.data import QUERY_TASKS, EvalData
from moon3.eval.tasks import RETRIEVAL, EmbedFn, TaskResult
from moon3.model.items import query_item

THUMB_SIDE = 72


def thumbnail_data_uri(uri: Any, root: str | Path | None, side: int = THUMB_SIDE) -> str | None:
    """``data:image/png;base64,...`` of a small copy of the image, or None when there is none or it cannot be
    read (a report is not the place to fail on an image the tasks already read)."""
    if not isinstance(uri, str) or not uri.strip():
        return None
    try:
        image = load_image(uri, root).convert("RGB")
    except (OSError, ValueError):
        return None
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def example_rows(n_queries: int, count: int, seed: int) -> np.ndarray:
    """A seeded sample of ``count`` query rows (all of them when there are fewer), in row order."""
    if n_queries <= count:
        return np.arange(n_queries)
    return np.sort(np.random.default_rng(seed).choice(n_queries, size=count, replace=False))


def build_examples(
    data: EvalData, tasks: list[TaskResult], embed_fn: EmbedFn, cfg: EvalConfig, with_traces: bool
) -> list[dict[str, Any]]:
    """Examples of one variant's retrieval: per query type, ``cfg.example_queries`` queries and their top 5.

    Args:
        data: the evaluated split.
        tasks: the variant's task results (retrieval ones keep their top rows in ``details["per_item"]``).
        embed_fn: the variant's embedder; with ``with_traces`` its ``traces(items)`` writes each query's trace.
        cfg: ``example_queries`` and ``seed``.
        with_traces: the variant embeds with reasoning on.

    Returns:
        One dict per query: ``task``, ``query_id``, ``query_text``, ``query_thumb``, ``positive_id``,
        ``positive_title``, ``positive_thumb``, ``rank``, ``top`` (``product_id``, ``title``, ``thumb``,
        ``positive``) and ``trace`` (None with reasoning off).
    """
    by_key = {t.key: t for t in tasks}
    products = data.products
    examples = []
    for qtype, name in QUERY_TASKS.items():
        result = by_key.get(f"{RETRIEVAL}/{name}")
        if result is None or result.skipped is not None:
            continue
        frame = data.queries[qtype]
        rows = example_rows(len(frame), cfg.example_queries, cfg.seed)
        items = [query_item(frame.iloc[int(r)].to_dict(), data.root, load_images=False) for r in rows]
        traces: list[str | None] = [None] * len(rows)
        if with_traces and callable(getattr(embed_fn, "traces", None)) and len(rows):
            traces = embed_fn.traces([query_item(frame.iloc[int(r)].to_dict(), data.root) for r in rows])
        for r, item, trace in zip(rows, items, traces, strict=True):
            query = frame.iloc[int(r)]
            positive = int(data.positives[qtype][r])
            top = result.details["per_item"]["top"][r]
            examples.append(
                {
                    "task": name,
                    "query_id": str(query["query_id"]),
                    "query_text": item["text"],
                    "query_thumb": thumbnail_data_uri(query.get("query_image"), data.root),
                    "positive_id": str(products["product_id"].iloc[positive]),
                    "positive_title": str(products["title"].iloc[positive]),
                    "positive_thumb": thumbnail_data_uri(products["image"].iloc[positive], data.root),
                    "rank": int(result.details["per_item"]["rank"][r]),
                    "top": [
                        {
                            "product_id": str(products["product_id"].iloc[int(i)]),
                            "title": str(products["title"].iloc[int(i)]),
                            "thumb": thumbnail_data_uri(products["image"].iloc[int(i)], data.root),
                            "positive": int(i) == positive,
                        }
                        for i in top
                    ],
                    "trace": trace,
                }
            )
    return examples
