"""The ``prepare`` stage: make mbe3-mini or import a public dataset into our format.

``moon3 data prepare`` (the DVC stage) and ``moon3 data import`` run the same code with the same ``data``
settings from ``params.yaml`` (split seed and eval fraction included), and both write ``stats.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moon3.data.config import DataConfig
from moon3.data.stats import dataset_stats

if TYPE_CHECKING:
    from moon3.data.importers import ImportReport

IMPORT_SOURCES = ("mbe", "fashion200k", "m5product")
STATS_FILE = "stats.json"


def prepare(cfg: DataConfig, progress: bool = True) -> dict[str, Any]:
    """Build the dataset in ``cfg.out_dir`` from ``cfg.source`` and write ``stats.json`` beside it.

    Returns:
        The dataset statistics (see :func:`moon3.data.stats.dataset_stats`).

    Raises:
        ValueError: an unknown source, or an importer source without ``source_path``.
    """
    out = Path(cfg.out_dir)
    if cfg.source == "mbe3-mini":
        from moon3.data.mini import make_sample

        make_sample(cfg, out, progress=progress)
    elif cfg.source in IMPORT_SOURCES:
        import_source(cfg)
    else:
        raise ValueError(f"data.source={cfg.source!r}: expected mbe3-mini or one of {', '.join(IMPORT_SOURCES)}")
    return write_stats(out)


def import_source(cfg: DataConfig) -> ImportReport:
    """Run the importer ``cfg.source`` on ``cfg.source_path`` into ``cfg.out_dir``, split by seed and eval fraction.

    Raises:
        ValueError: an importer source without ``source_path``, or the importer's own errors (unknown source,
            ``ImportFormatError``); ``FileNotFoundError`` when ``source_path`` does not exist.
    """
    if not cfg.source_path:
        raise ValueError(f"data.source={cfg.source} needs data.source_path (a folder, file or gs:// URI)")
    from moon3.data.importers import import_dataset

    return import_dataset(cfg.source, cfg.source_path, cfg.out_dir, eval_fraction=cfg.eval_fraction, seed=cfg.seed)


def write_stats(out: str | Path) -> dict[str, Any]:
    """Compute the statistics of the dataset folder ``out`` and write them to ``out/stats.json``; return them."""
    stats = dataset_stats(out)
    (Path(out) / STATS_FILE).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return stats
