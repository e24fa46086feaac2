"""What the gate checks, computed in Python (vectorised, on Arrow columns) before Great Expectations runs.

Each table becomes a narrow *check frame*: one row per input row, one column per derived quantity
(``title_length``, ``image_status``, ``category_depth``, ``n_unknown_attribute_keys``, ``positive_status``...).
Each :class:`Check` pairs a GX expectation on one of those columns with the same rule as a numpy mask, so the
gate quarantines exactly the rows GX reports as unexpected (the gate cross-checks the two counts).

Levels: ``row`` rules quarantine the offending rows; ``table`` rules (schema, uniqueness, leakage, the reject
fraction) fail the gate; ``info`` rules are only reported.

Attribute keys come from the data, not from a list in the code: :func:`learn_attribute_vocabulary` collects the
keys, and per key the values, of the training split, and eval products are checked against it. A key or value
never seen in training is *flagged* (``unseen_attribute_key`` / ``unseen_attribute_value``, level ``info``), not
quarantined: the product is still a valid retrieval target (the model reads attributes as text, so a new key is
just new words), quarantining it would silently shrink and bias the eval gallery and drop its queries, and on a
long-tail catalog it would trip the reject fraction. ``validation.allowed_attribute_keys`` is an optional
override: when set, any other key quarantines the row in every split (``unknown_attribute_key``), as a contract
with an upstream catalog would. Rules about attributes name the offending keys and values in their examples.

Text is blank when it has no character outside Unicode categories Cc, Cf, Zs, Zl, Zp (:data:`VISIBLE`): a title of
zero-width, bidi or control characters is a missing title. Ids are also compared after :func:`normalise_ids`
(NFKC, format characters removed, lower case, stripped): rows whose ids collide only that way are quarantined
(``product_id_collision`` / ``query_id_collision``), every row involved, since which one is meant cannot be
known; exact duplicates stay a table-level failure. An eval product with the same normalised title and image
bytes as a train product is leakage: the eval copy is quarantined (``eval_copy_of_train_product``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moon3.data.schema import QUERY_TYPES, SCHEMAS, SPLITS, schema_errors
from moon3.validation.config import ValidationConfig
from moon3.validation.images import (
    FAILED_STATES,
    MISSING,
    NOT_A_FILE,
    OK,
    OUTSIDE_ROOT,
    REMOTE_ERROR,
    TOO_LARGE,
    UNDECODABLE,
    ImageCheck,
)

ROW, TABLE, INFO = "row", "table", "info"
NULL = "<null>"  # stands in for a null categorical value: GX column-map expectations skip nulls, the gate must not
IMAGE_STATES = [OK, *FAILED_STATES]
QUERY_IMAGE_STATES = ["none", OK, *FAILED_STATES]
# Reason suffix and description per failed image state: products get image_<suffix>, queries query_image_<suffix>.
IMAGE_RULES = {
    MISSING: ("missing", "no such file or object (for a product also: no path)"),
    OUTSIDE_ROOT: (
        "outside_dataset",
        "the path leaves the dataset folder (../, a symlink or an absolute path "
        "outside it; validation.allowed_image_dirs adds folders)",
    ),
    NOT_A_FILE: ("not_a_file", "the path is a FIFO, a device, a folder or a socket, not a regular file"),
    TOO_LARGE: ("too_large", "the file is over validation.max_image_bytes or the image over max_image_pixels"),
    REMOTE_ERROR: ("unreadable_remote", "a gs:// read failed (credentials, network or remote_timeout_s)"),
    UNDECODABLE: ("undecodable", "the file exists but does not decode as an image"),
}
# Characters that carry nothing visible: controls (Cc), format characters (Cf: zero-width, bidi, BOM) and
# separators (Zs, Zl, Zp). A text made only of these is blank.
VISIBLE = r"[^\p{Cc}\p{Cf}\p{Zs}\p{Zl}\p{Zp}]"
# query_type:inputs present. A categorical column of these strings keeps GX vectorised (its column-pair
# expectations loop in Python: 140 s on 1M rows).
TYPE_INPUTS = ["text:text", "image:image", "multimodal:text+image", "category:text"]
_KV = pa.list_(pa.struct([("key", pa.string()), ("value", pa.string())]))


@dataclass(frozen=True)
class Check:
    """One rule: a GX expectation on a check-frame column plus the same rule as a row mask.

    Attributes:
        name: the rule id; for ``row`` rules also the quarantine reason.
        level: ``row`` (quarantine), ``table`` (fails the gate) or ``info`` (reported only).
        column: the check-frame column the expectation reads.
        description: one line for reports.
        expectation: ``(gx.expectations module) -> Expectation``; called only once GX is imported.
        bad: ``(check frame) -> bool array`` of offending rows; ``None`` for aggregate rules.
        detail: a check-frame column holding, per offending row, what offends (attribute keys, ``key=value``);
            the failure's example values and message come from it rather than from the counted column.
        detail_name: what ``detail`` lists, for messages (``keys``, ``values``).
    """

    name: str
    level: str
    column: str
    description: str
    expectation: Callable[[Any], Any]
    bad: Callable[[pd.DataFrame], np.ndarray] | None = None
    detail: str = ""
    detail_name: str = ""


# --- reading and schema ---------------------------------------------------------------------------------------


def read_checked(path: str | Path, table: str) -> tuple[pa.Table | None, list[str], list[str]]:
    """Read a parquet table with Arrow and compare it with the table's schema.

    Unlike :func:`moon3.data.schema.read_table` this keeps Arrow columns (the checks are vectorised on them and
    a 1M-row table converts to pandas dicts in ~12 s) and reports every schema problem, not only the first.

    Returns:
        ``(table in schema column order, or None on a schema error; errors naming file and column;
        extra columns that are not part of the schema and will be dropped)``.
    """
    path = Path(path)
    if not path.exists():
        return None, [f"{path}: file not found"], []
    if not path.is_file():  # a FIFO would block the read forever, a device never end
        return None, [f"{path}: not a regular file (a folder, FIFO or device)"], []
    try:
        arrow = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        return None, [f"{path}: not a readable parquet file: {err}"], []
    schema = SCHEMAS[table]
    errors = schema_errors(arrow.schema, table, path)
    extra = [name for name in arrow.schema.names if name not in schema.names]
    if errors:
        return None, errors, extra
    columns = [_column(arrow, f.name).cast(f.type) for f in schema]  # null-typed (all-null) columns -> schema type
    return pa.Table.from_arrays(columns, schema=schema), [], extra


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], type=col.type)


def _strings(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.to_pandas(), dtype=object) if len(arr) else np.array([], dtype=object)


def _visible(arr: pa.Array) -> pa.Array:
    """Per value: has at least one character outside :data:`VISIBLE`'s blank categories (null -> False)."""
    return pc.fill_null(pc.match_substring_regex(arr, VISIBLE), False)


def _text_length(arr: pa.Array) -> np.ndarray:
    """Characters of each value; 0 for null and for text made only of blank characters (see :data:`VISIBLE`)."""
    length = pc.utf8_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.where(_visible(arr).to_numpy(zero_copy_only=False), length, 0)


def normalise_ids(arr: pa.Array) -> pa.Array:
    """Ids as a person or a case-insensitive system reads them: NFKC (full-width letters and digits become ASCII),
    format characters removed (zero-width, bidi, BOM), lower case, surrounding whitespace stripped."""
    text = pc.utf8_normalize(arr, "NFKC")
    text = pc.replace_substring_regex(text, r"\p{Cf}", "")
    return pc.utf8_trim_whitespace(pc.utf8_lower(text))


def _id_collisions(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose normalised id (:func:`normalise_ids`) equals another row's while the raw ids differ.

    The duplicate-id rule's mask (``duplicated(keep=False)``) on the normalised ids, minus exact duplicates, which
    the table-level uniqueness rule already fails. Returns the mask and, per colliding row, its raw id as
    ``repr`` (so a trailing space or a full-width letter shows in the report).
    """
    n = len(arr)
    detail = np.full(n, None, dtype=object)
    norm = pd.Series(_strings(normalise_ids(arr)), dtype=object)
    candidate = (norm.duplicated(keep=False) & norm.notna() & (norm != "")).to_numpy()
    if not candidate.any():
        return np.zeros(n, dtype=bool), detail
    raw = pd.Series(_strings(arr), dtype=object)
    rows = np.flatnonzero(candidate)
    distinct = raw.iloc[rows].groupby(norm.iloc[rows].to_numpy()).transform("nunique").to_numpy()
    mask = np.zeros(n, dtype=bool)
    mask[rows[distinct > 1]] = True
    for i in np.flatnonzero(mask):
        detail[i] = (repr(raw.iloc[i]),)
    return mask, detail


def _per_row(parents: pa.Array, flags: pa.Array, n: int) -> np.ndarray:
    """Count ``flags`` per parent row (flags belong to flattened list elements)."""
    idx = parents.to_numpy(zero_copy_only=False)[flags.fill_null(True).to_numpy(zero_copy_only=False)]
    return np.bincount(idx, minlength=n).astype(np.int64)


def _categorical(values: np.ndarray, categories: list[str]) -> pd.Categorical:
    return pd.Categorical(values, categories=categories)


def _pairs(a: pd.Categorical, b: pd.Categorical) -> pd.Categorical:
    """``"a:b"`` labels of two categoricals, built from their codes (no per-row string work)."""
    names = [f"{x}:{y}" for x in a.categories for y in b.categories]
    return pd.Categorical.from_codes(a.codes * len(b.categories) + b.codes, categories=names)


def _labels(arr: pa.Array) -> pd.Categorical:
    """A low-cardinality string column as a pandas categorical; nulls become ``<null>`` so GX sees them."""
    encoded = pc.dictionary_encode(pc.fill_null(arr, NULL))
    return pd.Categorical.from_codes(encoded.indices.to_numpy(zero_copy_only=False),
                                     categories=encoded.dictionary.to_pylist())  # fmt: skip


def _image_columns(arr: pa.Array, images: dict[str | None, ImageCheck], states: list[str], none_state: str):
    """Row-wise image status (categorical) and digest code (-1: no digest) from the per-path results."""
    encoded = pc.dictionary_encode(arr)
    paths = encoded.dictionary.to_pylist()
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    state_of_path = np.array([states.index(images[p].status) for p in paths] + [states.index(none_state)])
    digests = pd.Series([images[p].digest or None for p in paths], dtype=object)
    digest_code_of_path, _ = pd.factorize(digests, use_na_sentinel=True)
    digest_code_of_path = np.append(digest_code_of_path, -1)
    status = pd.Categorical.from_codes(state_of_path[codes], categories=states)
    return status, digest_code_of_path[codes]


# --- products ---------------------------------------------------------------------------------------------


def product_frame(
    products: pa.Table,
    images: dict[str | None, ImageCheck],
    cfg: ValidationConfig,
    vocabulary: AttributeVocabulary | None = None,
) -> pd.DataFrame:
    """The products check frame (one row per product, same order).

    Args:
        products: the products table (schema order, see :func:`read_checked`).
        images: per-path image results.
        cfg: the gate's settings.
        vocabulary: what eval products' attributes are checked against (default: learned from ``products``).
    """
    n = products.num_rows
    ids = _column(products, "product_id")
    title = _column(products, "title")
    image_status, digest_code = _image_columns(_column(products, "image"), images, IMAGE_STATES, MISSING)

    path = _column(products, "category_path")
    levels = pc.list_flatten(path)
    empty_level = pc.invert(_visible(levels))
    collision, collision_detail = _id_collisions(ids)

    attributes = _attribute_checks(products, vocabulary or learn_attribute_vocabulary(products, cfg), cfg)
    frame = pd.DataFrame(
        {
            "product_id": _strings(ids),
            "product_id_length": _text_length(ids),
            "product_id_collision": collision.astype(np.int64),
            "product_id_collision_ids": collision_detail,
            "title_length": _text_length(title),
            "image_status": image_status,
            "category_depth": pc.list_value_length(path).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64),
            "n_empty_category_levels": _per_row(pc.list_parent_indices(path), empty_level, n),
            **attributes,
            "price": _column(products, "price").to_numpy(zero_copy_only=False).astype(np.float64),
            "split": _labels(_column(products, "split")),
        }
    )
    split = np.asarray(frame["split"], dtype=object)
    frame["near_duplicate_of"], frame["train_copy_of"] = _near_duplicates(
        title, digest_code, frame["product_id"].to_numpy(), split
    )
    return frame


# --- attribute vocabulary -------------------------------------------------------------------------------------

KV_SEP = "\x1f"  # joins key and value into one string for set lookups (a control character no catalog text uses)


@dataclass
class AttributeVocabulary:
    """The attribute keys, and per key the values, that the training split carries (Arrow-backed: a catalog with
    millions of distinct values stays vectorised).

    Attributes:
        counts: columns ``key``, ``value``, ``products`` (training products with that pair), one row per distinct
            pair, most frequent first.
        train_products: products in the training split (the rows the vocabulary was learned from).
        allowed: ``validation.allowed_attribute_keys`` when set (an override), else ``None`` (learned keys).
    """

    counts: pa.Table
    train_products: int
    allowed: list[str] | None = None

    def per_key(self) -> pa.Table:
        """Columns ``key``, ``products``, ``values`` (distinct values), most frequent key first."""
        table = self.counts.group_by("key", use_threads=False).aggregate([("products", "sum"), ("value", "count")])
        table = table.select(["key", "products_sum", "value_count"]).rename_columns(["key", "products", "values"])
        return table.sort_by([("products", "descending"), ("key", "ascending")])

    @property
    def keys(self) -> list[str]:
        """The known keys, most frequent first."""
        return self.per_key().column("key").to_pylist()

    def pairs(self) -> pa.Array:
        """Every known ``key KV_SEP value`` string (for vectorised lookups)."""
        joined = pc.binary_join_element_wise(self.counts.column("key"), self.counts.column("value"), KV_SEP)
        return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined

    def to_dict(self) -> dict[str, Any]:
        """The full vocabulary, JSON-ready (``attribute_vocabulary.json``): per key its products and values."""
        keys: dict[str, dict[str, Any]] = {}
        for key, products in zip(*self.per_key().select(["key", "products"]).to_pydict().values(), strict=True):
            keys[key] = {"products": products, "values": {}}
        columns = self.counts.to_pydict()
        for key, value, products in zip(columns["key"], columns["value"], columns["products"], strict=True):
            keys[key]["values"][value] = products
        return {
            "learned_from": "train split",
            "train_products": self.train_products,
            "allowed_attribute_keys": self.allowed,
            "keys": keys,
        }

    def summary(self) -> dict[str, Any]:
        """Counts for ``validation_metrics.json``: keys, distinct values, distinct values per key."""
        per_key = self.per_key().to_pydict()
        return {
            "learned_from": "train split",
            "train_products": self.train_products,
            "allowed_attribute_keys": self.allowed,
            "keys": len(per_key["key"]),
            "values": self.counts.num_rows,
            "values_per_key": dict(zip(per_key["key"], per_key["values"], strict=True)),
        }


def learn_attribute_vocabulary(products: pa.Table, cfg: ValidationConfig) -> AttributeVocabulary:
    """Keys and values of the training split's attributes (blank values left out; with an override, its keys only).

    Every ``train`` row counts, also one that another rule quarantines: the vocabulary says which attribute words
    training can have seen, and the attribute checks are reports, so the circularity would buy nothing.
    """
    attrs = _column(products, "attributes").cast(_KV)
    pairs = pc.list_flatten(attrs)
    is_train = pc.fill_null(pc.equal(_column(products, "split"), "train"), False)
    keys, values = pc.struct_field(pairs, 0), pc.struct_field(pairs, 1)
    keep = pc.and_(pc.take(is_train, pc.list_parent_indices(attrs)), _visible(values))
    if cfg.allowed_attribute_keys:
        keep = pc.and_(keep, pc.is_in(keys, value_set=pa.array(cfg.allowed_attribute_keys, type=pa.string())))
    seen = pa.table({"key": keys.filter(keep), "value": values.filter(keep)})
    # One thread: a deterministic row order, so attribute_vocabulary.json (a DVC output) is byte-stable.
    grouped = seen.group_by(["key", "value"], use_threads=False).aggregate([([], "count_all")])
    grouped = grouped.select(["key", "value", "count_all"]).rename_columns(["key", "value", "products"])
    # Numeric sort only (stable: ties keep first-seen order); sorting millions of tied strings costs seconds.
    counts = grouped.sort_by([("products", "descending")])
    return AttributeVocabulary(
        counts=counts.combine_chunks(),
        train_products=int(pc.sum(is_train.cast(pa.int64())).as_py() or 0),
        allowed=list(cfg.allowed_attribute_keys) or None,
    )


def _attribute_checks(products: pa.Table, vocabulary: AttributeVocabulary, cfg: ValidationConfig) -> dict[str, Any]:
    """Per-row counts of the attribute rules, and per offending row what offends (``detail`` columns)."""
    n = products.num_rows
    attrs = _column(products, "attributes").cast(_KV)  # map kernels are missing in Arrow; list<struct> has them
    pairs = pc.list_flatten(attrs)
    parents = pc.list_parent_indices(attrs)
    keys, values = pc.struct_field(pairs, 0), pc.struct_field(pairs, 1)
    blank = pc.invert(_visible(values))
    duplicate = _duplicate_keys(parents, keys)
    if cfg.allowed_attribute_keys:
        unknown = pc.invert(pc.is_in(keys, value_set=pa.array(cfg.allowed_attribute_keys, type=pa.string())))
    else:
        unknown = pa.array(np.zeros(len(pairs), dtype=bool))
    is_eval = pc.take(pc.fill_null(pc.equal(_column(products, "split"), "eval"), False), parents)
    known_key = pc.is_in(keys, value_set=pa.array(vocabulary.keys, type=pa.string()))
    unseen_key = pc.and_(is_eval, pc.and_(pc.invert(unknown), pc.invert(known_key)))
    joined = pc.binary_join_element_wise(keys, pc.fill_null(values, ""), KV_SEP)
    known_pair = pc.is_in(joined, value_set=vocabulary.pairs())
    unseen_value = pc.and_(pc.and_(is_eval, known_key), pc.and_(pc.invert(known_pair), pc.invert(blank)))
    shown_pairs = pc.binary_join_element_wise(keys, pc.fill_null(values, ""), "=")
    return {
        "n_unknown_attribute_keys": _per_row(parents, unknown, n),
        "unknown_attribute_keys": _details(parents, keys, unknown, n),
        "n_duplicate_attribute_keys": _per_row(parents, duplicate, n),
        "duplicate_attribute_keys": _details(parents, keys, duplicate, n),
        "n_empty_attribute_values": _per_row(parents, blank, n),
        "empty_attribute_value_keys": _details(parents, keys, blank, n),
        "n_unseen_attribute_keys": _per_row(parents, unseen_key, n),
        "unseen_attribute_keys": _details(parents, keys, unseen_key, n),
        "n_unseen_attribute_values": _per_row(parents, unseen_value, n),
        "unseen_attribute_values": _details(parents, shown_pairs, unseen_value, n),
    }


def _duplicate_keys(parents: pa.Array, keys: pa.Array) -> pa.Array:
    """Flags the second and later occurrence of a key within one product's attributes (keys compared after
    :func:`normalise_ids`: ``color``, ``Color`` and ``color `` are one key). A parquet map may hold a key twice;
    read as a dict the last value would silently win (red then blue -> blue)."""
    if not len(keys):
        return pa.array([], type=pa.bool_())
    encoded = pc.dictionary_encode(keys)  # catalogs have few distinct keys: normalise those, not every pair
    distinct = pc.fill_null(normalise_ids(encoded.dictionary), "")
    norm_code = pc.dictionary_encode(distinct).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    key_code = norm_code[encoded.indices.fill_null(0).to_numpy(zero_copy_only=False)]
    combined = parents.to_numpy(zero_copy_only=False).astype(np.int64) * (int(norm_code.max()) + 1) + key_code
    return pa.array(pd.Series(combined).duplicated(keep="first").to_numpy())


def _details(parents: pa.Array, labels: pa.Array, flags: pa.Array, n: int) -> np.ndarray:
    """Per row, the tuple of ``labels`` of its flagged list elements (None where none is flagged)."""
    out = np.full(n, None, dtype=object)
    mask = flags.fill_null(True).to_numpy(zero_copy_only=False)
    if not mask.any():
        return out
    rows = parents.to_numpy(zero_copy_only=False)[mask]
    texts = _strings(labels.filter(pa.array(mask)))
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])  # parent indices are non-decreasing
    for row, group in zip(rows[starts], np.split(texts, starts[1:]), strict=True):
        out[row] = tuple(group)
    return out


def _near_duplicates(
    title: pa.Array, digest_code: np.ndarray, ids: np.ndarray, split: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the id of the first product with the same normalised title and image bytes (None for first
    copies), and for an eval product the id of the first *train* product it copies (None otherwise): a train
    product copied under a new id into eval is leakage (the model trained on the very item it is scored on)."""
    n = len(ids)
    out = np.full(n, None, dtype=object)
    train_copy = np.full(n, None, dtype=object)
    # Only rows whose image bytes occur more than once can be near-duplicates: normalise just those titles
    # (the regex costs ~3 s per 1M titles; most real catalogs have few shared images).
    shared = (digest_code >= 0) & (np.bincount(digest_code + 1, minlength=1)[digest_code + 1] > 1)
    rows = np.flatnonzero(shared)
    if len(rows) == 0:
        return out, train_copy
    # Punctuation, symbols and whitespace collapse to one space (Unicode classes: CJK titles keep their words).
    norm = pc.utf8_lower(pc.utf8_normalize(title.take(pa.array(rows)), "NFKC"))
    norm = pc.utf8_trim_whitespace(pc.replace_substring_regex(norm, r"[\s\p{P}\p{S}\p{Cf}\p{Cc}]+", " "))
    title_code = pc.dictionary_encode(norm).indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    eligible = (title_code >= 0) & (pc.utf8_length(norm).fill_null(0).to_numpy(zero_copy_only=False) > 0)
    digest = digest_code[rows]
    codes, _ = pd.factorize(title_code * (int(digest.max()) + 1) + digest)
    _, first = np.unique(codes, return_index=True)
    first_of_row = first[codes]
    dup = eligible & (first_of_row != np.arange(len(rows)))
    out[rows[dup]] = ids[rows[first_of_row[dup]]]
    # The first train row of each group, and every eval row of a group that has one.
    is_train = split[rows] == "train"
    if is_train.any():
        first_train = pd.Series(np.arange(len(rows))[is_train]).groupby(codes[is_train]).min()
        train_of_row = pd.Series(codes).map(first_train).to_numpy()
        leak = eligible & (split[rows] == "eval") & ~pd.isna(train_of_row)
        train_copy[rows[leak]] = ids[rows[train_of_row[leak].astype(np.int64)]]
    return out, train_copy


def product_checks(cfg: ValidationConfig) -> list[Check]:
    """The products suite, in report order."""
    near_level = ROW if cfg.near_duplicates == "quarantine" else INFO
    return [
        Check("missing_product_id", ROW, "product_id_length", "product_id is null or blank",
              lambda E: E.ExpectColumnValuesToBeBetween(column="product_id_length", min_value=1),
              lambda f: f["product_id_length"].to_numpy() < 1),
        Check("product_id_collision", ROW, "product_id_collision",
              "no other product_id is the same after NFKC, case folding and stripping (e.g. P1 / p1 / 'p1 ' / Ｐ１)",
              lambda E: E.ExpectColumnValuesToBeBetween(column="product_id_collision", max_value=0),
              lambda f: f["product_id_collision"].to_numpy() > 0, "product_id_collision_ids", "ids"),
        Check("missing_title", ROW, "title_length", "title is null or blank (only spaces, controls, zero-width "
              "or bidi characters)",
              lambda E: E.ExpectColumnValuesToBeBetween(column="title_length", min_value=1),
              lambda f: f["title_length"].to_numpy() < 1),
        Check("title_too_long", ROW, "title_length", f"title has at most {cfg.max_title_chars} characters",
              lambda E: E.ExpectColumnValuesToBeBetween(column="title_length", max_value=cfg.max_title_chars),
              lambda f: f["title_length"].to_numpy() > cfg.max_title_chars),
        *_image_rules("image", "image_status"),
        Check("category_depth", ROW, "category_depth", f"category_path has 1..{cfg.max_category_depth} levels",
              lambda E: E.ExpectColumnValuesToBeBetween(
                  column="category_depth", min_value=1, max_value=cfg.max_category_depth),
              lambda f: ~np.isin(f["category_depth"].to_numpy(), np.arange(1, cfg.max_category_depth + 1))),
        Check("empty_category_level", ROW, "n_empty_category_levels", "a category level is null or blank",
              lambda E: E.ExpectColumnValuesToBeBetween(column="n_empty_category_levels", max_value=0),
              lambda f: f["n_empty_category_levels"].to_numpy() > 0),
        *_attribute_rules(cfg),
        Check("bad_price", ROW, "price", f"price is in (0, {cfg.max_price:g}] where present",
              lambda E: E.ExpectColumnValuesToBeBetween(
                  column="price", min_value=0, strict_min=True, max_value=cfg.max_price),
              lambda f: _bad_price(f["price"].to_numpy(), cfg.max_price)),
        Check("bad_split", ROW, "split", f"split is one of {list(SPLITS)}",
              lambda E: E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
              lambda f: ~f["split"].isin(SPLITS).to_numpy()),
        Check("near_duplicate", near_level, "near_duplicate_of",
              "no earlier product has the same normalised title and image bytes",
              lambda E: E.ExpectColumnValuesToBeNull(column="near_duplicate_of"),
              lambda f: f["near_duplicate_of"].notna().to_numpy()),
        Check("eval_copy_of_train_product", ROW, "train_copy_of",
              "an eval product is not a train product under another id (same normalised title and image bytes); "
              "the eval copy is quarantined",
              lambda E: E.ExpectColumnValuesToBeNull(column="train_copy_of"),
              lambda f: f["train_copy_of"].notna().to_numpy()),
        Check("duplicate_product_id", TABLE, "product_id", "product_id is unique",
              lambda E: E.ExpectColumnValuesToBeUnique(column="product_id"),
              lambda f: (f["product_id"].duplicated(keep=False) & f["product_id"].notna()).to_numpy()),
        *_table_checks(cfg),
    ]  # fmt: skip


def _image_rules(prefix: str, column: str) -> list[Check]:
    """One row rule per failed image state (:data:`IMAGE_RULES`): ``<prefix>_missing``, ``<prefix>_too_large``..."""
    return [
        Check(f"{prefix}_{suffix}", ROW, column, f"{prefix}: {description}",
              lambda E, state=state: E.ExpectColumnValuesToNotBeInSet(column=column, value_set=[state]),
              lambda f, state=state: (f[column] == state).to_numpy())
        for state, (suffix, description) in IMAGE_RULES.items()
    ]  # fmt: skip


def _attribute_rules(cfg: ValidationConfig) -> list[Check]:
    """``unknown_attribute_key`` only with the override; the vocabulary rules (eval vs training) always."""
    rules = [
        Check("duplicate_attribute_key", ROW, "n_duplicate_attribute_keys",
              "a product names each attribute key once (compared after NFKC, case folding and stripping)",
              lambda E: E.ExpectColumnValuesToBeBetween(column="n_duplicate_attribute_keys", max_value=0),
              lambda f: f["n_duplicate_attribute_keys"].to_numpy() > 0, "duplicate_attribute_keys", "keys"),
        Check("empty_attribute_value", ROW, "n_empty_attribute_values", "an attribute value is null or blank",
              lambda E: E.ExpectColumnValuesToBeBetween(column="n_empty_attribute_values", max_value=0),
              lambda f: f["n_empty_attribute_values"].to_numpy() > 0, "empty_attribute_value_keys", "keys"),
        Check("unseen_attribute_key", INFO, "n_unseen_attribute_keys",
              "eval products carry only attribute keys seen in the training split (flagged, not quarantined)",
              lambda E: E.ExpectColumnValuesToBeBetween(column="n_unseen_attribute_keys", max_value=0),
              lambda f: f["n_unseen_attribute_keys"].to_numpy() > 0, "unseen_attribute_keys", "keys"),
        Check("unseen_attribute_value", INFO, "n_unseen_attribute_values",
              "eval products' attribute values occur under the same key in the training split (flagged only)",
              lambda E: E.ExpectColumnValuesToBeBetween(column="n_unseen_attribute_values", max_value=0),
              lambda f: f["n_unseen_attribute_values"].to_numpy() > 0, "unseen_attribute_values", "values"),
    ]  # fmt: skip
    if cfg.allowed_attribute_keys:
        rules.insert(0, Check(
            "unknown_attribute_key", ROW, "n_unknown_attribute_keys",
            f"attribute keys are in validation.allowed_attribute_keys {cfg.allowed_attribute_keys}",
            lambda E: E.ExpectColumnValuesToBeBetween(column="n_unknown_attribute_keys", max_value=0),
            lambda f: f["n_unknown_attribute_keys"].to_numpy() > 0, "unknown_attribute_keys", "keys"))  # fmt: skip
    return rules


def _bad_price(price: np.ndarray, max_price: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return ~np.isnan(price) & ~((price > 0) & (price <= max_price))


def _table_checks(cfg: ValidationConfig) -> list[Check]:
    return [
        Check("empty_table", TABLE, "", "the table has at least one row",
              lambda E: E.ExpectTableRowCountToBeBetween(min_value=1)),
        Check("reject_fraction", TABLE, "quarantined",
              f"at most {cfg.max_reject_fraction:.2%} of the rows are quarantined",
              lambda E: E.ExpectColumnMeanToBeBetween(
                  column="quarantined", min_value=0, max_value=cfg.max_reject_fraction)),
    ]  # fmt: skip


# --- queries ----------------------------------------------------------------------------------------------


def query_frame(
    queries: pa.Table,
    products: pa.Table,
    product_quarantined: np.ndarray,
    images: dict[str | None, ImageCheck],
) -> pd.DataFrame:
    """The queries check frame; ``products`` (the table) and its quarantine mask resolve positive products."""
    ids = _column(queries, "query_id")
    qtype = pc.fill_null(_column(queries, "query_type"), NULL)
    text_length = _text_length(_column(queries, "query_text"))
    has_text = text_length > 0
    image = _column(queries, "query_image")
    has_image = _text_length(image) > 0
    collision, collision_detail = _id_collisions(ids)
    image_status, _ = _image_columns(image, images, QUERY_IMAGE_STATES, "none")
    image_status = np.where(has_image, np.asarray(image_status, dtype=object), "none")
    inputs = np.select([has_text & has_image, has_text, has_image], ["text+image", "text", "image"], "none")

    # index_in returns the first match, so repeated product ids (already a gate failure) resolve to the first.
    pos = pc.index_in(_column(queries, "positive_product_id"), value_set=_column(products, "product_id"),
                      skip_nulls=True).fill_null(-1).to_numpy(zero_copy_only=False)  # fmt: skip
    found = pos >= 0
    at = np.maximum(pos, 0)
    positive_quarantined = found & product_quarantined[at] if len(product_quarantined) else found
    positive_status = np.select([~found, positive_quarantined], [MISSING, "quarantined"], OK)

    split = _labels(_column(queries, "split"))
    product_split = np.asarray(_labels(_column(products, "split")), dtype=object)
    product_split = product_split[at] if len(product_split) else np.full(len(pos), NULL, dtype=object)
    query_split = np.asarray(split, dtype=object)
    # Leakage is defined between valid splits only; invalid ones are quarantined by bad_split.
    comparable = found & np.isin(query_split, SPLITS) & np.isin(product_split, SPLITS)
    return pd.DataFrame(
        {
            "query_id": _strings(ids),
            "query_id_length": _text_length(ids),
            "query_id_collision": collision.astype(np.int64),
            "query_id_collision_ids": collision_detail,
            "query_text_length": text_length,
            "query_type": _labels(qtype),
            "type_and_inputs": _pairs(_labels(qtype), pd.Categorical(inputs)),
            "query_image_status": _categorical(image_status, QUERY_IMAGE_STATES),
            "split": split,
            "positive_status": _categorical(positive_status, [OK, MISSING, "quarantined"]),
            # Same categories on both sides: GX compares the two columns with ==.
            "query_split": _categorical(np.where(comparable, query_split, None), list(SPLITS)),
            "positive_split": _categorical(np.where(comparable, product_split, None), list(SPLITS)),
        }
    )


def query_checks(cfg: ValidationConfig) -> list[Check]:
    """The queries suite, in report order."""
    return [
        Check("missing_query_id", ROW, "query_id_length", "query_id is null or blank",
              lambda E: E.ExpectColumnValuesToBeBetween(column="query_id_length", min_value=1),
              lambda f: f["query_id_length"].to_numpy() < 1),
        Check("query_id_collision", ROW, "query_id_collision",
              "no other query_id is the same after NFKC, case folding and stripping",
              lambda E: E.ExpectColumnValuesToBeBetween(column="query_id_collision", max_value=0),
              lambda f: f["query_id_collision"].to_numpy() > 0, "query_id_collision_ids", "ids"),
        Check("query_text_too_long", ROW, "query_text_length",
              f"query_text has at most {cfg.max_query_chars} characters",
              lambda E: E.ExpectColumnValuesToBeBetween(column="query_text_length", max_value=cfg.max_query_chars),
              lambda f: f["query_text_length"].to_numpy() > cfg.max_query_chars),
        Check("bad_query_type", ROW, "query_type", f"query_type is one of {list(QUERY_TYPES)}",
              lambda E: E.ExpectColumnValuesToBeInSet(column="query_type", value_set=list(QUERY_TYPES)),
              lambda f: ~f["query_type"].isin(QUERY_TYPES).to_numpy()),
        Check("query_inputs_mismatch", ROW, "type_and_inputs",
              "text and category queries have text, image queries an image, multimodal both (query_type:inputs)",
              lambda E: E.ExpectColumnValuesToBeInSet(column="type_and_inputs", value_set=TYPE_INPUTS),
              lambda f: ~f["type_and_inputs"].isin(TYPE_INPUTS).to_numpy()),
        *_image_rules("query_image", "query_image_status"),
        Check("bad_split", ROW, "split", f"split is one of {list(SPLITS)}",
              lambda E: E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
              lambda f: ~f["split"].isin(SPLITS).to_numpy()),
        Check("positive_product_missing", ROW, "positive_status", "positive_product_id exists in products",
              lambda E: E.ExpectColumnValuesToNotBeInSet(column="positive_status", value_set=[MISSING]),
              lambda f: (f["positive_status"] == MISSING).to_numpy()),
        Check("positive_product_quarantined", ROW, "positive_status",
              "the positive product passed validation (else the query would dangle)",
              lambda E: E.ExpectColumnValuesToNotBeInSet(column="positive_status", value_set=["quarantined"]),
              lambda f: (f["positive_status"] == "quarantined").to_numpy()),
        Check("duplicate_query_id", TABLE, "query_id", "query_id is unique",
              lambda E: E.ExpectColumnValuesToBeUnique(column="query_id"),
              lambda f: (f["query_id"].duplicated(keep=False) & f["query_id"].notna()).to_numpy()),
        Check("split_leakage", TABLE, "query_split",
              "a query and its positive product are in the same split (no eval product in a training pair)",
              lambda E: E.ExpectColumnPairValuesToBeEqual(
                  column_A="query_split", column_B="positive_split", ignore_row_if="either_value_is_missing"),
              lambda f: (f["query_split"].notna() & f["positive_split"].notna()
                         & (f["query_split"] != f["positive_split"])).to_numpy()),
        *_table_checks(cfg),
    ]  # fmt: skip


# --- traces -----------------------------------------------------------------------------------------------

UNKNOWN_ITEM, NOT_TRAIN_SPLIT = "unknown_item", "not_train_split"
TRACE_RULES = {
    UNKNOWN_ITEM: "the trace's product (query_id null) or query, with that query's positive as product_id, is in "
    "the accepted tables",
    NOT_TRAIN_SPLIT: "the trace's product or query is in the train split (no evaluation item reaches training)",
}


def trace_reasons(
    traces: pa.Table, products: pa.Table, queries: pa.Table, quarantined: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Row masks of the trace rules (:data:`TRACE_RULES`): each trace row breaks at most one.

    A trace with ``query_id`` null belongs to the product ``product_id``; otherwise to the query, whose positive
    must be ``product_id``. An item that is missing or was quarantined (``quarantined``: the products and
    queries masks) is ``unknown_item``; a known item outside ``train`` is ``not_train_split``.
    """
    product_ids = _column(traces, "product_id")
    query_ids = _column(traces, "query_id")
    is_query = pc.is_valid(query_ids).to_numpy(zero_copy_only=False)

    def lookup(values: pa.Array, table: pa.Table, column: str, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = pc.index_in(values, value_set=_column(table, column), skip_nulls=True)
        pos = pos.fill_null(-1).to_numpy(zero_copy_only=False)
        at = np.maximum(pos, 0)
        known = (pos >= 0) & ~bad[at] if len(bad) else np.zeros(len(pos), dtype=bool)
        return known, at

    product_known, p_at = lookup(product_ids, products, "product_id", quarantined["products"])
    query_known, q_at = lookup(query_ids, queries, "query_id", quarantined["queries"])
    positives = _strings(_column(queries, "positive_product_id"))
    if len(positives):
        query_known &= positives[q_at] == _strings(product_ids)
    product_split = _strings(_column(products, "split"))
    query_split = _strings(_column(queries, "split"))
    in_train = np.where(
        is_query,
        query_split[q_at] == "train" if len(query_split) else False,
        product_split[p_at] == "train" if len(product_split) else False,
    )
    unknown = ~np.where(is_query, query_known, product_known)
    return {UNKNOWN_ITEM: unknown, NOT_TRAIN_SPLIT: ~unknown & ~in_train}
