"""Dataset statistics: per-split counts, category and attribute distributions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from moon3.data.schema import read_dataset


def dataset_stats(root: str | Path) -> dict[str, Any]:
    """Counts of a dataset folder, JSON-serialisable.

    Returns:
        ``products``/``queries`` per split, queries per type, products per category name at every level
        (``category_levels``: ``"1"``, ``"2"``, ... -> name -> count; ``category_level1`` repeats level 1),
        products per leaf category, value counts per attribute type, and the size on disk in bytes.
    """
    products, queries = read_dataset(root)
    levels: dict[int, Counter] = {}
    for path in products["category_path"]:
        for level, name in enumerate(path if path is not None else [], start=1):
            levels.setdefault(level, Counter())[name] += 1
    leaf = Counter(path[-1] for path in products["category_path"] if path is not None and len(path))
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
        "category_level1": dict(sorted(levels.get(1, Counter()).items())),
        "category_levels": {str(level): dict(sorted(c.items())) for level, c in sorted(levels.items())},
        "category_leaf": dict(sorted(leaf.items())),
        "attributes": {k: dict(sorted(v.items())) for k, v in sorted(attributes.items())},
        "bytes_on_disk": disk,
    }
