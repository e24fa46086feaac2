"""M5Product (Dong et al., CVPR 2022; xiaodongsuper.github.io/M5Product_dataset) into our format.

What is public about the layout: the documentation's ``meta_info`` per product is ``item_id`` (str),
``caption`` (the title), ``image`` (a .jpg, the main image), ``video``, ``audio``, ``tabular`` (property
key/value pairs) and ``label``; the authors' toolkit reads a JSON object ``{item_id: {"title": ..., "pv":
"key#:#value#;#key#:#value"}}`` and finds media files by item id (``<dir>/<item_id>.mp3``). The download
itself is gated, so this importer assumes, and documents, that layout:

- Input: one ``.json``/``.jsonl`` annotation file or a folder searched recursively for them. A ``.json``
  holds ``{item_id: record}``, a list of records or JSON Lines; a record outside an object names its id in
  ``item_id`` (or ``id``).
- Title: ``title``, else ``caption``.
- Attributes: ``pv`` (``key#:#value`` pairs joined by ``#;#``), else ``tabular`` / ``attributes`` (a dict,
  JSON or ``k:v`` text).
- Category: ``category`` (a list, or levels joined by ``>``), else ``cate``, else ``label``; else the folder
  holding the annotation file when that is not ``source_path`` itself (the per-category folder layout).
- Image: ``image`` / ``image_path`` / ``img`` (relative to the annotation file's folder or ``source_path``),
  else the first of ``images/<item_id>.<ext>``, ``image/<item_id>.<ext>``, ``<item_id>.<ext>`` next to the
  annotation file or under ``source_path`` (ext jpg, jpeg, png, webp).
- Queries: M5Product publishes no purchase queries, so each product's title becomes one ``text`` query
  (``<item_id>#title``): an easy sanity task, not a purchase signal. Video and audio are not imported.

Skips (counted): ``malformed_record``, ``missing_id``, ``duplicate_product``, ``missing_title_and_image``,
``missing_title``, ``missing_category``, ``unparsable_attributes``, ``missing_image_file``,
``remote_image_url``, ``undecodable_image``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moon3.data.importers.common import (
    DatasetWriter,
    RowSkipped,
    clean_text,
    count_row,
    find_inputs,
    has_value,
    image_bytes,
    is_missing,
    iter_json_records,
    parse_attributes,
    safe_name,
)

SUFFIXES = (".json", ".jsonl")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_FIELDS = ("image", "image_path", "img")


def parse_pv(value: Any) -> dict[str, str]:
    """Properties from M5Product's ``key#:#value#;#key#:#value`` text (or any form ``parse_attributes`` takes).

    Raises:
        ValueError: a pair without ``#:#`` in pv text, or an unparsable other form.
    """
    if isinstance(value, str) and "#:#" in value:
        out = {}
        for piece in value.split("#;#"):
            if not piece.strip():
                continue
            key, sep, val = piece.partition("#:#")
            if not sep or not key.strip():
                raise ValueError(f"no key#:#value in {piece!r}")
            out[key.strip()] = val.strip()
        return out
    return parse_attributes(value)


def import_m5product(source: Path, writer: DatasetWriter, exclude: Path | None = None) -> None:
    """Read every annotation file under ``source`` into ``writer``.

    Raises:
        ImportFormatError: no annotation file, or a ``.json`` file of another shape.
    """
    files = find_inputs(source, SUFFIXES, exclude)
    root = source if source.is_dir() else source.parent
    for path in files:
        folder_category = path.parent.name if path.parent.resolve() != root.resolve() else None
        records = iter_json_records(path)
        for where, key, record in tqdm(records, desc=f"m5product {path.name}", unit="item", disable=None):
            count_row(writer.report, where, _record, writer, key, record, path.parent, root, folder_category)


def _categories(record: dict[str, Any], folder_category: str | None) -> list[str]:
    value = next((record[k] for k in ("category", "cate", "label") if has_value(record.get(k))), None)
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if not is_missing(v)]
    if value is not None:
        return [level.strip() for level in str(value).split(">") if level.strip()]
    return [folder_category] if folder_category else []


def _image(record: dict[str, Any], item_id: str, folders: list[Path]) -> bytes:
    value = next((record[k] for k in IMAGE_FIELDS if has_value(record.get(k))), None)
    if value is not None:
        return image_bytes(value, folders)
    for folder in folders:
        for sub in ("images", "image", ""):
            for ext in IMAGE_EXTENSIONS:
                candidate = folder / sub / f"{item_id}.{ext}"
                if candidate.is_file():
                    return candidate.read_bytes()
    raise RowSkipped("missing_image_file")


def _record(
    writer: DatasetWriter,
    key: str | None,
    record: Any,
    folder: Path,
    root: Path,
    folder_category: str | None,
) -> None:
    if not isinstance(record, dict):
        raise RowSkipped("malformed_record")
    item_id = clean_text(key if key is not None else record.get("item_id", record.get("id")))
    if item_id is None:
        raise RowSkipped("missing_id")
    if writer.has_product(item_id):
        raise RowSkipped("duplicate_product")
    title = clean_text(record.get("title") if has_value(record.get("title")) else record.get("caption"))
    if title is None:
        try:
            _image(record, item_id, [folder, root])
        except RowSkipped:
            raise RowSkipped("missing_title_and_image") from None
        raise RowSkipped("missing_title")
    categories = _categories(record, folder_category)
    if not categories:
        raise RowSkipped("missing_category")
    props = next((record[k] for k in ("pv", "tabular", "attributes") if has_value(record.get(k))), None)
    try:
        attributes = parse_pv(props)
    except ValueError:
        raise RowSkipped("unparsable_attributes") from None
    rel = writer.store_image(_image(record, item_id, [folder, root]), f"products/{safe_name(item_id)}")
    writer.add_product(item_id, title, rel, categories, attributes)
    writer.add_query(f"{item_id}#title", title, None, item_id)
