"""Configuration of the ``validate`` stage (``params.yaml`` section ``validation``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ValidationConfig:
    """Thresholds and outputs of the data validation gate."""

    in_dir: str = field(default="data/prepared", metadata={"help": "Dataset to validate."})
    out_dir: str = field(default="data/validated", metadata={"help": "Accepted rows are written here."})
    quarantine_dir: str = field(default="data/quarantine", metadata={"help": "Rejected rows with reasons."})
    report_dir: str = field(
        default="reports/validation", metadata={"help": "GX results, HTML report, metrics."}
    )
    max_reject_fraction: float = field(
        default=0.02,
        metadata={"help": "Gate fails when more than this fraction of any table is quarantined."},
    )
    check_images: bool = field(
        default=True, metadata={"help": "Open and decode every image (slow at scale)."}
    )
