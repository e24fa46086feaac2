"""Apply the rendered manifests with the Kubernetes API (``moon3 deploy``, the ``deploy`` KFP step).

Each object is created, or, when it exists (409), replaced at its current ``resourceVersion``: applying a new
``storage_uri`` with ``canary_traffic_percent`` below 100 makes KServe roll out a canary revision beside the
previous one. The API is ``kubernetes.client.CustomObjectsApi`` (KServe's objects are custom resources);
credentials are the pod's service account in a cluster, else the local kubeconfig.

Given a registry version (``registry_version``), the InferenceService carries its name, version and run id
(:class:`~moon3.serve.manifests.RegistryRef`), and once applied the version is tagged with where it is served
(``served_isvc``, ``served_at``, ``served_state=applied``): lineage from either end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moon3.common.redact import redact_text
from moon3.pipelines.params import config_from_params
from moon3.serve.config import ServeConfig
from moon3.serve.manifests import RegistryRef, render, round_trip, to_yaml

# kind -> (group, version, plural)
RESOURCES = {
    "ServingRuntime": ("serving.kserve.io", "v1alpha1", "servingruntimes"),
    "InferenceService": ("serving.kserve.io", "v1beta1", "inferenceservices"),
}


class DeployError(RuntimeError):
    """The Kubernetes API refused an object; the message names it and the API's reason."""


def make_api(context: str | None = None) -> Any:
    """A ``CustomObjectsApi``: in-cluster credentials when running in a pod, else the kubeconfig (``context``)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(context=context)
    return client.CustomObjectsApi()


def apply_manifests(manifests: list[dict[str, Any]], api: Any) -> list[dict[str, str]]:
    """Create or replace each manifest; returns ``{"kind", "name", "namespace", "action"}`` per object.

    Raises:
        DeployError: an unknown kind or an API error other than "already exists".
    """
    from kubernetes.client.exceptions import ApiException

    done = []
    for manifest in manifests:
        kind = manifest.get("kind")
        if kind not in RESOURCES:
            raise DeployError(f"cannot apply kind {kind!r} (known: {sorted(RESOURCES)})")
        group, version, plural = RESOURCES[kind]
        meta = manifest["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        try:
            try:
                api.create_namespaced_custom_object(group, version, namespace, plural, manifest)
                action = "created"
            except ApiException as err:
                if err.status != 409:
                    raise
                current = api.get_namespaced_custom_object(group, version, namespace, plural, name)
                body = json.loads(json.dumps(manifest))
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                api.replace_namespaced_custom_object(group, version, namespace, plural, name, body)
                action = "replaced"
        except ApiException as err:
            raise DeployError(f"{kind} {namespace}/{name}: {err.status} {err.reason}") from None
        done.append({"kind": kind, "name": name, "namespace": namespace, "action": action})
    return done


def prepare(cfg: ServeConfig, storage_uri: str = "", index_uri: str | None = None, namespace: str = "",
            variant: str = "", registry: RegistryRef | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Render the manifests with the deployment's own values (each empty argument keeps ``cfg``'s) and check
    that each parses back into the KServe models unchanged.

    ``registry``: the registry version served (annotations and labels on the InferenceService).

    Raises:
        ValueError: a bad setting (variant, replicas, storage URI) or a manifest the KServe models reject.
    """
    cfg.storage_uri = storage_uri or cfg.storage_uri
    cfg.index_uri = cfg.index_uri if index_uri is None else index_uri
    cfg.namespace = namespace or cfg.namespace
    manifests = render(cfg, variant or None, registry)
    for manifest in manifests:
        if round_trip(manifest) != manifest:
            raise ValueError(f"{manifest['kind']}: the rendered manifest does not round-trip through the KServe models")
    return manifests


def resolve_registry(cfg: Any, registry_version: str, client: Any = None) -> tuple[Any, Any, str]:
    """``(RegistryRef, MlflowClient, model source URI)`` of ``registry_version`` (a number or an alias) of
    ``promotion.model_name``; ``(None, None, "")`` when no version is given.

    Raises:
        moon3.registry.lineage.LineageError: no such version or alias.
    """
    if not registry_version:
        return None, None, ""
    from moon3.registry.lineage import resolve_version
    from moon3.registry.register import client_for

    client = client or client_for(cfg.promotion.tracking_uri)
    mv = resolve_version(client, cfg.promotion.model_name, registry_version)
    return RegistryRef(cfg.promotion.model_name, str(mv.version), mv.run_id or ""), client, mv.source or ""


def deploy_step(
    params: dict | str,
    overrides: list,
    storage_uri: str,
    out_dir: str,
    index_uri: str | None = None,
    namespace: str = "",
    variant: str = "",
    dry_run: bool = False,
    api: Any = None,
    registry_version: str = "",
    registry_client: Any = None,
    image: str = "",
    gpu_image: str = "",
) -> dict[str, Any]:
    """The ``deploy`` KFP step: render from the pipeline's params, write ``manifests.yaml``, apply.

    Args:
        params: the pipeline's ``params`` (sections of ``params.yaml``: YAML/JSON text or a struct).
        overrides: ``section.key=value`` strings.
        storage_uri: the model folder's URI (the model artifact's ``gs://`` URI).
        out_dir: where ``manifests.yaml`` and ``deploy.json`` go.
        index_uri: the index folder's URI (None: ``serve.index_uri``; '': no search model).
        namespace: target namespace ('' = ``serve.namespace``).
        variant: ``cpu`` | ``gpu`` ('' = ``serve.variant``).
        dry_run: render and write only.
        api: a ``CustomObjectsApi`` (default: :func:`make_api`).
        registry_version: the version (or alias) of ``promotion.model_name`` being served ('' = none): the
            InferenceService is annotated with it, an empty ``storage_uri`` becomes the version's source, and
            after applying, the version is tagged ``served_isvc`` / ``served_at``.
        registry_client: an ``MlflowClient`` (default: one for ``promotion.tracking_uri``).
        image: serving image of the CPU variant ('' = ``serve.image``): the pipeline passes the image it ran.
        gpu_image: serving image of the GPU variant ('' = ``serve.gpu_image``).

    Returns:
        ``applied`` (one entry per object, empty on a dry run), ``isvc``, ``registry_version`` ('' if none) and
        ``summary`` (one line).
    """
    full = config_from_params(params, overrides)
    cfg = full.serve
    cfg.image, cfg.gpu_image = image or cfg.image, gpu_image or cfg.gpu_image
    ref, client, source = resolve_registry(full, registry_version, registry_client)
    manifests = prepare(cfg, storage_uri or source, index_uri, namespace, variant, ref)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifests.yaml").write_text(to_yaml(manifests))
    applied = [] if dry_run else apply_manifests(manifests, api if api is not None else make_api())
    isvc = f"{cfg.namespace}/{cfg.isvc_name}"
    if ref is not None and not dry_run:
        from moon3.registry.lineage import tag_served

        tag_served(client, ref.model, ref.version, isvc, "applied")
    canary = f", canary {cfg.canary_traffic_percent}%" if cfg.canary_traffic_percent < 100 else ""
    what = "rendered (dry run)" if dry_run else ", ".join(f"{a['kind']} {a['action']}" for a in applied)
    served = f" v{ref.version} of {ref.model}" if ref else ""
    summary = f"{isvc} ({variant or cfg.variant}{canary}){served} from {redact_text(cfg.storage_uri)}: {what}"
    result = {"applied": applied, "isvc": isvc, "registry_version": ref.version if ref else "", "summary": summary}
    (out / "deploy.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
