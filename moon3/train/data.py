"""Training pairs and the batch sampler of contrastive pretraining.

A batch is ``batch_size`` (query, positive product) pairs plus ``hard_negatives_per_query`` products of the
same leaf category per query. Which pairs and negatives land in batch ``step`` is a pure function of
``(seed, step)``, so a resumed run sees exactly the batches the uninterrupted run would have seen, and every
data-parallel rank can take its own shard of the same global batch without communication.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moon3.data.schema import TRACES, read_dataset, read_table, table_path


@dataclass
class PairBatch:
    """One rank's shard of a global batch: row positions into :class:`PairData` tables."""

    query_rows: np.ndarray  # positions in PairData.queries
    product_rows: np.ndarray  # positives first (aligned with query_rows), then hard negatives
    n_positives: int


class PairData:
    """Training queries with their positives, products indexed by category, and optional traces."""

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        products, queries = read_dataset(self.root)
        self.products = products[products["split"] == split].reset_index(drop=True)
        queries = queries[queries["split"] == split]
        position = {pid: i for i, pid in enumerate(self.products["product_id"])}
        known = queries["positive_product_id"].isin(position)
        if not known.all():
            bad = queries.loc[~known, "query_id"].head(5).tolist()
            raise ValueError(f"{root}: {int((~known).sum())} {split} queries point at unknown products, e.g. {bad}")
        self.queries = queries.reset_index(drop=True)
        self.positive_rows = self.queries["positive_product_id"].map(position).to_numpy()
        leaf = self.products["category_path"].map(lambda path: path[-1] if path else "")
        self.category_rows = {name: np.flatnonzero(leaf.to_numpy() == name) for name in leaf.unique()}
        self.leaf_of_product = leaf.to_numpy()
        self.traces = self._load_traces()

    def _load_traces(self) -> dict[str, str]:
        path = table_path(self.root, TRACES)
        if not path.exists():
            return {}
        traces = read_table(path, TRACES)
        return dict(zip(traces["product_id"], traces["trace"], strict=True))

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
    """

    def __init__(self, data: PairData, batch_size: int, hard_negatives: int, seed: int, world_size: int = 1):
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
        n_products = len(self.data.products)
        for i, pos in enumerate(positives):
            pool = self.data.category_rows[self.data.leaf_of_product[pos]]
            picked = 0
            # Same category first; a too-small category is topped up from the whole catalog so every rank
            # holds the same number of products (all_gather needs equal shapes).
            for candidate in np.concatenate([rng.permutation(pool), rng.permutation(n_products)]):
                if picked == self.hard_negatives:
                    break
                if int(candidate) not in taken:  # one copy of each product per global batch
                    taken.add(int(candidate))
                    negatives_per_rank[i // self.batch_size].append(int(candidate))
                    picked += 1
        shard = slice(rank * self.batch_size, (rank + 1) * self.batch_size)
        return PairBatch(
            query_rows=queries[shard],
            product_rows=np.concatenate([positives[shard], np.asarray(negatives_per_rank[rank], dtype=np.int64)]),
            n_positives=self.batch_size,
        )
