"""Configuration of the ``validate`` stage (``params.yaml`` section ``validation``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ValidationConfig:
    """Thresholds and outputs of the data validation gate."""

    in_dir: str = field(default="data/prepared", metadata={"help": "Dataset to validate."})
    out_dir: str = field(default="data/validated", metadata={"help": "Accepted rows are written here."})
    quarantine_dir: str = field(default="data/quarantine", metadata={"help": "Rejected rows with reasons."})
    report_dir: str = field(default="reports/validation", metadata={"help": "GX results, HTML report, metrics."})
    max_reject_fraction: float = field(
        default=0.02, metadata={"help": "Gate fails when more than this fraction of any table is quarantined."}
    )
    check_images: bool = field(
        default=True,
        metadata={"help": "Read, hash and decode every distinct image; false: only check that the file exists."},
    )
    allowed_attribute_keys: list[str] = field(
        default_factory=list,
        metadata={
            "help": "[] (default) = learn the attribute vocabulary (keys, and values per key) from the training "
            "split; eval products with a key or value never seen in training are flagged, not quarantined. A list "
            "is an override: the only keys a product may carry; any other key quarantines the row, in every split."
        },
    )
    max_category_depth: int = field(default=5, metadata={"help": "Category paths must have 1..N levels."})
    max_price: float = field(
        default=1.0e9, metadata={"help": "Prices must be in (0, max_price] where present (catches inf/units)."}
    )
    near_duplicates: Literal["flag", "quarantine"] = field(
        default="flag",
        metadata={
            "help": "Products with the same normalised title and image bytes: flag (report only) or "
            "quarantine every copy after the first."
        },
    )
    image_root: str = field(
        default="",
        metadata={
            "help": "Prefix for image paths in the accepted tables: '' = relative to out_dir (local, DVC), "
            "or the input dataset's URI (e.g. gs://... of a KFP artifact) so paths resolve anywhere."
        },
    )
    image_workers: int = field(default=4, metadata={"help": "Threads that read and decode images."})
    max_image_bytes: int = field(
        default=50 * 2**20,
        metadata={"help": "Images over this many bytes are quarantined (image_too_large) without being read."},
    )
    max_image_pixels: int = field(
        default=100_000_000,
        metadata={
            "help": "Images over this many pixels (width x height, from the header, before decoding) are "
            "quarantined (image_too_large): decompression bombs."
        },
    )
    remote_timeout_s: float = field(
        default=60.0,
        metadata={
            "help": "Seconds for one gs:// image read, retries included; a timeout, a network or a "
            "credentials error quarantines the row (image_unreadable_remote)."
        },
    )
    allowed_image_dirs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Folders besides the dataset folder that image paths and symlinks may resolve into "
            "(e.g. .dvc/cache with DVC's symlink cache); anything else outside it is quarantined "
            "(image_outside_dataset)."
        },
    )
    max_title_chars: int = field(default=2000, metadata={"help": "Longer titles are quarantined (title_too_long)."})
    max_query_chars: int = field(
        default=1000, metadata={"help": "Longer query texts are quarantined (query_text_too_long)."}
    )
    examples_per_failure: int = field(default=5, metadata={"help": "Example ids kept per failed expectation."})
