"""Multi-node training as a Kubeflow Trainer ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``).

The pipeline's ``trainjob`` trainer runs a small launcher pod that writes the config and the dataset to a
shared volume, submits the TrainJob built here, waits for it, and copies the trained model back into the
pipeline's artifacts. The manifest targets the Trainer v2.1 API (``podTemplateOverrides`` on the ``node`` job
of a ``torch-distributed`` ClusterTrainingRuntime); every node runs ``torchrun`` over the training CLI.

No cluster runs here: tests check the manifest and the client calls against a fake API object.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import yaml

from moon3.pipelines.config import PipelineConfig
from moon3.pipelines.placement import k8s_resources, k8s_tolerations

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
NODE_JOB = "node"  # the replicated job (and container) name of the torch runtimes
VOLUME = "moon3-shared"
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def trainjob_name(run_id: str, prefix: str = "moon3-pretrain") -> str:
    """An RFC 1035 name (lowercase, ``[a-z0-9-]``, <= 63 chars, starts with a letter) for one pipeline run."""
    suffix = re.sub(r"[^a-z0-9-]", "-", run_id.lower()).strip("-")[:20].strip("-")
    name = f"{prefix}-{suffix}" if suffix else prefix
    return name[:63].rstrip("-")


def build_trainjob(
    name: str,
    pc: PipelineConfig,
    command: list[str],
    claim_name: str,
    namespace: str,
    env: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob manifest (a plain dict, ready for YAML or the Kubernetes client).

    Args:
        name: TrainJob name (see :func:`trainjob_name`).
        pc: the ``pipeline`` config: image, nodes, processes per node, resources, node pool, volume, runtime.
        command: what every node runs (see :func:`moon3.pipelines.launch.torchrun_command`).
        claim_name: the PersistentVolumeClaim shared with the launcher pod (config, data, checkpoints, model).
        namespace: where the TrainJob goes (the runtime must be cluster-scoped or live there).
        env: extra environment of the trainer container (e.g. ``MLFLOW_TRACKING_URI``).
        labels: metadata labels (e.g. the pipeline version).

    Raises:
        ValueError: a setting that cannot make a valid TrainJob.
    """
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        raise ValueError(f"TrainJob name {name!r}: expected an RFC 1035 label of at most 63 characters")
    if pc.num_nodes < 1 or pc.num_processes < 1:
        raise ValueError(f"TrainJob: num_nodes={pc.num_nodes}, num_processes={pc.num_processes}; both must be >= 1")
    if not claim_name:
        raise ValueError("TrainJob: a shared PersistentVolumeClaim is required (pipeline.pvc_name)")
    trainer: dict[str, Any] = {
        "image": pc.image,
        "command": list(command),
        "numNodes": pc.num_nodes,
        "numProcPerNode": pc.num_processes,
    }
    resources = k8s_resources(pc)
    if resources:
        trainer["resourcesPerNode"] = resources
    if env:
        trainer["env"] = [{"name": k, "value": str(v)} for k, v in sorted(env.items())]
    pod_spec: dict[str, Any] = {
        "volumes": [{"name": VOLUME, "persistentVolumeClaim": {"claimName": claim_name}}],
        "containers": [{"name": NODE_JOB, "volumeMounts": [{"name": VOLUME, "mountPath": pc.pvc_mount_path}]}],
    }
    if pc.train_node_selector:
        pod_spec["nodeSelector"] = dict(pc.train_node_selector)
    if pc.train_tolerations:
        pod_spec["tolerations"] = k8s_tolerations(pc.train_tolerations)
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = dict(labels)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"name": pc.trainjob_runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "trainer": trainer,
            "podTemplateOverrides": [{"targetJobs": [{"name": NODE_JOB}], "spec": pod_spec}],
        },
    }


def trainjob_yaml(manifest: dict[str, Any]) -> str:
    """The manifest as YAML (what ``kubectl apply -f`` takes)."""
    return yaml.safe_dump(manifest, sort_keys=False)


def current_namespace(default: str = "kubeflow") -> str:
    """The namespace of the pod this runs in (service-account file), else ``default``."""
    try:
        return SA_NAMESPACE_FILE.read_text().strip() or default
    except OSError:
        return default


def custom_objects_api() -> Any:
    """A ``CustomObjectsApi`` from the in-cluster config (a pipeline pod), else from ``~/.kube/config``."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def apply_trainjob(manifest: dict[str, Any], api: Any = None) -> dict[str, Any]:
    """Create the TrainJob; if one of that name exists (a retried launcher pod), keep it and return it."""
    api = api or custom_objects_api()
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    try:
        return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    except Exception as err:  # kubernetes.client.ApiException; 409 = created by an earlier attempt
        if getattr(err, "status", None) == 409:
            return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        raise


def trainjob_state(obj: dict[str, Any]) -> str | None:
    """``Complete`` or ``Failed`` once the TrainJob has finished, else ``None``."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond["type"]
    return None


def wait_for_trainjob(
    name: str, namespace: str, api: Any = None, timeout_s: float = 86400, poll_s: float = 30,
    sleep=time.sleep,
) -> dict[str, Any]:  # fmt: skip
    """Poll until the TrainJob completes.

    Raises:
        RuntimeError: it failed (with the condition's reason and message).
        TimeoutError: it did not finish within ``timeout_s``.
    """
    api = api or custom_objects_api()
    waited = 0.0
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        state = trainjob_state(obj)
        if state == "Complete":
            return obj
        if state == "Failed":
            cond = next(c for c in obj["status"]["conditions"] if c.get("type") == "Failed")
            raise RuntimeError(f"TrainJob {namespace}/{name} failed: {cond.get('reason')}: {cond.get('message')}")
        if waited >= timeout_s:
            raise TimeoutError(f"TrainJob {namespace}/{name} not finished after {timeout_s:.0f} s")
        sleep(poll_s)
        waited += poll_s
