"""Where a served model or index lives: a local folder, a ``gs://`` prefix, or an MLflow model URI.

``gs://`` prefixes are copied once into the moon3 cache (:func:`moon3.model.backbone.fetch_dir`). MLflow URIs
(``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/PATH``, ``mlflow-artifacts:/...``) are downloaded
with MLflow's own client (``MLFLOW_TRACKING_URI`` and its usual credentials) into a fresh folder on every start,
since an alias can move; the moon3 model folder is the downloaded folder or the one folder below it that holds
``moon3_config.json``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from moon3.common.redact import redact_text
from moon3.model.backbone import fetch_dir
from moon3.model.contract import CONTRACT_FILE

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_mlflow_uri(uri: str) -> bool:
    """True for an MLflow model or run artifact URI."""
    return str(uri).startswith(MLFLOW_SCHEMES)


def find_model_folder(root: Path, max_depth: int = 3) -> Path:
    """``root`` if it holds ``moon3_config.json``, else the single folder below it (at most ``max_depth`` levels)
    that does.

    Raises:
        FileNotFoundError: none, or several candidates.
    """
    if (root / CONTRACT_FILE).exists():
        return root
    found = [p.parent for p in root.rglob(CONTRACT_FILE) if len(p.relative_to(root).parts) <= max_depth + 1]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise FileNotFoundError(f"{root}: {what} moon3 model folder(s) ({CONTRACT_FILE}) found under it")
    return found[0]


def resolve_model_uri(uri: str, dst: str | Path | None = None) -> Path:
    """A local moon3 model folder for ``uri``.

    Args:
        uri: local folder, ``gs://`` prefix, or MLflow URI.
        dst: where MLflow artifacts go (default: a new temporary folder).

    Raises:
        FileNotFoundError: a local folder that does not exist, or no model folder in the download.
    """
    uri = str(uri)
    if is_mlflow_uri(uri):
        import mlflow.artifacts

        target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="moon3-mlflow-"))
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target))
        except Exception as err:  # MlflowException, OSError, HTTP errors: one line naming the (redacted) URI
            raise FileNotFoundError(
                f"{redact_text(uri)}: MLflow download failed ({' '.join(str(err).split())[:300]})"
            ) from None
        return find_model_folder(Path(local))
    local = fetch_dir(uri)
    if not local.exists():
        raise FileNotFoundError(f"{redact_text(uri)}: no such model folder")
    return local


def resolve_index_uri(uri: str) -> Path:
    """A local index folder for a local path or ``gs://`` prefix.

    Raises:
        FileNotFoundError: it does not exist.
    """
    local = fetch_dir(uri)
    if not local.exists():
        raise FileNotFoundError(f"{redact_text(uri)}: no such index folder (build it with `moon3 index build`)")
    return local
