"""MBE / MBE2.0 (MM-Bench-E-Commerce, Hugging Face ``Daoze/MM-Bench-E-Commerce``) into our format.

Input: one ``.parquet``, ``.jsonl`` or ``.json`` file, or a folder searched recursively for them. Each row is a
product (a "doc"), optionally with the query that led to its purchase:

- ``doc_id`` or ``id`` (required): the product id. Rows repeating an id add their query to the first product.
- ``doc_title`` (required column): the title, Chinese in the real data.
- ``doc_image`` (required column): image bytes, a Hugging Face Image dict ``{"bytes", "path"}``, a path
  (relative to the file's folder or to ``source_path``) or a ``gs://`` URI. The public release stores
  ``http(s)`` URLs; those rows are skipped as ``remote_image_url`` (no network is assumed: fetch the images
  first and point ``doc_image`` at the files).
- ``doc_industry_name`` (optional) then ``doc_cate1_name`` .. ``doc_cate4_name``: the category path, blank
  levels dropped.
- ``doc_attributes`` (optional): a dict, a list, JSON or ``"k:v,,k:v"`` text (see
  :func:`~moon3.data.importers.common.parse_attributes`).
- ``doc_price`` / ``price``, ``doc_shop_id`` / ``shop_id`` (optional).
- Queries (optional): text in ``query`` / ``query_text`` / ``query_title``, image in ``query_image``
  (same forms as ``doc_image``), id in ``query_id`` (else ``<doc id>#q<n>``).

Skips (counted, with examples): ``missing_id``, ``missing_title_and_image``, ``missing_title``,
``missing_image``, ``missing_category``, ``unparsable_attributes``, ``remote_image_url``,
``missing_image_file``, ``undecodable_image``, ``malformed_record`` (a JSON line that does not parse),
``duplicate_product`` (a repeated id without a query).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from moon3.data.importers.common import (
    DatasetWriter,
    ImportFormatError,
    RowSkipped,
    clean_text,
    count_row,
    find_inputs,
    has_value,
    image_bytes,
    iter_json_records,
    parse_attributes,
    safe_name,
)

ID_COLUMNS = ("doc_id", "id")
REQUIRED = ("doc_title", "doc_image")
CATEGORY_COLUMNS = ("doc_industry_name", "doc_cate1_name", "doc_cate2_name", "doc_cate3_name", "doc_cate4_name")
QUERY_TEXT_COLUMNS = ("query", "query_text", "query_title")
SUFFIXES = (".parquet", ".jsonl", ".json")


def import_mbe(source: Path, writer: DatasetWriter, exclude: Path | None = None) -> None:
    """Read every MBE file under ``source`` into ``writer``.

    Raises:
        ImportFormatError: no input file, or a file lacks ``doc_title``, ``doc_image`` or an id column.
    """
    files = find_inputs(source, SUFFIXES, exclude)
    for path in files:  # all parquet schemas first: a bad file fails the import before anything is written
        if path.suffix == ".parquet":
            _check_columns(path, pq.read_schema(path).names)
    bases = [source if source.is_dir() else source.parent]
    for path in files:
        rows = _parquet_rows(path) if path.suffix == ".parquet" else _json_rows(path)
        for where, record in tqdm(rows, desc=f"mbe {path.name}", unit="row", disable=None):
            count_row(writer.report, where, _row, writer, record, [path.parent, *bases], where)


def _check_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in REQUIRED if c not in names]
    if not any(c in names for c in ID_COLUMNS):
        missing.insert(0, " or ".join(ID_COLUMNS))
    if missing:
        raise ImportFormatError(f"{path}: missing column(s) {missing}; has {names}")


def _parquet_rows(path: Path):
    parquet = pq.ParquetFile(path)
    n = 0
    for batch in parquet.iter_batches(batch_size=512):
        for record in batch.to_pylist():
            yield f"{path.name}:row {n}", record
            n += 1


def _json_rows(path: Path):
    checked = False
    for where, _key, record in iter_json_records(path):
        if not checked and isinstance(record, dict):
            _check_columns(path, list(record))
            checked = True
        yield where, record if isinstance(record, dict) else None


def _first(record: dict[str, Any], columns: tuple[str, ...]) -> Any:
    return next((record[c] for c in columns if c in record and has_value(record[c])), None)


def _row(writer: DatasetWriter, record: dict[str, Any] | None, bases: list[Path], where: str) -> None:
    if record is None:
        raise RowSkipped("malformed_record")
    pid = clean_text(_first(record, ID_COLUMNS))
    if pid is None:
        raise RowSkipped("missing_id")
    has_query = _first(record, (*QUERY_TEXT_COLUMNS, "query_image")) is not None
    if writer.has_product(pid):
        if not has_query:
            raise RowSkipped("duplicate_product")
        _query(writer, record, pid, bases, where, product_is_new=False)
        return
    title = clean_text(record.get("doc_title"))
    image = record.get("doc_image")
    if title is None:
        raise RowSkipped("missing_title" if has_value(image) else "missing_title_and_image")
    categories = [c for c in (clean_text(record.get(col)) for col in CATEGORY_COLUMNS) if c]
    if not categories:
        raise RowSkipped("missing_category")
    try:
        attributes = parse_attributes(record.get("doc_attributes"))
    except ValueError:
        raise RowSkipped("unparsable_attributes") from None
    price = _first(record, ("doc_price", "price"))
    try:
        price = None if price is None else float(price)
    except (TypeError, ValueError):
        writer.report.part_lost("unparsable_price", where)
        price = None
    rel = writer.store_image(image_bytes(image, bases), f"products/{safe_name(pid)}")
    shop = clean_text(_first(record, ("doc_shop_id", "shop_id")))
    writer.add_product(pid, title, rel, categories, attributes, price=price, shop_id=shop)
    if has_query:
        _query(writer, record, pid, bases, where, product_is_new=True)


def _query(
    writer: DatasetWriter, record: dict[str, Any], pid: str, bases: list[Path], where: str, product_is_new: bool
) -> None:
    """Add the row's query. A part that cannot be used is counted as partial when the row already gave a
    product; otherwise it skips the row (nothing of it was written)."""

    def lost(reason: str) -> None:
        if not product_is_new:
            raise RowSkipped(reason)
        writer.report.part_lost(reason, where)

    qid = clean_text(record.get("query_id")) or f"{pid}#q{writer.query_count(pid)}"
    if writer.query_id_taken(qid):
        return lost("duplicate_query_id")
    text = clean_text(_first(record, QUERY_TEXT_COLUMNS))
    image = None
    if has_value(record.get("query_image")):
        try:
            image = writer.store_image(image_bytes(record["query_image"], bases), f"queries/{safe_name(qid)}")
        except RowSkipped as err:
            if text is None:
                return lost(f"query_{err.reason}")
            writer.report.part_lost(f"query_{err.reason}", where)
    writer.add_query(qid, text, image, pid)
