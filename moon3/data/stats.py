"""Dataset statistics: per-split counts, category and attribute distributions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from moon3.data.schema import read_dataset


def dataset_stats(root: str | Path) -> dict[str, Any]:
    """Counts of a dataset folder, JSON-serialisable.

    Returns:
        ``products``/``queries`` per split, queries per type, products per level-1 and leaf category,
        value counts per attribute type, and the size on disk in bytes.
    """
    products, queries = read_dataset(root)
    level1 = Counter(path[0] for path in products["category_path"] if path)
    leaf = Counter(path[-1] for path in products["category_path"] if path)
    attributes: dict[str, Counter] = {}
    for attrs in products["attributes"]:
        for key, value in (attrs or {}).items():
            attributes.setdefault(key, Counter())[value] += 1
    root = Path(root)
    disk = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0
    return {
        "products": {"total": len(products), **products["split"].value_counts().sort_index().to_dict()},
        "queries": {"total": len(queries), **queries["split"].value_counts().sort_index().to_dict()},
        "query_types": queries["query_type"].value_counts().sort_index().to_dict(),
        "category_level1": dict(sorted(level1.items())),
        "category_leaf": dict(sorted(leaf.items())),
        "attributes": {k: dict(sorted(v.items())) for k, v in sorted(attributes.items())},
        "bytes_on_disk": disk,
    }
