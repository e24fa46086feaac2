"""A quick held-out check run by training: text -> multimodal Recall@K on a slice of the eval split.

It uses direct embeddings (reasoning off) so it costs seconds; the full protocol is ``moon3 evaluate``. The
text queries are the eval split's own, or, when it has none, the text views of its multimodal queries (as the
evaluation derives them, :func:`moon3.eval.data.queries_by_type`). With neither (a products-only catalog) the
check is skipped: :func:`record_heldout` then leaves the number out of the metrics and lists it under
``skipped`` with the reason, so no metrics file ever holds a NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moon3.data.schema import read_dataset
from moon3.eval.data import queries_by_type
from moon3.eval.metrics import retrieval_recall_at_k
from moon3.eval.search import rank_of_positive
from moon3.model.items import product_item, query_item


@dataclass(frozen=True)
class HeldoutResult:
    """The held-out Recall@K, or why it could not be measured.

    Attributes:
        value: Recall@K; None when skipped.
        skipped: the reason there was nothing to measure; None when measured.
        note: how the queries were made when they are derived (text views of multimodal queries), else None.
        n: queries measured.
    """

    value: float | None
    skipped: str | None = None
    note: str | None = None
    n: int = 0


@torch.no_grad()
def heldout_text_recall(
    embedder, data_dir: str | Path, k: int = 10, max_queries: int = 200, batch_size: int = 64, seed: int = 0
) -> HeldoutResult:
    """Recall@``k`` of eval-split text queries against the eval-split product gallery (direct embeddings)."""
    products, queries = read_dataset(data_dir)
    gallery = products[products["split"] == "eval"].reset_index(drop=True)
    if gallery.empty:
        return HeldoutResult(None, skipped="no eval products")
    queries = queries[(queries["split"] == "eval") & queries["positive_product_id"].isin(gallery["product_id"])]
    by_type, derived = queries_by_type(queries)
    texts = by_type["text"]
    if texts.empty:
        return HeldoutResult(None, skipped="no eval text queries, and no multimodal query to take a text view of")
    if len(texts) > max_queries:
        texts = texts.sample(max_queries, random_state=seed)
    was_training = embedder.training
    embedder.eval()
    g = embedder.embed(
        [product_item(r, data_dir) for _, r in gallery.iterrows()], reasoning=False, batch_size=batch_size
    )
    q = embedder.embed([query_item(r, data_dir) for _, r in texts.iterrows()], reasoning=False, batch_size=batch_size)
    embedder.train(was_training)
    position = {pid: i for i, pid in enumerate(gallery["product_id"])}
    positives = texts["positive_product_id"].map(position).to_numpy()
    ranks = rank_of_positive((q @ g.T).float().cpu().numpy(), positives)
    value = retrieval_recall_at_k(np.asarray(ranks), k)
    return HeldoutResult(value, note=derived.get("text"), n=len(texts))


def record_heldout(summary: dict[str, Any], key: str, result: HeldoutResult) -> None:
    """Put ``result`` into a metrics summary: the number under ``key`` (and its note under ``notes``), or ``key``
    listed in ``summary["skipped"]`` with the reason."""
    if result.value is None:
        summary.setdefault("skipped", {})[key] = result.skipped or "nothing to measure"
        return
    summary[key] = result.value
    if result.note:
        summary.setdefault("notes", {})[key] = result.note
