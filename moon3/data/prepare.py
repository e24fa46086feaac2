"""The ``prepare`` stage: make mbe3-mini or import a public dataset into our format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moon3.data.config import DataConfig
from moon3.data.stats import dataset_stats

IMPORT_SOURCES = ("mbe", "fashion200k", "m5product")


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
        if not cfg.source_path:
            raise ValueError(f"data.source={cfg.source} needs data.source_path (a folder, file or gs:// URI)")
        from moon3.data.importers import import_dataset

        import_dataset(cfg.source, cfg.source_path, out, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    else:
        raise ValueError(f"data.source={cfg.source!r}: expected mbe3-mini or one of {', '.join(IMPORT_SOURCES)}")
    stats = dataset_stats(out)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
