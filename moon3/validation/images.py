"""Image checks of the validation gate: exists, decodes, content hash; once per distinct path.

Scaled catalogs (``mini.py --scale``) and real marketplaces reuse the same image in many rows, so the work is
done per distinct path and mapped back to rows: a 1M-row table with 3,000 distinct images decodes 3,000 files.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from moon3.data.io import decode_image, exists, read_bytes, resolve

OK = "ok"
MISSING = "missing"
UNDECODABLE = "undecodable"


@dataclass(frozen=True)
class ImageCheck:
    """Outcome for one distinct image path."""

    status: str  # ok | missing | undecodable
    digest: str  # content hash (blake2b-128 of the bytes); the resolved location when bytes were not read
    error: str = ""


def check_image(uri: str | None, root: str | Path, decode: bool = True) -> ImageCheck:
    """Check one image path or URI (relative paths resolve against ``root``).

    Args:
        uri: the value of an ``image`` / ``query_image`` cell.
        root: the dataset folder.
        decode: read, hash and decode the bytes; ``False`` only checks that the file exists.

    Returns:
        The status, a content digest (for near-duplicate detection) and the error text if any.
    """
    if uri is None or not str(uri).strip():
        return ImageCheck(MISSING, "", "no image path")
    if not decode:
        try:
            found = exists(uri, root)
        except OSError as err:  # a GCS error is as good as missing for the gate; the text says why
            return ImageCheck(MISSING, "", f"{type(err).__name__}: {err}")
        return ImageCheck(OK if found else MISSING, resolve(uri, root), "" if found else "file not found")
    try:
        data = read_bytes(uri, root)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        return ImageCheck(MISSING, "", f"{type(err).__name__}: {err}")
    except OSError as err:
        return ImageCheck(MISSING, "", f"{type(err).__name__}: {err}")
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        # The same decoder training uses (RGB conversion included), so "decodes" means "training can read it".
        decode_image(data)
    except Exception as err:  # noqa: BLE001  PIL raises many types (UnidentifiedImageError, OSError, ValueError...)
        return ImageCheck(UNDECODABLE, digest, f"{type(err).__name__}: {err}")
    return ImageCheck(OK, digest)


def check_images(
    uris: list[str | None],
    root: str | Path,
    decode: bool = True,
    workers: int = 4,
    progress: bool = True,
) -> dict[str | None, ImageCheck]:
    """Check each distinct path once, on a thread pool (file reads, zlib and GCS calls release the GIL).

    Args:
        uris: image paths; duplicates are checked once.
        root: the dataset folder that relative paths resolve against.
        decode: see :func:`check_image`.
        workers: threads.
        progress: show a progress bar.

    Returns:
        ``{path: ImageCheck}`` for every distinct value of ``uris``.
    """
    distinct = list(dict.fromkeys(uris))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(
            tqdm(
                pool.map(lambda u: check_image(u, root, decode), distinct),
                total=len(distinct),
                desc="check images",
                disable=not progress,
            )
        )
    return dict(zip(distinct, results, strict=True))
