"""A fingerprint of the catalog ``prepare`` reads, so DVC re-runs ``prepare`` when the catalog changes.

DVC can depend on files, not on the value of a parameter: ``params: [data]`` re-runs ``prepare`` when
``data.source_path`` *names* another catalog, not when the file it names is replaced. The DVC stage ``source``
(``moon3 data fingerprint``, ``always_changed``) writes ``data/source_fingerprint.json``; ``prepare`` depends on
that file, so it re-runs exactly when the fingerprint changes, and is skipped otherwise.

What the fingerprint covers (``kind``):

* ``generated`` (``data.source: mbe3-mini``): nothing outside the repo is read; the fingerprint is constant and
  ``data.source_path`` is ignored (it may be empty).
* ``local``: every file under ``data.source_path`` (or the one file it names): relative path, size and
  modification time, hashed together. A stat walk, no reads: fast on millions of images. An edit, a new or a
  removed file changes it; a copy that only changes modification times re-runs ``prepare`` once, whose output
  is then byte-identical, so DVC skips every later stage. ``data.out_dir`` is left out if it lies inside.
* ``gcs``: every object under the ``gs://`` prefix (or the one object): name, size and the content hash GCS
  keeps (crc32c/md5): a listing, no downloads.

Only what is needed to decide "same catalog or not" is written: no file list, so the file stays small.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from moon3.data import io as dio
from moon3.data.config import DataConfig

FINGERPRINT_FILE = "data/source_fingerprint.json"
GENERATED_SOURCES = ("mbe3-mini",)


def source_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """The fingerprint of ``cfg.source_path`` as ``prepare`` would read it (see the module docstring).

    Returns:
        ``source``, ``source_path``, ``kind`` (generated | local | gcs) and, unless generated, ``files``,
        ``bytes`` and ``digest`` (sha256 over the sorted per-file entries).

    Raises:
        ValueError: an importer source with an empty ``source_path``.
        FileNotFoundError: ``source_path`` names nothing (a local path, or a gs:// URI with no object).
    """
    out: dict[str, Any] = {"source": cfg.source, "source_path": cfg.source_path}
    if cfg.source in GENERATED_SOURCES:
        return {**out, "source_path": "", "kind": "generated"}
    if not cfg.source_path:
        raise ValueError(f"data.source={cfg.source} needs data.source_path (a folder, file or gs:// URI)")
    if dio.is_gcs(cfg.source_path):
        entries = _gcs_entries(cfg.source_path)
        kind = "gcs"
    else:
        entries = _local_entries(Path(cfg.source_path), Path(cfg.out_dir))
        kind = "local"
    digest = hashlib.sha256()
    for entry in sorted(entries):
        digest.update("\t".join(map(str, entry)).encode("utf-8", "surrogateescape") + b"\n")
    return {
        **out,
        "kind": kind,
        "files": len(entries),
        "bytes": sum(int(e[1]) for e in entries),
        "digest": f"sha256:{digest.hexdigest()}",
    }


def write_fingerprint(cfg: DataConfig, path: str | Path = FINGERPRINT_FILE) -> dict[str, Any]:
    """Write :func:`source_fingerprint` as JSON to ``path``; return it."""
    fingerprint = source_fingerprint(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fingerprint, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return fingerprint


def _local_entries(root: Path, exclude: Path) -> list[tuple[str, int, int]]:
    if not root.exists():
        raise FileNotFoundError(f"data.source_path {root} not found")
    if root.is_file():
        st = root.stat()
        return [(root.name, st.st_size, st.st_mtime_ns)]
    skip = os.path.abspath(exclude)
    entries = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(folder, d)) != skip)
        for name in files:
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)
            except OSError:  # a dangling link: the importer cannot read it either
                continue
            entries.append((Path(os.path.relpath(full, root)).as_posix(), st.st_size, st.st_mtime_ns))
    return entries


def _gcs_entries(uri: str) -> list[tuple[str, int, str]]:
    bucket, key = dio.split_gcs(uri.rstrip("/"))
    client = dio.gcs_client()
    blob = client.bucket(bucket).get_blob(key) if key else None
    if blob is not None:  # one object (an MBE parquet file, an M5Product annotation file)
        return [(key.rsplit("/", 1)[-1], int(blob.size or 0), blob.crc32c or blob.md5_hash or str(blob.generation))]
    prefix = f"{key}/" if key else ""
    entries = [
        (b.name[len(prefix) :], int(b.size or 0), b.crc32c or b.md5_hash or str(b.generation))
        for b in client.list_blobs(bucket, prefix=prefix)
        if not b.name.endswith("/")
    ]
    if not entries:
        raise FileNotFoundError(f"data.source_path {uri}: no object there and no objects under this prefix")
    return entries
