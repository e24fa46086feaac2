"""Configuration of the MBE3.0-style evaluation (``params.yaml`` section ``eval``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    """Which tasks and metrics; where the report goes."""

    out_dir: str = field(default="reports/eval", metadata={"help": "metrics.json, plots and the report."})
    ks: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "Recall@K cut-offs."})
    batch_size: int = field(default=32, metadata={"help": "Items per embedding batch."})
    search_batch: int = field(default=4096, metadata={"help": "Queries per exact-search batch."})
