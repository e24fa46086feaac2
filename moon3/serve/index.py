"""The search index behind ``moon3-search``: a gallery's embeddings in a FAISS flat inner-product index.

``moon3 index build`` embeds a dataset's products with a model (:func:`moon3.model.embed.embed_table`, the same
code as ``moon3 embed``) and writes a folder::

    index.faiss         faiss.IndexFlatIP over the L2-normalised embeddings (exact cosine search)
    index.json          the model's embedding contract and fingerprint, the reasoning mode, counts, provenance
    products.parquet    the gallery rows (ids, titles, absolute image locations: the demo's thumbnails)
    embeddings.parquet  the embeddings as `moon3 embed` writes them

The index is only valid for the model that built it: :func:`load_index` refuses a folder whose contract (version
or any field) or model fingerprint differs from the served model's, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from moon3.common.redact import redact_text
from moon3.data.io import resolve
from moon3.data.schema import PRODUCTS, read_table, table_path, write_table
from moon3.model.contract import CONTRACT_FILE, CONTRACT_VERSION, ContractError, EmbeddingContract
from moon3.model.embed import embed_table, load_embeddings
from moon3.model.embedder import BACKBONE_DIR, HEADS_FILE, Moon3Embedder

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
PRODUCTS_FILE = "products.parquet"
EMBEDDINGS_FILE = "embeddings.parquet"
SPLITS = ("all", "train", "eval")
_WHOLE_FILE = 64 * 1024 * 1024  # hash files up to this size whole; larger ones by size + first/last 8 MiB
_EDGE = 8 * 1024 * 1024


def model_fingerprint(model_dir: str | Path) -> str:
    """A SHA-256 that identifies a saved model folder's weights and contract.

    The contract file and the heads are hashed whole; backbone files whole up to 64 MiB, larger ones by name,
    size and their first and last 8 MiB (a multi-GB backbone is fingerprinted in well under a second).
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    backbone = sorted(p for p in (root / BACKBONE_DIR).rglob("*") if p.is_file())
    files = [root / CONTRACT_FILE, root / HEADS_FILE, *backbone]
    for path in files:
        if not path.exists():
            raise ContractError(f"{path}: missing; is {model_dir} a folder written by Moon3Embedder.save_pretrained?")
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as fh:
            if size <= _WHOLE_FILE:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_EDGE))
                fh.seek(size - _EDGE)
                digest.update(fh.read(_EDGE))
    return digest.hexdigest()


def build_index(
    model: Moon3Embedder,
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    split: str = "all",
    batch_size: int = 32,
    reasoning: bool | None = None,
    model_uri: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Embed the products of ``data_dir`` with ``model`` and write the index folder ``out_dir``.

    Args:
        model: the embedder (loaded from ``model_dir``).
        model_dir: the model's local folder (fingerprinted into ``index.json``).
        data_dir: a dataset folder with ``products.parquet`` (images relative to it, or gs:// URIs).
        out_dir: the index folder (created; its files are replaced).
        split: ``all``, ``train`` or ``eval`` products.
        batch_size: items per forward.
        reasoning: embed after a trace (default: the model's contract); queries are served in the same mode.
        model_uri: where the model came from (recorded, redacted), default ``model_dir``.
        progress: show a progress bar.

    Returns:
        The ``index.json`` metadata.

    Raises:
        ValueError: unknown split, no products in it, or a product that cannot be embedded (names its id).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    products = read_table(table_path(data_dir, PRODUCTS), PRODUCTS)
    if split != "all":
        products = products[products["split"] == split]
    if products.empty:
        raise ValueError(f"{data_dir}: no products in split {split!r}")
    products = products.reset_index(drop=True).copy()
    # Absolute image locations, so the gallery table stands alone (the demo reads its thumbnails from it).
    products["image"] = [resolve(u, data_dir) if isinstance(u, str) and u.strip() else u for u in products["image"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    gallery = write_table(products, out_dir / PRODUCTS_FILE, PRODUCTS)
    reasoning = model.contract.reasoning if reasoning is None else reasoning
    started = time.perf_counter()
    embed_table(model, gallery, PRODUCTS, out_dir / EMBEDDINGS_FILE, batch_size=batch_size, reasoning=reasoning,
                progress=progress)  # fmt: skip
    ids, matrix, _ = load_embeddings(out_dir / EMBEDDINGS_FILE)
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(np.ascontiguousarray(matrix, dtype=np.float32))
    faiss.write_index(index, str(out_dir / INDEX_FILE))
    meta = {
        "contract_version": model.contract.version,
        "contract": model.contract.to_dict(),
        "model_fingerprint": model_fingerprint(model_dir),
        "model": redact_text(str(model_uri or model_dir)),
        "dataset": redact_text(str(data_dir)),
        "split": split,
        "count": len(ids),
        "embed_dim": int(matrix.shape[1]),
        "reasoning": bool(reasoning),
        "truncated_texts": model.truncated_texts,
        "seconds": round(time.perf_counter() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


@dataclass
class SearchIndex:
    """A loaded index: the FAISS index, the gallery ids in row order, its metadata and gallery rows.

    Attributes:
        index: ``faiss.IndexFlatIP``.
        ids: product id of each row.
        meta: ``index.json``.
        products: the gallery table (``product_id``, ``title``, ``image``, ...), indexed by ``product_id``.
    """

    index: Any
    ids: list[str]
    meta: dict[str, Any]
    products: pd.DataFrame

    @property
    def reasoning(self) -> bool:
        """The reasoning mode the gallery was embedded in (queries must use the same)."""
        return bool(self.meta.get("reasoning"))

    def __len__(self) -> int:
        return len(self.ids)


def load_index(path: str | Path, contract: EmbeddingContract, fingerprint: str) -> SearchIndex:
    """Read an index folder and check it belongs to the served model.

    Args:
        path: a local index folder (fetch ``gs://`` first with :func:`moon3.model.backbone.fetch_dir`).
        contract: the served model's contract.
        fingerprint: the served model's :func:`model_fingerprint`.

    Raises:
        ContractError: a file is missing or unreadable; the index was built under another contract version,
            another contract, or with another model (the message names what differs and how to rebuild).
    """
    path = Path(path)
    rebuild = "rebuild it with `moon3 index build` for this model"
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ContractError(f"{path / META_FILE}: not a readable moon3 index ({err})") from None
    version = meta.get("contract_version")
    if version != CONTRACT_VERSION or version != contract.version:
        raise ContractError(
            f"{path}: index built under contract version {version!r}, the served model has {contract.version!r} "
            f"(this code: {CONTRACT_VERSION!r}); {rebuild}"
        )
    try:
        saved = EmbeddingContract(**meta["contract"])
    except (KeyError, TypeError) as err:
        raise ContractError(f"{path / META_FILE}: bad 'contract' ({err})") from None
    if diff := saved.diff(contract):
        detail = "; ".join(f"{k}: index {v[0]!r}, model {v[1]!r}" for k, v in diff.items())
        raise ContractError(f"{path}: index contract differs from the served model's ({detail}); {rebuild}")
    if meta.get("model_fingerprint") != fingerprint:
        raise ContractError(
            f"{path}: index built with another model (fingerprint {str(meta.get('model_fingerprint'))[:12]}, "
            f"served model {fingerprint[:12]}); {rebuild}"
        )
    try:
        index = faiss.read_index(str(path / INDEX_FILE))
        ids, _, _ = load_embeddings(path / EMBEDDINGS_FILE)
        products = read_table(path / PRODUCTS_FILE, PRODUCTS)
    except (OSError, RuntimeError, ValueError) as err:
        raise ContractError(f"{path}: index files unreadable ({' '.join(str(err).split())[:300]})") from None
    if index.ntotal != len(ids) or index.d != contract.embed_dim:
        raise ContractError(f"{path}: index has {index.ntotal} rows of dim {index.d}, ids {len(ids)}, "
                            f"contract dim {contract.embed_dim}; {rebuild}")  # fmt: skip
    products = products.assign(product_id=products["product_id"].astype(str)).set_index("product_id", drop=False)
    return SearchIndex(index=index, ids=ids, meta=meta, products=products)
