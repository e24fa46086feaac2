"""Render the KServe InferenceService of a newly promoted champion (canary first).

A promotion writes, to ``promotion.render_dir``: ``manifests.yaml`` (the ServingRuntime and the InferenceService,
rendered by :func:`moon3.serve.deploy.prepare` from the ``serve`` section, with ``storageUri`` = the version's
source, i.e. its run's ``model/`` artifact, and the ``moon3.io/registry-*`` annotations) and ``promotion.json``.
With a previous champion the new revision is a canary (``promotion.canary_traffic_percent``, KServe keeps the
rest on the previous revision); a first champion gets 100 %. Nothing is applied here: ``kubectl apply -f`` the
file, or run the ``deploy`` step with the version.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# Schemes KServe's storage initializer can download (a source elsewhere, e.g. mlflow-artifacts:, needs an MLflow
# server whose artifact root is one of these without proxying).
KSERVE_SCHEMES = ("gs://", "s3://", "pvc://", "hdfs://", "webhdfs://", "http://", "https://", "hf://", "oci://")


def render_promotion(
    cfg: Any, client: Any, version: str, previous: str | None, out_dir: str | Path | None = None
) -> dict[str, Any]:
    """Render the InferenceService serving ``version`` and tag the version ``served_state=rendered``.

    Args:
        cfg: the full :class:`~moon3.config.Moon3Config` (sections ``serve`` and ``promotion``).
        client: an ``MlflowClient``.
        version: the new champion.
        previous: the champion it replaced (None: first champion, served at 100 %).
        out_dir: where ``manifests.yaml`` and ``promotion.json`` go (default ``promotion.render_dir``).

    Returns:
        What ``promotion.json`` holds: ``model``, ``version``, ``previous``, ``run_id``, ``storage_uri``, ``isvc``,
        ``canary_traffic_percent``, ``manifests`` (path) and ``warning`` ('' or why KServe may not fetch the URI).

    Raises:
        ValueError: ``promotion.canary_traffic_percent`` outside 0-100 or a manifest the KServe models reject.
    """
    from moon3.registry.lineage import tag_served
    from moon3.serve.deploy import prepare
    from moon3.serve.manifests import RegistryRef, to_yaml

    pcfg = cfg.promotion
    if not 0 <= pcfg.canary_traffic_percent <= 100:
        raise ValueError(f"promotion.canary_traffic_percent must be in 0-100, got {pcfg.canary_traffic_percent}")
    name = pcfg.model_name
    mv = client.get_model_version(name, str(version))
    serve = copy.deepcopy(cfg.serve)
    serve.canary_traffic_percent = pcfg.canary_traffic_percent if previous else 100
    ref = RegistryRef(name, str(mv.version), mv.run_id or "")
    manifests = prepare(serve, storage_uri=mv.source, registry=ref)
    out = Path(out_dir or pcfg.render_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifests.yaml").write_text(to_yaml(manifests))
    isvc = f"{serve.namespace}/{serve.isvc_name}"
    warning = ""
    if not str(mv.source).startswith(KSERVE_SCHEMES):
        warning = (
            f"storageUri {mv.source} is not a scheme KServe's storage initializer downloads "
            f"({', '.join(KSERVE_SCHEMES)}): give the MLflow server such an artifact root"
        )
    info = {
        "model": name,
        "version": str(mv.version),
        "previous": previous or None,
        "run_id": mv.run_id or "",
        "storage_uri": mv.source,
        "isvc": isvc,
        "canary_traffic_percent": serve.canary_traffic_percent,
        "manifests": str(out / "manifests.yaml"),
        "warning": warning,
    }
    (out / "promotion.json").write_text(json.dumps(info, indent=2) + "\n")
    tag_served(client, name, str(mv.version), isvc, "rendered")
    return info
