"""The MBE3.0-style dataset format (method.md section 5) as code.

A dataset is a folder::

    products.parquet   one row per product (PRODUCT_SCHEMA)
    queries.parquet    one row per query (QUERY_SCHEMA)
    traces.parquet     optional, written by synthesis (TRACE_SCHEMA)
    images/...         image files referenced by relative path (or absolute gs:// URIs)

In pandas, ``category_path`` is a list of str and ``attributes`` a dict str -> str; on disk they are a parquet
list and map. :func:`read_table` and :func:`write_table` are the only places that convert between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PRODUCTS = "products"
QUERIES = "queries"
TRACES = "traces"
SPLITS = ("train", "eval")
# ``category``: a category name at some level of the tree as the query text; its positive is one product under
# that category. Training signal for broad queries (every product under the name is relevant, so the loss
# masks them as negatives); evaluation measures it by zero-shot category classification, not retrieval.
QUERY_TYPES = ("text", "image", "multimodal", "category")
MAX_CATEGORY_DEPTH = 5

PRODUCT_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("image", pa.string()),
        pa.field("category_path", pa.list_(pa.string())),
        pa.field("attributes", pa.map_(pa.string(), pa.string())),
        pa.field("price", pa.float64()),
        pa.field("shop_id", pa.string()),
        pa.field("split", pa.string()),
    ]
)

QUERY_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query_text", pa.string()),
        pa.field("query_image", pa.string()),
        pa.field("positive_product_id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("query_type", pa.string()),
    ]
)

# A product's trace has ``query_id`` null; a query's trace names the query and, in ``product_id``, its positive.
TRACE_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("query_id", pa.string()),
        pa.field("trace", pa.string()),
        pa.field("teacher", pa.string()),
        pa.field("prompt_hash", pa.string()),
        pa.field("decoding", pa.string()),
        pa.field("grounded_score", pa.float64()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {PRODUCTS: PRODUCT_SCHEMA, QUERIES: QUERY_SCHEMA, TRACES: TRACE_SCHEMA}


class SchemaError(ValueError):
    """A table does not match its schema; the message names the file and the column."""


@dataclass(frozen=True)
class ProductRecord:
    """One product, as the generator and importers build it."""

    product_id: str
    title: str
    image: str | None
    category_path: list[str]
    attributes: dict[str, str]
    price: float | None = None
    shop_id: str | None = None
    split: str = "train"


@dataclass(frozen=True)
class QueryRecord:
    """One query with the product that was bought after it."""

    query_id: str
    query_text: str | None
    query_image: str | None
    positive_product_id: str
    split: str = "train"
    query_type: str = "text"


def table_path(root: str | Path, table: str) -> Path:
    """Path of ``<root>/<table>.parquet``."""
    return Path(root) / f"{table}.parquet"


def to_arrow(df: pd.DataFrame, table: str) -> pa.Table:
    """Convert a pandas frame (dict attributes, list categories) to an arrow table of the table's schema.

    Raises:
        SchemaError: a required column is missing or a column cannot be cast; the message names it.
    """
    schema = SCHEMAS[table]
    missing = [name for name in schema.names if name not in df.columns]
    if missing:
        raise SchemaError(f"{table}: missing column(s) {missing}")
    arrays = []
    for f in schema:
        values = df[f.name]
        if pa.types.is_map(f.type):
            values = [None if v is None else list(v.items()) for v in values]
        elif pa.types.is_list(f.type):
            values = [None if v is None else list(v) for v in values]
        else:
            values = values.where(values.notna(), None).tolist()
        try:
            arrays.append(pa.array(values, type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, AttributeError) as err:
            raise SchemaError(f"{table}.{f.name}: cannot store as {f.type}: {err}") from None
    return pa.Table.from_arrays(arrays, schema=schema)


def write_table(df: pd.DataFrame, path: str | Path, table: str) -> Path:
    """Write ``df`` as parquet with the schema of ``table`` (products, queries or traces)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_arrow(df, table), path, compression="zstd")
    return path


def schema_errors(schema: pa.Schema, table: str, path: str | Path) -> list[str]:
    """Every difference between a file's Arrow schema and the table's: missing columns and wrong types.

    An all-null column (Arrow type ``null``) is accepted for any type. Messages name the file and the column.
    """
    errors = []
    for f in SCHEMAS[table]:
        if f.name not in schema.names:
            errors.append(f"{path}: missing column '{f.name}' ({f.type})")
            continue
        got = schema.field(f.name).type
        if not got.equals(f.type) and not pa.types.is_null(got):
            errors.append(f"{path}: column '{f.name}' has type {got}, expected {f.type}")
    return errors


def read_table(path: str | Path, table: str, check: bool = True) -> pd.DataFrame:
    """Read a parquet table into pandas with dict attributes and list category paths.

    Args:
        path: the parquet file.
        table: products, queries or traces; selects the schema.
        check: raise if a column is missing or has another type than the schema's.

    Raises:
        SchemaError: the file is missing or does not match the schema; the message names file and column.
    """
    path = Path(path)
    if not path.exists():
        raise SchemaError(f"{path}: file not found")
    arrow = pq.read_table(path)
    errors = schema_errors(arrow.schema, table, path) if check else []
    if errors:
        raise SchemaError("; ".join(errors))
    df = arrow.to_pandas()
    for f in SCHEMAS[table]:
        if f.name in df.columns and pa.types.is_map(f.type):
            df[f.name] = [None if v is None else dict(v) for v in df[f.name]]
        elif f.name in df.columns and pa.types.is_list(f.type):
            df[f.name] = [None if v is None else list(v) for v in df[f.name]]
    return df


def read_dataset(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read ``products`` and ``queries`` of a dataset folder."""
    return read_table(table_path(root, PRODUCTS), PRODUCTS), read_table(table_path(root, QUERIES), QUERIES)


def records_to_frame(records: list, table: str) -> pd.DataFrame:
    """Frame from a list of :class:`ProductRecord` / :class:`QueryRecord`, columns in schema order."""
    names = SCHEMAS[table].names
    return pd.DataFrame([{n: getattr(r, n) for n in names} for r in records], columns=names)
