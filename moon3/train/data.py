"""Training pairs and the batch sampler of contrastive pretraining.

A batch is ``batch_size`` (query, positive product) pairs plus ``hard_negatives_per_query`` hard negatives per
query. Which pairs and negatives land in batch ``step`` is a pure function of ``(seed, step)``, so a resumed
run sees exactly the batches the uninterrupted run would have seen, and every data-parallel rank can take its
own shard of the same global batch without communication.

Hard negatives (method.md section 4) are products of the positive's leaf category that share as many of its
attribute values as possible without being the same item (on mbe3-mini: same shape, colour and size, another
logo, material or brand), so a batch cannot be separated by shortcuts alone. The rule reads only the
catalog's own attribute keys, so it works on any catalog. A category-name query (``query_type: category``)
is answered by every product under that category: its hard negatives come from sibling categories, and
:meth:`PairData.relevant` tells the loss which in-batch products must not count as its negatives.

A products-only catalog (no query in the split) trains on intra-product pairs, as CLIP-style pretraining does:
each product with both a text and an image yields one derived pair, its title + attributes (the query side, a
text item) against its own image (the product side, shown as the image alone: :attr:`PairData.product_view`).
The symmetric loss then aligns text with image in both directions; hard negatives are images of the same leaf
category. :attr:`PairData.notice` says so, for the training loop to print.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moon3.data.schema import QUERIES, SCHEMAS, TRACES, read_dataset, read_table, table_path
from moon3.model.items import product_text


@dataclass
class PairBatch:
    """One rank's shard of a global batch: row positions into :class:`PairData` tables."""

    query_rows: np.ndarray  # positions in PairData.queries
    product_rows: np.ndarray  # positives first (aligned with query_rows), then hard negatives
    n_positives: int
    step: int = 0  # the micro-step it was drawn for: keys per-batch randomness (trace dropout) for exact resume


HARD_NEGATIVE_MODES = ("same_category", "attribute_matched", "mixed")
INTRA_PRODUCT_VIEW = {"title": False, "attributes": False}  # the product side of a derived pair: its image alone
INTRA_PRODUCT_SUFFIX = "#text-view"  # derived query id = product id + this


def intra_product_pairs(products: pd.DataFrame) -> pd.DataFrame:
    """Derived ``queries`` rows of a products-only catalog: per product with a text and an image, its title +
    attributes as a text query whose positive is the product itself (see the module docstring)."""
    rows = []
    for row in products.to_dict("records"):
        text, image = product_text(row), row.get("image")
        if text and isinstance(image, str) and image.strip():
            rows.append({"query_id": f"{row['product_id']}{INTRA_PRODUCT_SUFFIX}", "query_text": text,
                         "query_image": None, "positive_product_id": row["product_id"], "split": row.get("split"),
                         "query_type": "text"})  # fmt: skip
    return pd.DataFrame(rows, columns=SCHEMAS[QUERIES].names)


class PairData:
    """Training queries with their positives, products indexed by category, and optional traces.

    Attributes:
        product_view: keyword arguments of :func:`moon3.model.items.product_item` for the product side of a pair
            (empty: the whole product; :data:`INTRA_PRODUCT_VIEW` for the derived pairs of a products-only split).
        notice: a line for the training log when the pairs are derived (products-only split), else None.
    """

    def __init__(self, root: str | Path, split: str = "train", traces_dir: str | Path | None = None):
        self.root = Path(root)
        self.traces_dir = Path(traces_dir) if traces_dir else None
        products, queries = read_dataset(self.root)
        self.products = products[products["split"] == split].reset_index(drop=True)
        queries = queries[queries["split"] == split]
        self.product_view: dict[str, bool] = {}
        self.notice: str | None = None
        if queries.empty and not self.products.empty:
            queries = intra_product_pairs(self.products)
            self.product_view = dict(INTRA_PRODUCT_VIEW)
            self.notice = (
                f"notice: no {split} queries in {root}: training on {len(queries)} intra-product pairs (each product's "
                "title + attributes against its own image, CLIP-style) instead of query-product pairs"
            )
        position = {pid: i for i, pid in enumerate(self.products["product_id"])}
        known = queries["positive_product_id"].isin(position)
        if not known.all():
            bad = queries.loc[~known, "query_id"].head(5).tolist()
            raise ValueError(f"{root}: {int((~known).sum())} {split} queries point at unknown products, e.g. {bad}")
        self.queries = queries.reset_index(drop=True)
        self.positive_rows = self.queries["positive_product_id"].map(position).to_numpy()
        paths = [list(p) if p is not None else [] for p in self.products["category_path"]]
        leaf = np.array([p[-1] if p else "" for p in paths], dtype=object)
        self.category_rows = {name: np.flatnonzero(leaf == name) for name in dict.fromkeys(leaf)}
        self.leaf_of_product = leaf
        # (products, depth) category names, "" past a product's own depth.
        depth = max((len(p) for p in paths), default=0)
        self.path_names = np.array([p + [""] * (depth - len(p)) for p in paths], dtype=object).reshape(-1, depth)
        self.attribute_codes = _attribute_codes(self.products["attributes"])
        self.category_level = self._category_levels()
        self.traces, self.query_traces = self._load_traces()

    def _category_levels(self) -> np.ndarray:
        """Per query: the level (0-based) at which a category query's text names its positive's category; -1
        for every other query (and for a category query whose text is not on its positive's path)."""
        levels = np.full(len(self.queries), -1, dtype=np.int64)
        if "query_type" not in self.queries or self.path_names.shape[1] == 0:
            return levels
        is_category = (self.queries["query_type"] == "category").to_numpy()
        texts = self.queries["query_text"].to_numpy()
        for q in np.flatnonzero(is_category):
            hits = np.flatnonzero(self.path_names[self.positive_rows[q]] == str(texts[q]).strip())
            levels[q] = hits[0] if hits.size else -1
        return levels

    def relevant(self, query_rows: np.ndarray, product_rows: np.ndarray) -> np.ndarray:
        """``(Q, P)`` bool: product ``product_rows[j]`` also answers query ``query_rows[i]`` (it sits under the
        category a category query names). The query's own positive is left to the caller's identity mask."""
        query_rows, product_rows = np.asarray(query_rows), np.asarray(product_rows)
        out = np.zeros((len(query_rows), len(product_rows)), dtype=bool)
        for i, q in enumerate(query_rows):
            level = self.category_level[q]
            if level >= 0:
                name = self.path_names[self.positive_rows[q], level]
                out[i] = self.path_names[product_rows, level] == name
        return out

    def hard_negative_pool(self, query_row: int, rng: np.random.Generator, mode: str = "same_category") -> np.ndarray:
        """Candidate hard negatives of a query, best first (ties in random order).

        Args:
            query_row: the query.
            rng: the step's generator.
            mode: ``same_category`` (random products of the positive's leaf), ``attribute_matched`` (another
                leaf, most attribute values shared) or ``mixed`` (either, with probability 1/2 each).
        """
        pos = self.positive_rows[query_row]
        level = self.category_level[query_row]
        if level >= 0:
            # Outside the named category; siblings (same parent path) first, then the rest of the catalog.
            names = self.path_names
            outside = names[:, level] != names[pos, level]
            sibling = outside & (names[:, :level] == names[pos, :level]).all(axis=1)
            return np.concatenate(
                [rng.permutation(np.flatnonzero(sibling)), rng.permutation(np.flatnonzero(outside & ~sibling))]
            )
        same_leaf = self.category_rows[self.leaf_of_product[pos]]
        codes = self.attribute_codes
        attribute_matched = mode == "attribute_matched" or (mode == "mixed" and rng.random() < 0.5)
        if codes.shape[1] == 0 or not attribute_matched:
            return rng.permutation(same_leaf)
        # Another leaf category, as many shared attribute values as possible: only the category (the shape on
        # mbe3-mini) tells it from the positive.
        other = np.flatnonzero(self.leaf_of_product != self.leaf_of_product[pos])
        known = codes[pos] >= 0
        shared = ((codes[other] == codes[pos]) & known).sum(axis=1)
        order = np.lexsort((rng.random(len(other)), -shared))
        return other[order]

    def pick_hard_negatives(
        self, query_row: int, rng: np.random.Generator, mode: str, count: int, taken: set[int], top_up: bool = False
    ) -> list[int]:
        """Up to ``count`` hard negatives of a query from :meth:`hard_negative_pool`, skipping products in
        ``taken`` (which the picks join) and, for a category query, every product its category also covers.

        Args:
            query_row: the query.
            rng: the step's generator.
            mode: see :meth:`hard_negative_pool`.
            count: how many to pick.
            taken: products already in the batch; updated in place.
            top_up: after the pool, draw from the whole catalog (so exactly ``count`` come back).
        """
        pool = self.hard_negative_pool(query_row, rng, mode)
        if top_up:
            pool = np.concatenate([pool, rng.permutation(len(self.products))])
        relevant: set[int] = set()
        if self.category_level[query_row] >= 0:
            everything = np.arange(len(self.products))
            relevant = set(np.flatnonzero(self.relevant(np.array([query_row]), everything)[0]).tolist())
        picked: list[int] = []
        for candidate in pool:
            if len(picked) == count:
                break
            if int(candidate) not in taken and int(candidate) not in relevant:
                taken.add(int(candidate))
                picked.append(int(candidate))
        return picked

    def _load_traces(self) -> tuple[dict[str, str], dict[str, str]]:
        """``(product_id -> trace, query_id -> trace)`` from ``traces_dir/traces.parquet`` (empty without one)."""
        if self.traces_dir is None or not table_path(self.traces_dir, TRACES).exists():
            return {}, {}
        traces = read_table(table_path(self.traces_dir, TRACES), TRACES)
        is_query = traces["query_id"].notna()
        products = traces[~is_query]
        queries = traces[is_query]
        return (
            dict(zip(products["product_id"], products["trace"], strict=True)),
            dict(zip(queries["query_id"], queries["trace"], strict=True)),
        )

    def __len__(self) -> int:
        return len(self.queries)


class HardNegativeSampler:
    """Step-keyed global batches with same-category hard negatives, sharded over ranks.

    Args:
        data: the training pairs.
        batch_size: pairs per rank per micro-batch.
        hard_negatives: same-category products added per query (fewer if the category is small).
        seed: the sampler's seed.
        world_size: number of data-parallel ranks; the global batch is ``batch_size * world_size`` pairs.
        mode: how hard negatives are chosen (:data:`HARD_NEGATIVE_MODES`, see :meth:`PairData.hard_negative_pool`).
    """

    def __init__(
        self,
        data: PairData,
        batch_size: int,
        hard_negatives: int,
        seed: int,
        world_size: int = 1,
        mode: str = "same_category",
    ):
        if mode not in HARD_NEGATIVE_MODES:
            raise ValueError(f"train.hard_negative_mode: {mode!r} is not one of {', '.join(HARD_NEGATIVE_MODES)}")
        self.mode = mode
        if len(data) < batch_size * world_size:
            raise ValueError(f"{len(data)} training queries, fewer than one global batch ({batch_size * world_size})")
        self.data = data
        self.batch_size = batch_size
        self.hard_negatives = hard_negatives
        self.seed = seed
        self.world_size = world_size
        self.batches_per_epoch = len(data) // (batch_size * world_size)

    def _global_queries(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
        size = self.batch_size * self.world_size
        return order[index * size : (index + 1) * size]

    def batch(self, step: int, rank: int = 0) -> PairBatch:
        """Rank ``rank``'s shard of global batch ``step``."""
        queries = self._global_queries(step)
        positives = self.data.positive_rows[queries]
        rng = np.random.default_rng([self.seed, step, 1_000_003])
        taken = set(positives.tolist())
        negatives_per_rank: list[list[int]] = [[] for _ in range(self.world_size)]
        for i, query in enumerate(queries):
            if self.hard_negatives == 0:
                break
            # Topped up from the whole catalog so every rank holds the same number of products (all_gather
            # needs equal shapes); `taken` keeps one copy of each product per global batch.
            negatives_per_rank[i // self.batch_size] += self.data.pick_hard_negatives(
                int(query), rng, self.mode, self.hard_negatives, taken, top_up=True
            )
        shard = slice(rank * self.batch_size, (rank + 1) * self.batch_size)
        return PairBatch(
            query_rows=queries[shard],
            product_rows=np.concatenate([positives[shard], np.asarray(negatives_per_rank[rank], dtype=np.int64)]),
            n_positives=self.batch_size,
            step=step,
        )


def _attribute_codes(attributes) -> np.ndarray:
    """``(products, keys)`` int codes of each product's attribute values (-1: the product lacks that key)."""
    rows = [dict(a) if a is not None else {} for a in attributes]
    keys = sorted({k for row in rows for k in row})
    codes = np.full((len(rows), len(keys)), -1, dtype=np.int64)
    for j, key in enumerate(keys):
        vocab: dict[str, int] = {}
        for i, row in enumerate(rows):
            if key in row and row[key] is not None:
                codes[i, j] = vocab.setdefault(str(row[key]), len(vocab))
    return codes
