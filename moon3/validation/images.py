"""Image checks of the validation gate: contained, a regular file, within limits, decodes; once per distinct path.

Scaled catalogs (``mini.py --scale``) and real marketplaces reuse the same image in many rows, so the work is
done per distinct path and mapped back to rows: a 1M-row table with 3,000 distinct images decodes 3,000 files.

Every way a path can fail is a status of its own; the gate quarantines the row with a reason named after it
(:data:`moon3.validation.checks.IMAGE_RULES`: ``image_<suffix>`` for products, ``query_image_<suffix>``):

- ``missing``: no path, or no such file or object.
- ``outside_root`` (``_outside_dataset``): a relative path that climbs out of the dataset folder (``../x.png``),
  a symlink whose target lies outside it, or an absolute local path outside it. The format allows relative
  paths and ``gs://`` URIs (explicit URIs are not contained); ``validation.allowed_image_dirs`` names further
  folders (a DVC symlink cache, a shared image disk).
- ``not_a_file``: a FIFO, a device (``/dev/zero``), a folder or a socket: refused before any byte is read (the
  file is opened non-blocking and checked with ``fstat``), so never a hang or an endless read.
- ``too_large``: more than ``validation.max_image_bytes`` bytes (from ``fstat``, or a ranged GCS read) or
  ``validation.max_image_pixels`` pixels (from the header, before the pixels are decoded).
- ``remote_error`` (``_unreadable_remote``): a ``gs://`` read that failed for credentials, network or the
  ``validation.remote_timeout_s`` timeout. Without credentials the client fails once and every ``gs://`` path
  gets this status; when no ``gs://`` image at all could be read the gate also fails with one clear error.
- ``undecodable``: the bytes are not an image the shared decoder (:func:`moon3.data.io.decode_image`) reads.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from moon3.data.io import UnreadableFile, decode_image, exists, gcs_client_or_error, is_gcs, join_uri, read_bytes

OK = "ok"
MISSING = "missing"
UNDECODABLE = "undecodable"
OUTSIDE_ROOT = "outside_root"
NOT_A_FILE = "not_a_file"
TOO_LARGE = "too_large"
REMOTE_ERROR = "remote_error"
FAILED_STATES = [MISSING, OUTSIDE_ROOT, NOT_A_FILE, TOO_LARGE, REMOTE_ERROR, UNDECODABLE]


@dataclass(frozen=True)
class ImageCheck:
    """Outcome for one distinct image path."""

    status: str  # ok or one of FAILED_STATES
    digest: str  # content hash (blake2b-128 of the bytes); the resolved location when bytes were not read
    error: str = ""


@dataclass(frozen=True)
class ImageLimits:
    """What the gate allows an image to be (``params.yaml`` ``validation``)."""

    max_bytes: int | None = None
    max_pixels: int | None = None
    remote_timeout_s: float | None = 60.0
    allowed_dirs: tuple[str, ...] = ()


class PathGuard:
    """Whether a local path stays inside the dataset folder (or an allowed folder) once symlinks are resolved.

    Resolved folders are cached per guard (one gate run): a 1M-image catalog in a few folders costs one
    ``realpath`` per folder and one ``lstat`` per file, not one per path component.
    """

    def __init__(self, root: str | Path, allowed: Sequence[str | Path] = ()) -> None:
        self.root = str(root)
        self.bases = [os.path.realpath(b) for b in (root, *allowed)]
        self._dirs: dict[str, str] = {}

    def _real(self, location: str) -> str:
        folder, name = os.path.split(location)
        if name in ("", ".", ".."):
            return os.path.realpath(location)
        real_folder = self._dirs.get(folder)
        if real_folder is None:
            real_folder = self._dirs[folder] = os.path.realpath(folder)
        joined = os.path.join(real_folder, name)
        return os.path.realpath(joined) if os.path.islink(joined) else joined

    def check(self, uri: str) -> None:
        """Return quietly for a ``gs://`` URI or a contained path.

        Raises:
            UnreadableFile: ``outside_root``, naming where the path leads.
        """
        if is_gcs(uri):
            return
        if is_gcs(self.root):
            join_uri(self.root, uri)  # raises when it climbs out of the prefix
            return
        location = uri if os.path.isabs(uri) else os.path.join(self.root, uri)
        real = self._real(location)
        for base in self.bases:
            if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
                return
        raise UnreadableFile(OUTSIDE_ROOT, f"{uri}: resolves to {real}, outside the dataset folder {self.root}")


def check_image(
    uri: str | None,
    root: str | Path,
    decode: bool = True,
    limits: ImageLimits | None = None,
    guard: PathGuard | None = None,
) -> ImageCheck:
    """Check one image path or URI (relative paths resolve against ``root``).

    Args:
        uri: the value of an ``image`` / ``query_image`` cell.
        root: the dataset folder.
        decode: read, hash and decode the bytes; ``False`` checks containment, file type and size only.
        limits: byte, pixel and timeout limits and the folders besides ``root`` paths may lead into.
        guard: a :class:`PathGuard` shared across calls (made from ``root`` and ``limits`` when ``None``).

    Returns:
        The status, a content digest (for near-duplicate detection) and the error text if any. Never raises
        for anything a path or a file can be.
    """
    if uri is None or not str(uri).strip():
        return ImageCheck(MISSING, "", "no image path")
    limits = limits or ImageLimits()
    guard = guard or PathGuard(root, limits.allowed_dirs)
    try:
        guard.check(str(uri))
        if not decode:
            return _exists_only(str(uri), root, limits)
        data = read_bytes(str(uri), root, max_bytes=limits.max_bytes, timeout=limits.remote_timeout_s)
    except UnreadableFile as err:
        return ImageCheck(err.reason, "", str(err))
    except (OSError, ValueError) as err:  # FileNotFoundError, NotADirectoryError, PermissionError, a NUL byte...
        return ImageCheck(MISSING, "", f"{type(err).__name__}: {err}")
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        # The same decoder training uses (RGB conversion included), so "decodes" means "training can read it".
        decode_image(data, max_pixels=limits.max_pixels)
    except UnreadableFile as err:
        return ImageCheck(err.reason, digest, str(err))
    except Exception as err:  # noqa: BLE001  PIL raises many types (UnidentifiedImageError, OSError, ValueError...)
        return ImageCheck(UNDECODABLE, digest, f"{type(err).__name__}: {err}")
    return ImageCheck(OK, digest)


def _exists_only(uri: str, root: str | Path, limits: ImageLimits) -> ImageCheck:
    """``check_images: false``: a stat (local) or a metadata call (GCS), no read."""
    if is_gcs(uri) or is_gcs(root):
        location = uri if is_gcs(uri) else join_uri(str(root), uri)
        found = exists(location, timeout=limits.remote_timeout_s)
        return ImageCheck(OK if found else MISSING, location, "" if found else "object not found")
    location = uri if os.path.isabs(uri) else os.path.join(str(root), uri)
    info = os.stat(location)  # FileNotFoundError -> missing
    if not stat.S_ISREG(info.st_mode):
        return ImageCheck(NOT_A_FILE, "", f"{location}: not a regular file")
    if limits.max_bytes is not None and info.st_size > limits.max_bytes:
        return ImageCheck(TOO_LARGE, "", f"{location}: {info.st_size} bytes, over the limit of {limits.max_bytes}")
    return ImageCheck(OK, location)


def check_images(
    uris: list[str | None],
    root: str | Path,
    decode: bool = True,
    workers: int = 4,
    progress: bool = True,
    limits: ImageLimits | None = None,
) -> dict[str | None, ImageCheck]:
    """Check each distinct path once, on a thread pool (file reads, zlib and GCS calls release the GIL).

    When ``gs://`` paths are present a storage client is made once first; if that fails (no credentials), every
    ``gs://`` path gets ``remote_error`` with that message instead of one slow failure per path.

    Args:
        uris: image paths; duplicates are checked once.
        root: the dataset folder that relative paths resolve against.
        decode: see :func:`check_image`.
        workers: threads.
        progress: show a progress bar.
        limits: see :class:`ImageLimits`.

    Returns:
        ``{path: ImageCheck}`` for every distinct value of ``uris``.
    """
    limits = limits or ImageLimits()
    distinct = list(dict.fromkeys(uris))
    guard = PathGuard(root, limits.allowed_dirs)
    results: dict[str | None, ImageCheck] = {}
    if any(isinstance(u, str) and is_gcs(u) for u in distinct) or is_gcs(root):
        client_error = gcs_client_or_error()
        if client_error is not None:
            for u in distinct:
                if isinstance(u, str) and (is_gcs(u) or is_gcs(root)) and u.strip():
                    results[u] = ImageCheck(REMOTE_ERROR, "", str(client_error))
    todo = [u for u in distinct if u not in results]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checked = list(
            tqdm(
                pool.map(lambda u: check_image(u, root, decode, limits, guard), todo),
                total=len(todo),
                desc="check images",
                disable=not progress,
            )
        )
    results.update(zip(todo, checked, strict=True))
    return {u: results[u] for u in distinct}
