"""Embedding a whole ``products`` or ``queries`` table into an embeddings file (``moon3 embed``).

Output formats, chosen by the suffix of ``out_path``:

- ``.parquet``: columns ``product_id``/``query_id`` and ``embedding`` (list<float32>); the contract is stored
  in the file's schema metadata (key ``moon3_contract``) with the reasoning mode used.
- ``.npy``: an (N, embed_dim) float32 array, plus ``<stem>.ids.json`` with the ids in row order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from moon3.data.schema import PRODUCTS, QUERIES, read_table
from moon3.model.embedder import Moon3Embedder
from moon3.model.items import product_item, query_item

ID_COLUMNS = {PRODUCTS: "product_id", QUERIES: "query_id"}
METADATA_KEY = b"moon3_contract"


def _ids_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.stem + ".ids.json")


def embed_table(
    model: Moon3Embedder,
    table_path: str | Path,
    table: Literal["products", "queries"],
    out_path: str | Path,
    batch_size: int = 32,
    reasoning: bool | None = None,
    progress: bool = True,
) -> Path:
    """Embed every row of a products or queries parquet file.

    Images are read relative to the table's folder (the dataset root) or from their gs:// URIs, one batch at
    a time, so memory stays flat on large tables.

    Args:
        model: the embedder.
        table_path: ``products.parquet`` or ``queries.parquet`` of a dataset folder.
        table: which schema the file has.
        out_path: ``.parquet`` or ``.npy`` file to write.
        batch_size: items per forward.
        reasoning: trace before embedding (default: the model's contract).
        progress: show a progress bar.

    Returns:
        ``out_path``.

    Raises:
        ValueError: unknown table or output suffix, or a row with neither image nor text (names its id).
    """
    if table not in ID_COLUMNS:
        raise ValueError(f"table must be one of {sorted(ID_COLUMNS)}, got {table!r}")
    out_path = Path(out_path)
    if out_path.suffix not in (".parquet", ".npy"):
        raise ValueError(f"{out_path}: output must end in .parquet or .npy")
    table_path = Path(table_path)
    root = table_path.parent
    df = read_table(table_path, table)
    id_col = ID_COLUMNS[table]
    make_item = product_item if table == PRODUCTS else query_item
    rows = df.to_dict("records")
    for row in rows:  # fail before any compute on a row that cannot be embedded
        make_item(row, root, load_images=False)
    reasoning = model.contract.reasoning if reasoning is None else reasoning
    chunks = []
    bar = tqdm(total=len(rows), disable=not progress, desc=f"embed {table}", unit="row")
    for start in range(0, len(rows), batch_size):
        items = [make_item(row, root) for row in rows[start : start + batch_size]]
        chunks.append(model.embed(items, reasoning=reasoning, batch_size=batch_size).numpy())
        bar.update(len(items))
    bar.close()
    dim = model.contract.embed_dim
    matrix = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, dim), np.float32)
    ids = [str(i) for i in df[id_col]]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Inputs whose text was cut to the contract's max_text_tokens: counted in the file, never silent.
    meta = {**model.contract.to_dict(), "reasoning_used": reasoning, "table": table,
            "truncated_texts": model.truncated_texts}  # fmt: skip
    if out_path.suffix == ".npy":
        np.save(out_path, matrix)
        _ids_path(out_path).write_text(json.dumps(ids))
        out_path.with_name(out_path.stem + ".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return out_path
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), dim)
    arrow = pa.table({id_col: pa.array(ids, pa.string()), "embedding": embedding.cast(pa.list_(pa.float32()))})
    arrow = arrow.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    pq.write_table(arrow, out_path)
    return out_path


def load_embeddings(path: str | Path) -> tuple[list[str], np.ndarray, dict]:
    """Read a file written by :func:`embed_table`: ``(ids, (N, D) float32 matrix, metadata)``."""
    path = Path(path)
    if path.suffix == ".npy":
        matrix = np.load(path)
        ids = json.loads(_ids_path(path).read_text())
        meta_file = path.with_name(path.stem + ".meta.json")
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        return ids, matrix, meta
    arrow = pq.read_table(path)
    id_col = next(c for c in arrow.column_names if c != "embedding")
    raw = (arrow.schema.metadata or {}).get(METADATA_KEY)
    meta = json.loads(raw) if raw else {}
    column = arrow.column("embedding").combine_chunks()
    dim = len(column[0]) if len(column) else int(meta.get("embed_dim", 0))
    matrix = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    return [str(i) for i in arrow.column(id_col).to_pylist()], matrix, meta
