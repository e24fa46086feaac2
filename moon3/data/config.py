"""Configuration of the ``prepare`` stage (``params.yaml`` section ``data``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Where the catalog comes from and where the prepared tables go."""

    source: str = field(
        default="mbe3-mini",
        metadata={"help": "mbe3-mini (generated) | mbe (HF parquet layout) | fashion200k | m5product"},
    )
    source_path: str = field(default="", metadata={"help": "Input folder/file for importers (local or gs://)."})
    out_dir: str = field(default="data/prepared", metadata={"help": "Folder of the prepared dataset."})
    seed: int = field(default=0, metadata={"help": "Seed of the mbe3-mini generator and of split assignment."})
    n_products: int = field(default=3000, metadata={"help": "mbe3-mini: products before --scale."})
    n_queries: int = field(default=3000, metadata={"help": "mbe3-mini: queries before --scale."})
    category_queries: float = field(
        default=0.2,
        metadata={
            "help": "mbe3-mini: category-name queries (a level-1, -2 or -3 name; positive: a product under it) "
            "per product query, so every category name the zero-shot task asks about is in the training signal."
        },
    )
    eval_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of products (and their queries) held out for evaluation."}
    )
    scale: int = field(
        default=1, metadata={"help": "mbe3-mini: N copies of the catalog with resampled text (benchmarks)."}
    )
    image_size: int = field(default=96, metadata={"help": "mbe3-mini: side of product images in pixels."})
