"""Apply the rendered manifests with the Kubernetes API (``moon3 deploy``, the ``deploy`` KFP step).

Each object is created, or, when it exists (409), replaced at its current ``resourceVersion``: applying a new
``storage_uri`` with ``canary_traffic_percent`` below 100 makes KServe roll out a canary revision beside the
previous one. The API is ``kubernetes.client.CustomObjectsApi`` (KServe's objects are custom resources);
credentials are the pod's service account in a cluster, else the local kubeconfig.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moon3.common.redact import redact_text
from moon3.pipelines.params import config_from_params
from moon3.serve.config import ServeConfig
from moon3.serve.manifests import render, round_trip, to_yaml

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
            variant: str = "") -> list[dict[str, Any]]:  # fmt: skip
    """Render the manifests with the deployment's own values (each empty argument keeps ``cfg``'s) and check
    that each parses back into the KServe models unchanged.

    Raises:
        ValueError: a bad setting (variant, replicas, storage URI) or a manifest the KServe models reject.
    """
    cfg.storage_uri = storage_uri or cfg.storage_uri
    cfg.index_uri = cfg.index_uri if index_uri is None else index_uri
    cfg.namespace = namespace or cfg.namespace
    manifests = render(cfg, variant or None)
    for manifest in manifests:
        if round_trip(manifest) != manifest:
            raise ValueError(f"{manifest['kind']}: the rendered manifest does not round-trip through the KServe models")
    return manifests


def deploy_step(
    params: dict,
    overrides: list,
    storage_uri: str,
    out_dir: str,
    index_uri: str | None = None,
    namespace: str = "",
    variant: str = "",
    dry_run: bool = False,
    api: Any = None,
) -> dict[str, Any]:
    """The ``deploy`` KFP step: render from the pipeline's params, write ``manifests.yaml``, apply.

    Args:
        params: the pipeline's ``params`` (sections of ``params.yaml``).
        overrides: ``section.key=value`` strings.
        storage_uri: the model folder's URI (the model artifact's ``gs://`` URI).
        out_dir: where ``manifests.yaml`` and ``deploy.json`` go.
        index_uri: the index folder's URI (None: ``serve.index_uri``; '': no search model).
        namespace: target namespace ('' = ``serve.namespace``).
        variant: ``cpu`` | ``gpu`` ('' = ``serve.variant``).
        dry_run: render and write only.
        api: a ``CustomObjectsApi`` (default: :func:`make_api`).

    Returns:
        ``applied`` (one entry per object, empty on a dry run), ``isvc`` and ``summary`` (one line).
    """
    cfg = config_from_params(params, overrides).serve
    manifests = prepare(cfg, storage_uri, index_uri, namespace, variant)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifests.yaml").write_text(to_yaml(manifests))
    applied = [] if dry_run else apply_manifests(manifests, api if api is not None else make_api())
    isvc = f"{cfg.namespace}/{cfg.isvc_name}"
    canary = f", canary {cfg.canary_traffic_percent}%" if cfg.canary_traffic_percent < 100 else ""
    what = "rendered (dry run)" if dry_run else ", ".join(f"{a['kind']} {a['action']}" for a in applied)
    summary = f"{isvc} ({variant or cfg.variant}{canary}) from {redact_text(cfg.storage_uri)}: {what}"
    result = {"applied": applied, "isvc": isvc, "summary": summary}
    (out / "deploy.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
