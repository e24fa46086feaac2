"""Reading files and images from local paths or ``gs://`` URIs.

Relative image paths in a table are relative to the dataset folder. ``gs://`` goes through
``google-cloud-storage``; with ``STORAGE_EMULATOR_HOST`` set (fake-gcs-server in tests) it uses anonymous
credentials, so no secret is ever needed to run the tests.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path

from PIL import Image


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


def resolve(uri: str, root: str | Path | None = None) -> str:
    """Absolute location of ``uri``: gs:// and absolute paths unchanged, relative ones joined to ``root``."""
    if is_gcs(uri) or os.path.isabs(uri) or root is None:
        return str(uri)
    if is_gcs(root):
        return f"{str(root).rstrip('/')}/{uri}"
    return str(Path(root) / uri)


def read_bytes(uri: str, root: str | Path | None = None) -> bytes:
    """Bytes of a local file or a GCS object.

    Raises:
        FileNotFoundError: naming the resolved location.
    """
    location = resolve(uri, root)
    if is_gcs(location):
        from google.api_core.exceptions import NotFound

        bucket, key = split_gcs(location)
        try:
            return gcs_client().bucket(bucket).blob(key).download_as_bytes()
        except NotFound:
            raise FileNotFoundError(location) from None
    return Path(location).read_bytes()


def exists(uri: str, root: str | Path | None = None) -> bool:
    """Whether the file or GCS object exists."""
    location = resolve(uri, root)
    if is_gcs(location):
        bucket, key = split_gcs(location)
        return gcs_client().bucket(bucket).blob(key).exists()
    return os.path.exists(location)


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes into an RGB PIL image (raises ``PIL.UnidentifiedImageError`` / ``OSError``)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def load_image(uri: str, root: str | Path | None = None) -> Image.Image:
    """Read and decode an image from a path or URI into RGB."""
    return decode_image(read_bytes(uri, root))


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
