"""A quick held-out check run by training: text -> multimodal Recall@K on a slice of the eval split.

It uses direct embeddings (reasoning off) so it costs seconds; the full protocol is ``moon3 evaluate``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moon3.data.schema import read_dataset
from moon3.eval.metrics import retrieval_recall_at_k
from moon3.eval.search import rank_of_positive
from moon3.model.items import product_item, query_item


@torch.no_grad()
def heldout_text_recall(
    embedder, data_dir: str | Path, k: int = 10, max_queries: int = 200, batch_size: int = 64, seed: int = 0
) -> float:
    """Recall@``k`` of eval-split text queries against the eval-split product gallery (direct embeddings)."""
    products, queries = read_dataset(data_dir)
    gallery = products[products["split"] == "eval"].reset_index(drop=True)
    texts = queries[(queries["split"] == "eval") & (queries["query_type"] == "text")]
    texts = texts[texts["positive_product_id"].isin(gallery["product_id"])]
    if len(texts) > max_queries:
        texts = texts.sample(max_queries, random_state=seed)
    if texts.empty:
        return float("nan")
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
    return float(retrieval_recall_at_k(np.asarray(ranks), k))
