"""Exact inner-product search and the rank of each query's positive.

Everything here is exact: FAISS's flat inner-product kernel (the one ``IndexFlatIP.search`` runs) over the whole
gallery, batched over queries so a gallery of millions of float32 rows needs memory for the gallery plus one
batch of scores, never a full (queries x gallery) matrix.

**Rank convention (one definition for evaluation and for the RL reward).** The rank of the positive is::

    rank = 1 + #{j != pos : s_j >= s_pos - TIE_TOLERANCE}

so a tie counts *against* the query: a gallery item with the positive's score ranks ahead of it. A collapsed
model (every score equal) therefore gets the worst rank, not the best, and cannot game Recall@K or a rank-based
reward with ties. :func:`rank_of_positive` is that definition on a score matrix (numpy or torch);
:func:`positive_ranks` computes the same number at gallery scale.

Why a tolerance: one sgemm call does not give identical rows identical scores. OpenBLAS rounds a row's dot
product differently depending on where the row falls in its blocking (measured: an exact copy of the positive
scored 1.2e-7 above or below it, so the copy sometimes ranked behind it). Scores are cosines of unit vectors and
the rounding measured ~1e-7 at dims 24..4096, so :data:`TIE_TOLERANCE` (1e-6) makes every exact duplicate tie,
whichever kernel or block scored it, while two items a model really tells apart differ by far more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm


@dataclass
class SearchResult:
    """Top-k neighbours and the exact rank of each query's positive.

    Attributes:
        scores: (n_queries, k) inner products, best first.
        indices: (n_queries, k) gallery row of each neighbour.
        ranks: (n_queries,) rank of the positive, 1-based, ties counted against the query.
    """

    scores: np.ndarray
    indices: np.ndarray
    ranks: np.ndarray


def rank_of_positive(scores: Any, positives: Any) -> Any:
    """Rank of each row's positive column: ``1 + #{j != pos : s_j >= s_pos - TIE_TOLERANCE}`` (ties count
    against the query).

    Args:
        scores: (n_queries, n_items) similarity matrix, numpy array or torch tensor.
        positives: (n_queries,) column of each row's positive.

    Returns:
        (n_queries,) int ranks in ``[1, n_items]``, of the same library as ``scores``.

    Raises:
        ValueError: a positive is out of range, or a positive's score is NaN (its rank would be undefined).
    """
    if type(scores).__module__.startswith("torch"):
        import torch

        positives = torch.as_tensor(positives, device=scores.device, dtype=torch.long)
        _check_positives(positives.cpu().numpy(), scores.shape)
        s_pos = scores[torch.arange(scores.shape[0], device=scores.device), positives]
        if torch.isnan(s_pos).any():
            raise ValueError(f"NaN score for the positive of row(s) {torch.nonzero(torch.isnan(s_pos)).flatten()}")
        # The positive compares >= to itself, so the count already includes the leading "1 +".
        return (scores >= s_pos[:, None] - TIE_TOLERANCE).sum(dim=1)
    scores = np.asarray(scores)
    positives = np.asarray(positives, dtype=np.int64)
    _check_positives(positives, scores.shape)
    s_pos = scores[np.arange(scores.shape[0]), positives]
    if np.isnan(s_pos).any():
        raise ValueError(f"NaN score for the positive of row(s) {np.flatnonzero(np.isnan(s_pos)).tolist()}")
    return (scores >= s_pos[:, None] - TIE_TOLERANCE).sum(axis=1).astype(np.int64)


def _check_positives(positives: np.ndarray, shape: tuple[int, ...]) -> None:
    if len(shape) != 2 or positives.shape != (shape[0],):
        raise ValueError(
            f"scores must be (n_queries, n_items) and positives (n_queries,); got {shape}, {positives.shape}"
        )
    bad = np.flatnonzero((positives < 0) | (positives >= shape[1]))
    if bad.size:
        raise ValueError(f"positive out of range [0, {shape[1]}) for query row(s) {bad[:10].tolist()}")


# Scores closer than this to the positive's count as ties (against the query); see the module docstring.
TIE_TOLERANCE = 1e-6

# Gallery rows per FAISS sgemm block. FAISS's default (1024) makes thin matrix products; 4096 cut the CPU time
# of a 4096 x 200k x 256 search by ~25 % on the 2-core dev machine (bench/bench_search.py) for a 64 MB block.
FAISS_DATABASE_BLOCK = 4096


@contextlib.contextmanager
def _blas_always() -> Iterator[None]:
    """Make FAISS use its sgemm path for every batch size, with larger gallery blocks.

    Below ``distance_compute_blas_threshold`` FAISS switches to a SIMD dot-product loop whose rounding differs
    from sgemm's by more than the rounding :data:`TIE_TOLERANCE` absorbs within one kernel, so two equal items
    could score differently depending on the batch size. The previous global settings are restored on exit.
    """
    previous = faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_threshold = 0
    faiss.cvar.distance_compute_blas_database_bs = FAISS_DATABASE_BLOCK
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs = previous


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows, dim) array, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def exact_search(
    queries: np.ndarray,
    gallery: np.ndarray | faiss.IndexFlatIP,
    k: int,
    batch_size: int = 4096,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, batched over queries.

    Args:
        queries: (n_queries, dim) float32 (other dtypes are converted batch by batch).
        gallery: (n_gallery, dim) array, searched in place with FAISS's flat inner-product kernel (no copy
            into an index), or a ready ``faiss.IndexFlatIP``.
        k: neighbours per query; capped at the gallery size.
        batch_size: queries per FAISS call; bounds the temporary score memory.
        progress: show a progress bar over batches.

    Returns:
        ``(scores, indices)``, each (n_queries, min(k, n_gallery)), best first; equal scores are listed by
        ascending gallery index.
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
    queries = np.asarray(queries)
    if queries.ndim != 2:
        raise ValueError(f"queries must be a 2-D (rows, dim) array, got shape {queries.shape}")
    if isinstance(gallery, faiss.Index):
        n_gallery, dim = gallery.ntotal, gallery.d
        if gallery.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("gallery index must use the inner-product metric (faiss.IndexFlatIP)")
    else:
        gallery = _as_matrix(gallery, "gallery")
        n_gallery, dim = gallery.shape
    if queries.shape[1] != dim:
        raise ValueError(f"queries have dim {queries.shape[1]}, gallery has dim {dim}")
    if n_gallery == 0:
        raise ValueError("gallery is empty: nothing to search")
    k = min(k, n_gallery)
    scores = np.empty((len(queries), k), dtype=np.float32)
    indices = np.empty((len(queries), k), dtype=np.int64)
    starts = range(0, len(queries), batch_size)
    with _blas_always():
        for start in tqdm(starts, desc="exact search", disable=not progress or len(starts) < 2):
            batch = np.ascontiguousarray(queries[start : start + batch_size], dtype=np.float32)
            if isinstance(gallery, faiss.Index):
                d, i = gallery.search(batch, k)
            else:
                d, i = faiss.knn(batch, gallery, k, metric=faiss.METRIC_INNER_PRODUCT)
            # FAISS's heap leaves equal scores in no particular order; fix it so results are reproducible.
            order = np.lexsort((i, -d), axis=1)
            scores[start : start + len(batch)] = np.take_along_axis(d, order, axis=1)
            indices[start : start + len(batch)] = np.take_along_axis(i, order, axis=1)
    return scores, indices


def positive_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    positives: np.ndarray,
    k: int = 10,
    batch_size: int = 4096,
    chunk_size: int = 32768,
    progress: bool = False,
) -> SearchResult:
    """Top-k search plus the exact rank of each query's positive (see the module docstring for ties).

    The top-k pass settles every query whose positive scores strictly above its k-th neighbour (then all items
    that tie with or beat the positive are among the k). Only the other queries, whose positive ranks about k or
    lower, get a second counting pass over the gallery, so a good model pays for one search and a bad one for
    at most two.

    Args:
        queries: (n_queries, dim).
        gallery: (n_gallery, dim).
        positives: (n_queries,) gallery row of each query's positive.
        k: neighbours kept from the top-k pass (use the largest Recall@K cut-off).
        batch_size: queries per FAISS call and per counting block.
        chunk_size: gallery rows per block in the counting pass.
        progress: show progress bars.

    Returns:
        The top-k scores and indices and the exact ranks.
    """
    queries = _as_matrix(queries, "queries")
    gallery = _as_matrix(gallery, "gallery")
    positives = np.asarray(positives, dtype=np.int64)
    _check_positives(positives, (len(queries), len(gallery)))
    scores, indices = exact_search(queries, gallery, k, batch_size=batch_size, progress=progress)
    k = scores.shape[1]
    hit = indices == positives[:, None]
    found = hit.any(axis=1)
    # The positive's score from the same sgemm call as its neighbours' (bitwise comparable).
    s_pos = np.where(found, np.where(hit, scores, -np.inf).max(axis=1), -np.inf)
    settled = found & ((s_pos - TIE_TOLERANCE > scores[:, -1]) | (k == len(gallery)))
    ranks = np.zeros(len(queries), dtype=np.int64)
    others_ahead = ((scores >= s_pos[:, None] - TIE_TOLERANCE) & ~hit).sum(axis=1)
    ranks[settled] = 1 + others_ahead[settled]
    todo = np.flatnonzero(~settled)
    if todo.size:
        ranks[todo] = _count_ranks(queries[todo], gallery, positives[todo], batch_size, chunk_size, progress)
    return SearchResult(scores=scores, indices=indices, ranks=ranks)


def _count_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    positives: np.ndarray,
    batch_size: int,
    chunk_size: int,
    progress: bool,
) -> np.ndarray:
    """Exact ranks by a full scan: ``1 + #{j != pos : s_j >= s_pos - TIE_TOLERANCE}``, block by block."""
    ranks = np.ones(len(queries), dtype=np.int64)
    batch_size = min(batch_size, 1024)  # bounds the (batch x chunk) score block to ~150 MB
    starts = range(0, len(queries), batch_size)
    for start in tqdm(starts, desc="exact ranks", disable=not progress):
        q = queries[start : start + batch_size]
        pos = positives[start : start + batch_size]
        pos_rows = gallery[pos]
        rows = np.arange(len(q))
        for c0 in range(0, len(gallery), chunk_size):
            chunk = gallery[c0 : c0 + chunk_size]
            # Positives ride along as extra columns, so s_pos comes from the very sgemm call that scores
            # this chunk: an exact duplicate of the positive ties (within TIE_TOLERANCE).
            block = q @ np.concatenate([chunk, pos_rows]).T
            s_pos = block[rows, len(chunk) + rows]
            ahead = (block[:, : len(chunk)] >= s_pos[:, None] - TIE_TOLERANCE).sum(axis=1)
            inside = (pos >= c0) & (pos < c0 + len(chunk))
            ahead[inside] -= block[rows[inside], pos[inside] - c0] >= s_pos[inside] - TIE_TOLERANCE
            ranks[start : start + len(q)] += ahead
    return ranks
