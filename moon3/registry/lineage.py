"""Lineage across the registry and serving, walkable from either end (``moon3 lineage``).

Forward: a served InferenceService (rendered manifest or ``kubectl get isvc -o yaml``) carries the registry model,
version and run id as ``moon3.io/registry-*`` annotations and labels -> the registry version -> its run -> the
run's lineage tags (``data_version``, ``git_sha``, ``params_hash``, ``pipeline_run_id``).

Back: a version is tagged with where it is served (``served_isvc`` = namespace/name, ``served_at``,
``served_state`` = ``rendered`` after a promotion rendered its manifests, ``applied`` after a deploy applied
them); versions are found by data hash with :func:`data_lineage`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from moon3.serve.manifests import find_inference_service, registry_ref

LINEAGE_TAGS = ("data_version", "git_sha", "params_hash", "pipeline_run_id")
SERVED_TAGS = ("served_isvc", "served_at", "served_state")
HISTORY_TAGS = ("promoted_at", "previous_champion", "rolled_back_at")


class LineageError(RuntimeError):
    """A lineage link is missing or inconsistent (unknown version, manifest without annotations, run mismatch)."""


def resolve_version(client: Any, name: str, ref: str) -> Any:
    """The ``ModelVersion`` of ``name`` given a version number or an alias (``champion``, ``challenger``).

    Raises:
        LineageError: no such version or alias.
    """
    from mlflow.exceptions import MlflowException

    ref = str(ref).strip()
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as err:
        raise LineageError(f"{name}: no version or alias {ref!r} ({err.error_code})") from None


def tag_served(client: Any, name: str, version: str, isvc: str, state: str) -> None:
    """Tag ``name`` version ``version`` with where it is served: ``served_isvc``, ``served_at``, ``served_state``.

    Args:
        client: an ``MlflowClient``.
        name: registered model name.
        version: the version.
        isvc: ``namespace/name`` of the InferenceService.
        state: ``rendered`` (manifests written on promotion) or ``applied`` (created/replaced in the cluster).
    """
    tags = {"served_isvc": isvc, "served_at": f"{time.time():.3f}", "served_state": state}
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


def version_lineage(client: Any, name: str, ref: str) -> dict[str, Any]:
    """Version -> run -> data: everything recorded about ``name`` version (or alias) ``ref``.

    Returns:
        ``model``, ``version``, ``aliases`` (those pointing at it), ``source`` (the model folder URI), ``run_id``,
        ``run_status``, the lineage tags (``data_version``, ``git_sha``, ``params_hash``, ``pipeline_run_id``:
        the run's, else the version's), the served tags and the promotion history tags ('' where absent).

    Raises:
        LineageError: no such version.
    """
    from mlflow.exceptions import MlflowException

    mv = resolve_version(client, name, ref)
    version = str(mv.version)
    vtags = dict(mv.tags or {})
    run_tags: dict[str, str] = {}
    run_status = ""
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
            run_tags, run_status = dict(run.data.tags or {}), run.info.status
        except MlflowException:
            run_status = "missing"
    aliases = client.get_registered_model(name).aliases or {}
    out: dict[str, Any] = {
        "model": name,
        "version": version,
        "aliases": sorted(a for a, v in aliases.items() if str(v) == version),
        "source": mv.source or "",
        "run_id": mv.run_id or "",
        "run_status": run_status,
    }
    out.update({k: run_tags.get(k, vtags.get(k, "")) for k in LINEAGE_TAGS})
    out.update({k: vtags.get(k, "") for k in SERVED_TAGS + HISTORY_TAGS})
    return out


def load_manifest(manifest: str | Path | dict[str, Any] | list[Any]) -> dict[str, Any]:
    """The InferenceService of a YAML file, YAML text, a parsed object or a list of documents.

    Raises:
        ValueError: no InferenceService in it.
    """
    if isinstance(manifest, Path):
        manifest = manifest.read_text()
    if isinstance(manifest, str):
        documents = list(yaml.safe_load_all(manifest))
    elif isinstance(manifest, dict):
        documents = [manifest]
    else:
        documents = list(manifest)
    return find_inference_service(documents)


def manifest_lineage(client: Any, manifest: str | Path | dict[str, Any] | list[Any]) -> dict[str, Any]:
    """Served revision -> version -> run -> data: follow an InferenceService's ``moon3.io/registry-*`` annotations.

    Args:
        client: an ``MlflowClient``.
        manifest: rendered ``manifests.yaml``, ``kubectl get isvc NAME -o yaml`` output (file path, text or parsed).

    Returns:
        :func:`version_lineage` of the annotated version plus ``isvc`` (namespace/name), ``storage_uri``,
        ``storage_matches_source`` (the served folder is the version's source), ``canary_traffic_percent`` and,
        from a live object's status, ``latest_ready_revision`` ('' when absent).

    Raises:
        ValueError: no InferenceService in ``manifest``.
        LineageError: no annotations, an unknown version, or an annotated run id that is not the version's run.
    """
    isvc = load_manifest(manifest)
    meta = isvc.get("metadata") or {}
    where = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    ref = registry_ref(isvc)
    if ref is None:
        raise LineageError(f"InferenceService {where} carries no moon3.io/registry-* annotations or labels")
    out = version_lineage(client, ref.model, ref.version)
    if ref.run_id and out["run_id"] and ref.run_id != out["run_id"]:
        raise LineageError(
            f"InferenceService {where} names run {ref.run_id} but {ref.model} v{ref.version} is run {out['run_id']}"
        )
    predictor = (isvc.get("spec") or {}).get("predictor") or {}
    storage = (predictor.get("model") or {}).get("storageUri", "")
    status = ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}
    return {
        "isvc": where,
        "storage_uri": storage,
        "storage_matches_source": bool(storage) and storage == out["source"],
        "canary_traffic_percent": predictor.get("canaryTrafficPercent", 100),
        "latest_ready_revision": status.get("latestReadyRevision", ""),
        **out,
    }


def data_lineage(client: Any, name: str, data_version: str) -> list[dict[str, Any]]:
    """Data -> versions: :func:`version_lineage` of every version of ``name`` registered from ``data_version``.

    Raises:
        ValueError: a quote in ``data_version``.
    """
    if "'" in data_version or '"' in data_version:
        raise ValueError(f"data_version may not contain quotes: {data_version!r}")
    found = client.search_model_versions(f"name='{name}' and tags.data_version='{data_version}'")
    return [version_lineage(client, name, str(v.version)) for v in sorted(found, key=lambda v: int(v.version))]


def format_lineage(info: dict[str, Any]) -> str:
    """Human-readable lines: the served object (if any), the version and its run, the data and the serving tags."""
    lines = []
    if "isvc" in info:
        canary = info["canary_traffic_percent"]
        lines.append(f"InferenceService {info['isvc']}" + (f" (canary {canary}%)" if canary != 100 else ""))
        match = "matches the version source" if info["storage_matches_source"] else "DIFFERS from the version source"
        lines.append(f"  storage_uri: {info['storage_uri']} ({match})")
        if info.get("latest_ready_revision"):
            lines.append(f"  latest_ready_revision: {info['latest_ready_revision']}")
    aliases = f" [{', '.join(info['aliases'])}]" if info["aliases"] else ""
    lines.append(f"{info['model']} v{info['version']}{aliases}")
    lines.append(f"  run_id: {info['run_id']} ({info['run_status'] or 'unknown'})")
    for key in ("source", *LINEAGE_TAGS, *SERVED_TAGS, *HISTORY_TAGS):
        if info.get(key) or key in LINEAGE_TAGS or key == "served_isvc":
            lines.append(f"  {key}: {info.get(key) or '-'}")
    return "\n".join(lines)
