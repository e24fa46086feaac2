"""Importers of public catalog layouts into the moon3 dataset format (method.md section 5).

``import_dataset(source, source_path, out_dir)`` reads one of

- ``mbe``: the MBE / MBE2.0 Hugging Face layout (parquet or JSON; ``doc_title``, ``doc_image``,
  ``doc_cate1_name``..``doc_cate4_name``, ``doc_attributes``, optional queries), see :mod:`.mbe`;
- ``fashion200k``: Fashion200K label files and image folders, see :mod:`.fashion200k`;
- ``m5product``: M5Product annotation JSON and images, see :mod:`.m5product`;

and writes ``products.parquet``, ``queries.parquet``, ``images/...`` (copied, or written out from bytes held
in parquet) and ``import_report.json`` into ``out_dir``. Splits are by product, from a hash of the seed and
the product id (:func:`assign_split`), and every query takes its product's split. Every input row is either
written or skipped with a reason; the counts are checked to add up before the tables are written.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from moon3.data import io as dio
from moon3.data.importers.common import (
    DatasetWriter,
    ImportFormatError,
    ImportReport,
    assign_split,
    parse_attributes,
)
from moon3.data.importers.fashion200k import import_fashion200k
from moon3.data.importers.m5product import import_m5product
from moon3.data.importers.mbe import import_mbe

IMPORTERS = {"mbe": import_mbe, "fashion200k": import_fashion200k, "m5product": import_m5product}

__all__ = ["IMPORTERS", "ImportFormatError", "ImportReport", "assign_split", "import_dataset", "parse_attributes"]


def import_dataset(
    source: str,
    source_path: str | Path,
    out_dir: str | Path,
    eval_fraction: float = 0.2,
    seed: int = 0,
) -> ImportReport:
    """Import a public dataset layout into a moon3 dataset folder.

    Args:
        source: ``mbe``, ``fashion200k`` or ``m5product``.
        source_path: the input file or folder; a ``gs://`` prefix is downloaded to a temporary folder first.
        out_dir: the dataset folder to write (images of an earlier import there are replaced).
        eval_fraction: share of products (with their queries) put in the ``eval`` split, in [0, 1).
        seed: seed of the split assignment.

    Returns:
        The report, also written to ``out_dir/import_report.json``.

    Raises:
        ValueError: unknown ``source`` or ``eval_fraction`` outside [0, 1).
        FileNotFoundError: ``source_path`` does not exist.
        ImportFormatError: the input lacks a required file, folder or column (the message names it).
    """
    if source not in IMPORTERS:
        raise ValueError(f"unknown import source {source!r}; expected one of {', '.join(IMPORTERS)}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction}: expected a value in [0, 1)")
    if dio.is_gcs(source_path):
        with tempfile.TemporaryDirectory(prefix="moon3-import-") as tmp:
            uri = str(source_path).rstrip("/")
            if dio.exists(uri):  # one object (an MBE parquet file, an M5Product annotation file)
                local = Path(tmp) / uri.rsplit("/", 1)[-1]
                local.write_bytes(dio.read_bytes(uri))
            else:
                local = dio.download_dir(uri, tmp)
            return _run(source, local, str(source_path), Path(out_dir), eval_fraction, seed)
    path = Path(source_path)
    if not path.exists():
        raise FileNotFoundError(f"{source}: source_path {path} not found")
    return _run(source, path, str(source_path), Path(out_dir), eval_fraction, seed)


def _run(source: str, path: Path, label: str, out: Path, eval_fraction: float, seed: int) -> ImportReport:
    report = ImportReport(source=source, source_path=label, out_dir=str(out))
    writer = DatasetWriter(out, report, seed=seed, eval_fraction=eval_fraction)
    IMPORTERS[source](path, writer, exclude=out)
    return writer.finish()
