"""What every importer shares: the report, split assignment, image storage, attribute parsing.

Accounting rule: every input row (a parquet/JSON record, a label-file line) ends either *written* (it gave a
product or a query) or *skipped* with a reason; :meth:`ImportReport.check` enforces
``rows_read == rows_written + skipped`` before anything is written. Rows that were written but lost a part
(a query image that does not decode, say) are counted under ``partial``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

from moon3.data import io as dio
from moon3.data.schema import MAX_CATEGORY_DEPTH, PRODUCTS, QUERIES, SCHEMAS, table_path, write_table

REPORT_FILE = "import_report.json"
MAX_EXAMPLES = 5


class ImportFormatError(ValueError):
    """The input does not have the layout an importer needs; the message names the file and the field."""


@dataclass
class ImportReport:
    """What an import read, wrote and skipped (also written as ``import_report.json``)."""

    source: str
    source_path: str
    out_dir: str
    rows_read: int = 0
    rows_written: int = 0
    products_written: int = 0
    queries_written: int = 0
    images_written: int = 0
    products_per_split: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    partial: dict[str, int] = field(default_factory=dict)
    partial_examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def skipped_total(self) -> int:
        """Rows skipped, all reasons together."""
        return sum(self.skipped.values())

    def read(self, n: int = 1) -> None:
        """Count ``n`` input rows."""
        self.rows_read += n

    def wrote(self, n: int = 1) -> None:
        """Count ``n`` input rows that gave a product or a query."""
        self.rows_written += n

    def skip(self, reason: str, where: str) -> None:
        """Count one skipped row under ``reason``; ``where`` (file:row) is kept as an example."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(where)

    def part_lost(self, reason: str, where: str) -> None:
        """Count a written row that lost a part (e.g. its query image) under ``reason``."""
        self.partial[reason] = self.partial.get(reason, 0) + 1
        examples = self.partial_examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(where)

    def check(self) -> None:
        """Raise unless every row read is either written or skipped.

        Raises:
            RuntimeError: the counts do not add up (a bug in an importer, never bad input).
        """
        if self.rows_read != self.rows_written + self.skipped_total:
            raise RuntimeError(
                f"{self.source} import lost rows: read {self.rows_read} != written {self.rows_written}"
                f" + skipped {self.skipped_total} ({self.skipped})"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, with ``skipped_total``."""
        return {**asdict(self), "skipped_total": self.skipped_total}

    def __str__(self) -> str:
        text = (
            f"{self.source}: read {self.rows_read} rows, wrote {self.products_written} products"
            f" {self.products_per_split} and {self.queries_written} queries; skipped {self.skipped_total}"
        )
        if self.skipped:
            text += " " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        return text


class RowSkipped(Exception):
    """Raised inside an importer's row handler: the row is skipped with ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def assign_split(product_id: str, seed: int, eval_fraction: float) -> str:
    """``eval`` or ``train`` for a product, from a hash of (seed, id): stable under row order and file splits."""
    digest = hashlib.sha256(f"{seed}\x00{product_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if u < eval_fraction else "train"


def is_missing(value: Any) -> bool:
    """None, NaN or a blank string."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def has_value(value: Any) -> bool:
    """Whether a cell holds something: non-blank text, non-empty bytes or list, a dict with some value (so an
    HF Image dict ``{"bytes": None, "path": None}`` holds nothing)."""
    if isinstance(value, dict):
        return any(has_value(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return len(value) > 0
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value) > 0
    return not is_missing(value)


def clean_text(value: Any) -> str | None:
    """Stripped string, or None when missing."""
    return None if is_missing(value) else str(value).strip()


def safe_name(text: str) -> str:
    """A file-name-safe stem for an id: ASCII word characters kept, plus a short hash against collisions."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60]
    return f"{stem}-{hashlib.sha1(text.encode()).hexdigest()[:8]}" if stem != text else stem


# --------------------------------------------------------------------------------------------------- images


def image_bytes(value: Any, bases: Iterable[Path]) -> bytes:
    """Raw bytes of an image cell: bytes, an HF Image dict ``{"bytes", "path"}``, a local path or gs:// URI.

    Relative paths are tried against each folder of ``bases`` in turn.

    Raises:
        RowSkipped: ``missing_image``, ``remote_image_url`` (http(s), not fetched: no network is assumed) or
            ``missing_image_file``.
    """
    if isinstance(value, dict):
        data = value.get("bytes")
        value = data if data is not None and len(data) else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise RowSkipped("missing_image")
        return bytes(value)
    if is_missing(value):
        raise RowSkipped("missing_image")
    uri = str(value).strip()
    if uri.startswith(("http://", "https://")):
        raise RowSkipped("remote_image_url")
    if dio.is_gcs(uri):
        try:
            return dio.read_bytes(uri)
        except FileNotFoundError:
            raise RowSkipped("missing_image_file") from None
    candidates = [Path(uri)] if Path(uri).is_absolute() else [Path(base) / uri for base in bases]
    for path in candidates:
        if path.is_file():
            return path.read_bytes()
    raise RowSkipped("missing_image_file")


def image_format(data: bytes) -> str:
    """File extension for image bytes after a full decode (``png``, ``jpg``, ...).

    Raises:
        RowSkipped: ``undecodable_image``.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise RowSkipped("undecodable_image") from None
    return {"jpeg": "jpg", "": "img"}.get(fmt, fmt)


class DatasetWriter:
    """Collects products and queries, stores images under ``out_dir/images`` and writes the tables."""

    def __init__(self, out_dir: str | Path, report: ImportReport, seed: int = 0, eval_fraction: float = 0.2):
        self.out = Path(out_dir)
        self.report = report
        self.seed = seed
        self.eval_fraction = eval_fraction
        self.products: list[dict[str, Any]] = []
        self.queries: list[dict[str, Any]] = []
        self.product_split: dict[str, str] = {}
        self._query_ids: set[str] = set()
        self._queries_per_product: dict[str, int] = {}
        self._prepared = False  # out_dir is touched only once input checks have passed

    def _ensure_out_dir(self) -> None:
        if not self._prepared:
            _prepare_out_dir(self.out)
            self._prepared = True

    def has_product(self, product_id: str) -> bool:
        """Whether a product with this id was added."""
        return product_id in self.product_split

    def store_image(self, data: bytes, rel_stem: str) -> str:
        """Check that ``data`` decodes, write it as ``images/<rel_stem>.<ext>``; return that relative path.

        Raises:
            RowSkipped: ``undecodable_image``.
        """
        rel = f"images/{rel_stem}.{image_format(data)}"
        self._ensure_out_dir()
        target = self.out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self.report.images_written += 1
        return rel

    def add_product(
        self,
        product_id: str,
        title: str,
        image: str,
        category_path: list[str],
        attributes: dict[str, str],
        price: float | None = None,
        shop_id: str | None = None,
    ) -> None:
        """Add a product row (its image already stored), in the split :func:`assign_split` gives its id."""
        split = assign_split(product_id, self.seed, self.eval_fraction)
        self.products.append(
            {
                "product_id": product_id,
                "title": title,
                "image": image,
                "category_path": category_path[:MAX_CATEGORY_DEPTH],
                "attributes": attributes,
                "price": price,
                "shop_id": shop_id,
                "split": split,
            }
        )
        self.product_split[product_id] = split

    def query_id_taken(self, query_id: str) -> bool:
        """Whether a query with this id was added."""
        return query_id in self._query_ids

    def query_count(self, product_id: str) -> int:
        """Queries added so far for a product."""
        return self._queries_per_product.get(product_id, 0)

    def add_query(self, query_id: str, text: str | None, image: str | None, product_id: str) -> None:
        """Add a query for a known product, in that product's split.

        Raises:
            ValueError: ``query_id`` is taken or neither text nor image is given (importers check first).
        """
        if query_id in self._query_ids or (text is None and image is None):
            raise ValueError(f"query {query_id!r}: id taken or no text and no image")
        self._query_ids.add(query_id)
        self._queries_per_product[product_id] = self._queries_per_product.get(product_id, 0) + 1
        qtype = "multimodal" if text and image else ("image" if image else "text")
        self.queries.append(
            {
                "query_id": query_id,
                "query_text": text,
                "query_image": image,
                "positive_product_id": product_id,
                "split": self.product_split[product_id],
                "query_type": qtype,
            }
        )

    def finish(self) -> ImportReport:
        """Check the accounting, write both tables and ``import_report.json``; return the report."""
        report = self.report
        report.products_written = len(self.products)
        report.queries_written = len(self.queries)
        counts: dict[str, int] = {}
        for split in self.product_split.values():
            counts[split] = counts.get(split, 0) + 1
        report.products_per_split = dict(sorted(counts.items()))
        report.check()
        self._ensure_out_dir()
        write_table(_frame(self.products, PRODUCTS), table_path(self.out, PRODUCTS), PRODUCTS)
        write_table(_frame(self.queries, QUERIES), table_path(self.out, QUERIES), QUERIES)
        (self.out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return report


def _frame(rows: list[dict[str, Any]], table: str) -> pd.DataFrame:
    """A frame in schema column order, also when ``rows`` is empty."""
    return pd.DataFrame(rows, columns=SCHEMAS[table].names)


def _prepare_out_dir(out: Path) -> None:
    """Create ``out``. An earlier import there is removed first (tables, report, images) so that a failed run
    cannot leave new images beside old tables; images that no import wrote are never deleted."""
    images = out / "images"
    if images.exists() and any(images.iterdir()):
        if not (out / REPORT_FILE).exists():
            raise FileExistsError(
                f"{images} already holds images that no earlier import wrote; choose an empty out_dir"
            )
        shutil.rmtree(images)
    for stale in (table_path(out, PRODUCTS), table_path(out, QUERIES), out / REPORT_FILE):
        stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------------- attributes

_PAIR_SEPARATORS = (",,", ";", "；", "\n", ",", "，")
_KEY_VALUE = re.compile(r"[:：]")


class DuplicateAttributeKeyError(ValueError):
    """One product names an attribute key twice with different values (``color:red,,color:blue``)."""


def parse_attributes(value: Any) -> dict[str, str]:
    """Attribute dict from the forms found in catalogs.

    Accepted: a dict; a list of ``{key: value}`` dicts, ``{"name"/"key": k, "value": v}`` dicts or
    ``"key:value"`` strings; a JSON string of those; or plain text ``"k:v,,k:v"`` (MBE style; ``;``, newline
    and ``,`` also separate pairs, ``：`` also separates key and value). List values are joined with ``,``.
    A key given twice (after stripping) with the same value is kept once; with different values it is an error,
    not a silent last-one-wins (importers skip such a row as ``unparsable_attributes``, counted in the report).

    Raises:
        DuplicateAttributeKeyError: a key given twice with different values (a ``ValueError``).
        ValueError: the value has none of these forms (bad JSON, a pair without a key:value separator, ...).
    """
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            if str(k).strip():
                _put(out, str(k).strip(), _value_text(v))
        return out
    if is_missing(value):
        return {}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        out = {}
        for item in list(value):
            if isinstance(item, tuple) and len(item) == 2:  # an arrow map column reads as (key, value) tuples
                _put(out, str(item[0]).strip(), _value_text(item[1]))
            elif isinstance(item, dict) and {"value"} <= item.keys() and ({"name", "key"} & item.keys()):
                _put(out, str(item.get("name", item.get("key"))).strip(), _value_text(item["value"]))
            else:
                for k, v in parse_attributes(item).items():
                    _put(out, k, v)
        return out
    if not isinstance(value, str):
        raise ValueError(f"attributes of type {type(value).__name__}")
    text = value.strip()
    if text[0] in "{[":
        try:
            loaded = json.loads(text, object_pairs_hook=_json_pairs)
        except json.JSONDecodeError as err:
            raise ValueError(f"bad JSON: {err}") from None
        return parse_attributes(loaded)
    sep = next((s for s in _PAIR_SEPARATORS if s in text), None)
    out = {}
    for piece in text.split(sep) if sep else [text]:
        piece = piece.strip()
        if not piece:
            continue
        parts = _KEY_VALUE.split(piece, maxsplit=1)
        if len(parts) != 2 or not parts[0].strip():
            raise ValueError(f"no key:value in {piece!r}")
        _put(out, parts[0].strip(), parts[1].strip())
    return out


def _put(out: dict[str, str], key: str, value: str) -> None:
    """``out[key] = value``, refusing a second, different value for a key."""
    if key in out and out[key] != value:
        raise DuplicateAttributeKeyError(f"duplicate attribute key {key!r} ({out[key]!r}, then {value!r})")
    out[key] = value


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any] | list[tuple[str, Any]]:
    """JSON objects keep a repeated key (``{"color": "red", "color": "blue"}``) as pairs, for :func:`_put`."""
    keys = [k for k, _ in pairs]
    return pairs if len(set(keys)) != len(keys) else dict(pairs)


def _value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v).strip() for v in value)
    return "" if value is None else str(value).strip()


# ------------------------------------------------------------------------------------------------ reading


def count_row(report: ImportReport, where: str, handler, *args: Any) -> None:
    """Run ``handler(*args)`` for one input row: written if it returns, skipped if it raises RowSkipped."""
    report.read()
    try:
        handler(*args)
    except RowSkipped as skipped:
        report.skip(skipped.reason, where)
    else:
        report.wrote()


def find_inputs(source: Path, suffixes: tuple[str, ...], exclude: Path | None) -> list[Path]:
    """``source`` itself if it is a file, else the files under it with one of ``suffixes``, sorted by path.

    Args:
        source: a file or folder.
        suffixes: accepted file suffixes, with the dot.
        exclude: a folder to leave out (the output folder, when it lies inside ``source``).

    Raises:
        ImportFormatError: ``source`` is a file of another suffix, or the folder holds no such file.
    """
    if source.is_file():
        if source.suffix not in suffixes:
            raise ImportFormatError(f"{source}: expected a {'/'.join(suffixes)} file")
        return [source]
    skip = exclude.resolve() if exclude is not None else None
    files = sorted(
        p
        for p in source.rglob("*")
        if p.suffix in suffixes and p.is_file() and not (skip and p.resolve().is_relative_to(skip))
    )
    if not files:
        raise ImportFormatError(f"{source}: no {', '.join(suffixes)} files found")
    return files


def iter_json_records(path: Path) -> Iterable[tuple[str, str | None, Any]]:
    """``(where, key, record)`` for each record of a JSON or JSON Lines file.

    A ``.json`` file may hold a list of records, an object of records (``{id: record}``, then ``key`` is the
    id) or, as Hugging Face ``json`` datasets often do, JSON Lines. A line that does not parse is yielded
    with ``record=None`` so that the caller counts it as skipped.

    Raises:
        ImportFormatError: a ``.json`` file whose top level is neither a list nor an object of records.
    """
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            data = None  # not one document: read it as JSON Lines below
        if isinstance(data, list):
            for i, record in enumerate(data):
                yield f"{path.name}[{i}]", None, record
            return
        if isinstance(data, dict):
            if not all(isinstance(v, dict) for v in data.values()):
                raise ImportFormatError(f"{path}: expected a list of records or an object of records")
            for key, record in data.items():
                yield f"{path.name}[{key!r}]", str(key), record
            return
        if data is not None:
            raise ImportFormatError(f"{path}: expected a list of records or an object of records")
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            yield f"{path.name}:{n}", None, record
