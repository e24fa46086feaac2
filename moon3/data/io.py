"""Reading files and images from local paths or ``gs://`` URIs.

Relative image paths in a table are relative to the dataset folder. ``gs://`` goes through
``google-cloud-storage``; with ``STORAGE_EMULATOR_HOST`` set (fake-gcs-server in tests) it uses anonymous
credentials, so no secret is ever needed to run the tests.

Hostile files are refused before they are read, with an :class:`UnreadableFile` whose ``reason`` the data gate
counts: a path that is not a regular file (a FIFO would block forever, ``/dev/zero`` never ends, a folder),
more bytes than a limit, a remote read that fails for credentials, network or a timeout. :func:`decode_image`
checks the pixel count from the header before decoding and converts every PIL mode to RGB by scaling its value
range (a 16-bit PNG is divided by 257, not clipped to white); training, evaluation and serving all decode through
it (:func:`load_image`, used by :mod:`moon3.model.items`).
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

MAX_IMAGE_BYTES = 50 * 2**20  # defaults of load_image; the gate takes its limits from params (validation.*)
MAX_IMAGE_PIXELS = 100_000_000
REMOTE_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class UnreadableFile(OSError):
    """A file the readers refuse or could not read; ``reason`` is a short name the gate counts.

    Reasons: ``not_a_file`` (FIFO, device, folder, socket), ``too_large`` (bytes or pixels over a limit),
    ``outside_root`` (a path that leaves the dataset folder), ``remote_error`` (credentials, network, timeout).
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def is_gcs(uri: str | Path) -> bool:
    """True for ``gs://bucket/key`` URIs."""
    return str(uri).startswith("gs://")


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    bucket, _, key = uri[len("gs://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: not a gs://bucket/key URI")
    return bucket, key


@lru_cache(maxsize=1)
def gcs_client():
    """A storage client; anonymous against an emulator (``STORAGE_EMULATOR_HOST``), default credentials else."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="moon3-test", credentials=AnonymousCredentials())
    return storage.Client()


def remote_errors() -> tuple[type[BaseException], ...]:
    """Exception types of a failed GCS call other than a missing object: credentials, HTTP errors, network."""
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError
    from requests.exceptions import RequestException

    return GoogleAuthError, GoogleAPIError, RequestException, ConnectionError, TimeoutError


def gcs_client_or_error() -> UnreadableFile | None:
    """``None`` when a storage client can be made, else the reason (missing credentials, typically) as an
    :class:`UnreadableFile` (``remote_error``): lets a caller with many ``gs://`` paths fail them all at once."""
    try:
        gcs_client()
    except remote_errors() as err:
        return UnreadableFile("remote_error", f"gs:// client: {type(err).__name__}: {err}")
    return None


def resolve(uri: str, root: str | Path | None = None) -> str:
    """Absolute location of ``uri``: gs:// and absolute paths unchanged, relative ones joined to ``root``.

    Under a ``gs://`` root the joined key is normalised (``validated/../prepared/x.png`` ->
    ``prepared/x.png``): object stores do not interpret ``..``, so the literal join would name no object.

    Raises:
        UnreadableFile: ``outside_root`` when a relative path climbs above a ``gs://`` root's bucket.
    """
    if is_gcs(uri) or os.path.isabs(uri) or root is None:
        return str(uri)
    if is_gcs(root):
        return join_uri(str(root), str(uri), contained=False)
    return str(Path(root) / uri)


def join_uri(root: str, rel: str, contained: bool = True) -> str:
    """``root/rel`` for a ``gs://`` (or any ``/``-separated) root, with ``.`` and ``..`` resolved.

    Args:
        root: a ``gs://bucket/prefix`` (or a ``/``-separated path).
        rel: a relative path.
        contained: refuse a ``rel`` that climbs above ``root`` (the gate: ``gs://b/run1/prepared`` and
            ``../x.png`` is outside the dataset); ``False`` resolves it within the bucket (a table in
            ``gs://b/run1/validated`` naming ``../prepared/x.png`` means ``gs://b/run1/prepared/x.png``).

    Raises:
        UnreadableFile: ``outside_root`` when ``rel`` is absolute or climbs out of ``root`` (``contained``) or
            out of the bucket.
    """
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith(("../", "/")):
        if contained or norm.startswith("/"):
            raise UnreadableFile("outside_root", f"{rel}: climbs out of {root}")
        head, base = (f"gs://{split_gcs(root)[0]}", split_gcs(root)[1]) if is_gcs(root) else ("", root)
        joined = posixpath.normpath(posixpath.join(base.strip("/") if head else base, norm))
        if head and (joined == ".." or joined.startswith("../")):
            raise UnreadableFile("outside_root", f"{rel}: climbs out of the bucket of {root}")
        return f"{head}/{joined}" if head else joined
    return f"{root.rstrip('/')}/{norm}" if norm != "." else root.rstrip("/")


def _read_local(location: str, max_bytes: int | None) -> bytes:
    """A regular file's bytes; opened non-blocking (a FIFO must not block the open) and checked by ``fstat``."""
    try:
        fd = os.open(location, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise UnreadableFile("not_a_file", f"{location}: is a folder, not a file") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = (
                "folder"
                if stat.S_ISDIR(info.st_mode)
                else "FIFO"
                if stat.S_ISFIFO(info.st_mode)
                else ("device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "special file")
            )
            raise UnreadableFile("not_a_file", f"{location}: is a {kind}, not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise UnreadableFile("too_large", f"{location}: {info.st_size} bytes, over the limit of {max_bytes}")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:  # a file that grows while it is read
                raise UnreadableFile("too_large", f"{location}: over the limit of {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_bytes(
    uri: str,
    root: str | Path | None = None,
    max_bytes: int | None = None,
    timeout: float | None = REMOTE_TIMEOUT_S,
) -> bytes:
    """Bytes of a local regular file or a GCS object.

    Args:
        uri: a path (relative to ``root``) or a ``gs://`` URI.
        root: the folder or ``gs://`` prefix relative paths resolve against.
        max_bytes: refuse more bytes than this (``None``: no limit).
        timeout: seconds for a GCS read, retries included.

    Raises:
        FileNotFoundError: naming the resolved location.
        UnreadableFile: not a regular file, over ``max_bytes``, or a remote read that failed (credentials,
            network, timeout).
    """
    location = resolve(uri, root)
    if not is_gcs(location):
        try:
            return _read_local(location, max_bytes)
        except ValueError as err:  # an embedded NUL byte
            raise FileNotFoundError(f"{location!r}: not a valid path: {err}") from None
    from google.api_core.exceptions import NotFound
    from google.cloud.storage.retry import DEFAULT_RETRY

    retry = DEFAULT_RETRY.with_timeout(timeout) if timeout else DEFAULT_RETRY
    # A ranged read (end is inclusive) so an oversized object costs max_bytes + 1 bytes, not all of it.
    start, end = (0, max_bytes) if max_bytes is not None else (None, None)
    try:
        bucket, key = split_gcs(location)
        blob = gcs_client().bucket(bucket).blob(key)
        data = blob.download_as_bytes(start=start, end=end, timeout=timeout or 60, retry=retry)
    except NotFound:
        raise FileNotFoundError(location) from None
    except remote_errors() as err:
        raise UnreadableFile("remote_error", f"{location}: {type(err).__name__}: {err}") from None
    except ValueError as err:  # no bucket, or a bucket name GCS cannot have
        raise FileNotFoundError(f"{location}: not a valid gs:// URI: {err}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise UnreadableFile("too_large", f"{location}: over the limit of {max_bytes} bytes")
    return data


def exists(uri: str, root: str | Path | None = None, timeout: float | None = REMOTE_TIMEOUT_S) -> bool:
    """Whether the regular file or GCS object exists (a FIFO, a device or a folder does not count).

    Raises:
        UnreadableFile: ``remote_error`` when GCS cannot be asked (credentials, network, timeout).
    """
    location = resolve(uri, root)
    if is_gcs(location):
        from google.cloud.storage.retry import DEFAULT_RETRY

        retry = DEFAULT_RETRY.with_timeout(timeout) if timeout else DEFAULT_RETRY
        try:
            bucket, key = split_gcs(location)
            return gcs_client().bucket(bucket).blob(key).exists(timeout=timeout or 60, retry=retry)
        except remote_errors() as err:
            raise UnreadableFile("remote_error", f"{location}: {type(err).__name__}: {err}") from None
        except ValueError:  # not a valid bucket name: no such object
            return False
    return os.path.isfile(location)  # False for a NUL byte too


def decode_image(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes into an RGB PIL image.

    The pixel count is read from the header and checked before the pixels are decoded. Every mode becomes RGB
    by :func:`to_rgb` (16-bit and float images scaled, transparency composited on white).

    Raises:
        UnreadableFile: ``too_large`` for more than ``max_pixels`` pixels (or a PIL decompression bomb).
        PIL.UnidentifiedImageError, OSError, ValueError: the bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            pixels = img.width * img.height
            if max_pixels is not None and pixels > max_pixels:
                raise UnreadableFile("too_large", f"{img.width}x{img.height} = {pixels} pixels, over the "
                                     f"limit of {max_pixels}")  # fmt: skip
            img.load()
            return to_rgb(img)
    except Image.DecompressionBombError as err:
        raise UnreadableFile("too_large", str(err)) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB image of any PIL mode, its value range scaled rather than clipped.

    ``I;16*`` (16-bit PNG) and ``I`` with values in 0..65535 are divided by 257; ``I`` beyond that range and
    ``F`` are scaled from their own minimum and maximum (``F`` already in [0, 1] or [0, 255] is taken as such);
    modes with alpha (``LA``, ``RGBA``, ``PA``, premultiplied ones, and ``L``/``P``/``RGB`` with a transparent
    colour) are composited on white;
    ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` convert as PIL converts them.
    """
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    if mode in ("La", "RGBa", "PA") or (mode in ("L", "P", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")  # premultiplied alpha, a palette's or a tRNS colour's transparency -> RGBA
    if img.mode in ("LA", "RGBA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map an ``I*`` or ``F`` pixel array onto 0..255."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif mode == "F" and low >= 0 and high <= 255:
        scaled = values
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    scaled = np.where(finite, scaled, 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def load_image(
    uri: str,
    root: str | Path | None = None,
    max_bytes: int | None = MAX_IMAGE_BYTES,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Read and decode an image from a path or URI into RGB (the one decoder training, eval and serving use)."""
    return decode_image(read_bytes(uri, root, max_bytes=max_bytes), max_pixels=max_pixels)


def download_dir(uri: str, dest: str | Path) -> Path:
    """Copy every object under a ``gs://`` prefix into ``dest`` (a model folder, a dataset); return ``dest``."""
    bucket, prefix = split_gcs(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    dest = Path(dest)
    found = False
    for blob in gcs_client().list_blobs(bucket, prefix=prefix):
        if blob.name.endswith("/"):
            continue
        target = dest / blob.name[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(target))
        found = True
    if not found:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    return dest
