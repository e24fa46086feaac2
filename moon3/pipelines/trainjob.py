"""Multi-node training as a Kubeflow Trainer ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``).

The pipeline's ``trainjob`` trainer runs a small launcher pod that writes the config and the dataset to a
shared volume, submits the TrainJob built here, waits for it, and copies the trained model back into the
pipeline's artifacts. The manifest targets the Trainer v2.1 API (``podTemplateOverrides`` on the ``node`` job
of a ``torch-distributed`` ClusterTrainingRuntime); every node runs ``torchrun`` over the training CLI.

Cleanup: the TrainJob carries the ``moon3`` labels (app, pipeline run id, pipeline version), an owner reference
to the launcher pod (Kubernetes deletes it with that pod), and the launcher deletes it itself when the wait fails,
times out or the run is terminated (SIGTERM). Its pods skip the Istio sidecar (a sidecar keeps a finished pod
running) and run as ``pipeline.service_account`` when set (Workload Identity).

No cluster runs here: tests check the manifest and the client calls against a fake API object.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from moon3.pipelines.config import PipelineConfig
from moon3.pipelines.placement import k8s_resources, k8s_tolerations

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
NODE_JOB = "node"  # the replicated job (and container) name of the torch runtimes
VOLUME = "moon3-shared"
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
APP_LABEL = "app.kubernetes.io/name"
RUN_ID_LABEL = "moon3.io/pipeline-run-id"
VERSION_LABEL = "moon3.io/pipeline-version"
# Pod annotations of every TrainJob node: an Istio sidecar never exits, so the node pods would never complete.
POD_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}
# Set by the KFP launcher on every task pod (downward API).
POD_NAME_ENV, POD_UID_ENV = "KFP_POD_NAME", "KFP_POD_UID"


def trainjob_name(run_id: str, prefix: str = "moon3-pretrain") -> str:
    """An RFC 1035 name (lowercase, ``[a-z0-9-]``, <= 63 chars, starts with a letter) for one pipeline run."""
    suffix = re.sub(r"[^a-z0-9-]", "-", run_id.lower()).strip("-")[:20].strip("-")
    name = f"{prefix}-{suffix}" if suffix else prefix
    return name[:63].rstrip("-")


def label_value(value: str) -> str:
    """``value`` as a Kubernetes label value: ``[A-Za-z0-9._-]``, at most 63 characters, alphanumeric at both ends
    (``0.1.0+src.ab12`` -> ``0.1.0-src.ab12``); '' stays ''."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "-", value)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", clean)


def trainjob_labels(run_id: str = "", pipeline_version: str = "") -> dict[str, str]:
    """The labels of a TrainJob and its pods: ``app.kubernetes.io/name: moon3``, the pipeline run id and version
    (each left out when empty), so ``kubectl get trainjobs -l moon3.io/pipeline-run-id=...`` finds a run's."""
    labels = {APP_LABEL: "moon3", RUN_ID_LABEL: label_value(run_id), VERSION_LABEL: label_value(pipeline_version)}
    return {k: v for k, v in labels.items() if v}


def launcher_owner(namespace: str, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """An owner reference to the KFP pod this runs in (``KFP_POD_NAME`` / ``KFP_POD_UID``), so that deleting the
    run's pods deletes the TrainJob too; None outside a KFP pod.

    Kubernetes has no cross-namespace owners (a dependent whose owner is not in its namespace is deleted at once),
    so a TrainJob in another namespace than this pod gets none.
    """
    env = os.environ if env is None else env
    pod, uid = env.get(POD_NAME_ENV), env.get(POD_UID_ENV)
    if not pod or not uid:
        return None
    if current_namespace(default="") != namespace:
        print(f"TrainJob namespace {namespace} is not the launcher pod's: no owner reference (delete it by hand "
              "if the run's pods are deleted while it runs)", flush=True)  # fmt: skip
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid, "controller": False,
            "blockOwnerDeletion": False}  # fmt: skip


def build_trainjob(
    name: str,
    pc: PipelineConfig,
    command: list[str],
    claim_name: str,
    namespace: str,
    env: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The TrainJob manifest (a plain dict, ready for YAML or the Kubernetes client).

    Args:
        name: TrainJob name (see :func:`trainjob_name`).
        pc: the ``pipeline`` config: image (a full reference: the pipeline hands the GPU image over), nodes,
            processes per node, resources, node pool, volume, runtime, service account.
        command: what every node runs (see :func:`moon3.pipelines.launch.torchrun_command`).
        claim_name: the PersistentVolumeClaim shared with the launcher pod (config, data, checkpoints, model).
        namespace: where the TrainJob goes (the runtime must be cluster-scoped or live there).
        env: extra environment of the trainer container (e.g. ``MLFLOW_TRACKING_URI``).
        labels: labels of the TrainJob and its pods, on top of ``app.kubernetes.io/name: moon3`` (see
            :func:`trainjob_labels`).
        owner: an owner reference (see :func:`launcher_owner`).

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
    pod_spec: dict[str, Any] = {}
    if pc.service_account:
        pod_spec["serviceAccountName"] = pc.service_account
    pod_spec |= {
        "volumes": [{"name": VOLUME, "persistentVolumeClaim": {"claimName": claim_name}}],
        "containers": [{"name": NODE_JOB, "volumeMounts": [{"name": VOLUME, "mountPath": pc.pvc_mount_path}]}],
    }
    if pc.train_node_selector:
        pod_spec["nodeSelector"] = dict(pc.train_node_selector)
    if pc.train_tolerations:
        pod_spec["tolerations"] = k8s_tolerations(pc.train_tolerations)
    all_labels = {APP_LABEL: "moon3", **(labels or {})}
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": all_labels}
    if owner:
        metadata["ownerReferences"] = [dict(owner)]
    # Trainer v2.1 PodTemplateOverride: targetJobs, metadata (labels, annotations), spec (a pod spec subset).
    override = {
        "targetJobs": [{"name": NODE_JOB}],
        "metadata": {"labels": dict(all_labels), "annotations": dict(POD_ANNOTATIONS)},
        "spec": pod_spec,
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"name": pc.trainjob_runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "trainer": trainer,
            "podTemplateOverrides": [override],
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


def apply_trainjob(
    manifest: dict[str, Any], api: Any = None, deleting_timeout_s: float = 300, poll_s: float = 5,
    sleep: Callable[[float], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Create the TrainJob; if one of that name exists (a retried launcher pod), keep it and return it.

    A kept TrainJob gets this pod's owner reference added (the earlier attempt's pod may be deleted first); one
    that is being deleted (an earlier attempt cleaned up after a failure) is waited for, then created anew.

    Raises:
        TimeoutError: the old TrainJob was still being deleted after ``deleting_timeout_s``.
    """
    api, sleep = api or custom_objects_api(), sleep or time.sleep
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    waited = 0.0
    while True:
        try:
            return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        except Exception as err:  # kubernetes.client.ApiException; 409 = created by an earlier attempt
            if getattr(err, "status", None) != 409:
                raise
        try:
            existing = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as err:
            if getattr(err, "status", None) != 404:  # 404: deleted between the two calls, create again
                raise
            existing = {"metadata": {"deletionTimestamp": "gone"}}
        if not (existing.get("metadata") or {}).get("deletionTimestamp"):
            return _add_owners(api, existing, manifest["metadata"].get("ownerReferences") or [])
        if waited >= deleting_timeout_s:
            raise TimeoutError(f"TrainJob {namespace}/{name} still being deleted after {deleting_timeout_s:.0f} s")
        sleep(poll_s)
        waited += poll_s


def _add_owners(api: Any, obj: dict[str, Any], owners: list[dict[str, Any]]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    current = list(meta.get("ownerReferences") or [])
    missing = [o for o in owners if o["uid"] not in {c.get("uid") for c in current}]
    if not missing:
        return obj
    patch = {"metadata": {"ownerReferences": current + missing}}  # merge patch: the list is replaced whole
    return api.patch_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch)


def delete_trainjob(name: str, namespace: str, api: Any = None) -> bool:
    """Delete the TrainJob and (in the background) its JobSet and pods; False when it was already gone."""
    api = api or custom_objects_api()
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background")
    except Exception as err:  # kubernetes.client.ApiException
        if getattr(err, "status", None) == 404:
            return False
        raise
    return True


def trainjob_state(obj: dict[str, Any]) -> str | None:
    """``Complete`` or ``Failed`` once the TrainJob has finished, else ``None``."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond["type"]
    return None


def wait_for_trainjob(
    name: str, namespace: str, api: Any = None, timeout_s: float = 86400, poll_s: float = 30,
    sleep: Callable[[float], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Poll until the TrainJob completes.

    Raises:
        RuntimeError: it failed (with the condition's reason and message).
        TimeoutError: it did not finish within ``timeout_s``.
    """
    api, sleep = api or custom_objects_api(), sleep or time.sleep
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


class Terminated(SystemExit):
    """The launcher received SIGTERM (the run was terminated, the pod evicted or deleted); exit status 143."""


@contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` inside the block (it interrupts a poll's sleep), so ``finally``
    clauses run; a second SIGTERM is ignored while they do. Outside the main thread (where Python cannot install
    a handler) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
