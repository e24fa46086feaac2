"""Upload compiled pipelines to a KFP API server and start runs (``moon3 pipeline upload`` / ``run``).

Each function takes the ``kfp.Client`` as an argument, so tests pass a fake one (no KFP API server can run
here) and users get one from :func:`make_client`.

Runs send only the parameters the pipeline declares (``root.inputDefinitions.parameters`` of the compiled
package or of the uploaded version), each in the type it declares: the KFP API server rejects a run with an
undeclared parameter.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TOKEN_ENV = "KFP_TOKEN"


@dataclass
class UploadResult:
    """What an upload created."""

    pipeline_id: str
    version_id: str | None
    version_name: str
    first_upload: bool


@dataclass
class RunResult:
    """The run that was started."""

    run_id: str
    pipeline_id: str | None = None
    version_id: str | None = None


def make_client(host: str, namespace: str | None = None, token_env: str | None = None, in_cluster: bool = False) -> Any:
    """A ``kfp.Client`` for ``host``; the credentials never come from this repo nor from a command line.

    Args:
        host: the KFP API server URL.
        namespace: Kubeflow profile namespace (multi-user clusters); None keeps kfp's default.
        token_env: read a bearer token (CI, a ``gcloud auth print-identity-token``) from this environment
            variable; it must be set. None: ``$KFP_TOKEN`` when set.
        in_cluster: authenticate with the pod's projected service-account token for the audience
            ``pipelines.kubeflow.org`` (``kfp.client.ServiceAccountTokenVolumeCredentials``: the file
            ``$KF_PIPELINES_SA_TOKEN_PATH`` or ``/var/run/secrets/kubeflow/pipelines/token``, which Kubeflow's
            ``access-ml-pipeline`` PodDefault mounts): for a client that runs in a cluster pod.

    Without a token or ``in_cluster``, kfp's own mechanisms apply (IAP client id, cookies, kube context).

    Raises:
        ValueError: ``token_env`` names an unset variable, or both a token and ``in_cluster``.
    """
    import kfp

    kwargs: dict[str, Any] = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    token = os.environ.get(token_env or DEFAULT_TOKEN_ENV, "").strip()
    if token_env and not token:
        raise ValueError(f"--token-env {token_env}: that environment variable is not set (or empty)")
    if in_cluster:
        if token_env:
            raise ValueError("give either --token-env or --in-cluster, not both")
        from kfp.client import ServiceAccountTokenVolumeCredentials

        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path=None)
    elif token:
        kwargs["existing_token"] = token  # never printed nor logged
    return kfp.Client(**kwargs)


def _accepted(method: Any, **kwargs: Any) -> dict[str, Any]:
    """The ``kwargs`` that ``method`` takes (kfp versions differ in which calls take ``namespace``)."""
    params = inspect.signature(method).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def pipeline_id(client: Any, name: str, namespace: str | None = None) -> str | None:
    """The id of the pipeline called ``name`` in ``namespace`` (None: the shared pipelines), or None.

    ``kfp.Client.get_pipeline_id`` lists the shared pipelines only, so it misses a namespaced one.

    Raises:
        ValueError: more than one pipeline of that name.
    """
    name_filter = json.dumps({"predicates": [{"operation": 1, "key": "display_name", "stringValue": name}]})
    resp = client.list_pipelines(filter=name_filter, namespace=namespace, page_size=2)  # 1 = EQUALS
    found = getattr(resp, "pipelines", None) or []
    if len(found) > 1:
        raise ValueError(f"more than one pipeline named {name!r}: give the pipelines unique names")
    return found[0].pipeline_id if found else None


def _latest_version_id(client: Any, pid: str) -> str | None:
    resp = client.list_pipeline_versions(pid, page_size=1, sort_by="created_at desc")
    versions = getattr(resp, "pipeline_versions", None) or []
    return versions[0].pipeline_version_id if versions else None


def upload(
    client: Any,
    package: str | Path,
    pipeline_name: str,
    version_name: str,
    description: str | None = None,
    namespace: str | None = None,
) -> UploadResult:
    """Upload ``package`` as a new version of ``pipeline_name``, creating the pipeline on its first upload.

    Args:
        client: a ``kfp.Client`` (or anything with the same methods).
        package: the compiled YAML.
        pipeline_name: the pipeline's name in the UI.
        version_name: the new version's name (e.g. ``0.1.0+src.1a2b3c4d5e6f.p.0a1b2c3d``).
        description: shown in the UI.
        namespace: upload a pipeline private to this namespace (multi-user clusters); None: a shared one.

    Raises:
        FileNotFoundError: no such package.
        ValueError: a version of that name exists already (compile from a new commit or choose a name).
    """
    package = Path(package)
    if not package.is_file():
        raise FileNotFoundError(f"{package}: compile first (moon3 pipeline compile)")
    pid = pipeline_id(client, pipeline_name, namespace)
    if pid is None:
        # The first upload creates the pipeline and its first version in one call; the API server names that
        # version after the pipeline, so look its id up afterwards.
        pipeline = client.upload_pipeline(str(package), pipeline_name=pipeline_name, description=description,
                                          namespace=namespace)  # fmt: skip
        pid = pipeline.pipeline_id
        return UploadResult(pid, _latest_version_id(client, pid), pipeline_name, first_upload=True)
    try:
        # A version lives in its pipeline's namespace; kfp 2.17's call takes no namespace, a later one may.
        version = client.upload_pipeline_version(
            str(package), pipeline_version_name=version_name, pipeline_id=pid, description=description,
            **_accepted(client.upload_pipeline_version, namespace=namespace),
        )  # fmt: skip
    except Exception as err:  # kfp_server_api ApiException
        if getattr(err, "status", None) == 409 or "already exist" in str(err).lower():
            raise ValueError(
                f"pipeline {pipeline_name!r} already has a version {version_name!r}: change the code or the "
                "settings (the version carries their hashes) or pass --version-name"
            ) from err
        raise
    return UploadResult(pid, version.pipeline_version_id, version_name, first_upload=False)


# --- run arguments -------------------------------------------------------------------------------------------


def package_spec(package: str | Path) -> dict[str, Any]:
    """The pipeline spec (first YAML document, the one with ``root``) of a compiled package.

    Raises:
        FileNotFoundError: no such package.
        ValueError: no pipeline spec in it.
    """
    package = Path(package)
    if not package.is_file():
        raise FileNotFoundError(f"{package}: no such compiled pipeline")
    for doc in yaml.safe_load_all(package.read_text()):
        if isinstance(doc, dict) and "root" in doc:
            return doc
    raise ValueError(f"{package}: not a compiled KFP pipeline (no 'root')")


def version_spec(client: Any, pid: str, version_id: str) -> dict[str, Any]:
    """The pipeline spec of an uploaded version (the API server nests it under ``pipeline_spec`` when the package
    also has a platform spec)."""
    spec = client.get_pipeline_version(pid, version_id).pipeline_spec or {}
    if "root" not in spec and isinstance(spec.get("pipeline_spec"), dict):
        spec = spec["pipeline_spec"]
    return spec


def declared_parameters(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``root.inputDefinitions.parameters`` of a pipeline spec: name -> ``parameterType``, ``isOptional``,
    ``defaultValue``."""
    return dict(((spec.get("root") or {}).get("inputDefinitions") or {}).get("parameters") or {})


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | dict | tuple) and len(value) == 0)


def _as_type(name: str, value: Any, parameter_type: str) -> Any:
    if parameter_type == "STRUCT":
        value = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise ValueError(f"pipeline parameter {name!r} is a struct: got {type(value).__name__}")
        return value
    if parameter_type == "STRING" and isinstance(value, dict | list):
        return yaml.safe_dump(value, sort_keys=False)
    if parameter_type == "LIST" and isinstance(value, tuple):
        return list(value)
    return value


def pipeline_arguments(
    spec: Mapping[str, Any], arguments: Mapping[str, Any], flags: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The run arguments the pipeline of ``spec`` accepts: only declared parameters, empty optional ones dropped
    (they keep their compiled defaults), each in its declared type (``STRUCT``: a dict; ``STRING``: a dict or
    list as YAML text).

    Args:
        spec: the pipeline spec (:func:`package_spec`, :func:`version_spec`).
        arguments: what the caller has (empty values: not given).
        flags: how the caller names each argument in messages (``{"dataset_uri": "--dataset-uri"}``).

    Raises:
        ValueError: a given argument the pipeline does not declare, or a required one missing (both named).
    """
    declared = declared_parameters(spec)
    flags = flags or {}

    def called(name: str) -> str:
        return f"{name!r} ({flags[name]})" if name in flags else repr(name)

    out: dict[str, Any] = {}
    for name, value in arguments.items():
        if _empty(value):
            continue
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise ValueError(f"this pipeline has no parameter {called(name)} (it takes: {known})")
        out[name] = _as_type(name, value, declared[name].get("parameterType", ""))
    missing = [n for n, p in declared.items() if n not in out and not p.get("isOptional") and "defaultValue" not in p]
    if missing:
        raise ValueError(f"this pipeline requires {', '.join(called(n) for n in sorted(missing))}")
    return out


def run(
    client: Any,
    arguments: dict[str, Any],
    experiment: str = "moon3",
    run_name: str | None = None,
    pipeline_name: str | None = None,
    package: str | Path | None = None,
    enable_caching: bool | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    flags: Mapping[str, str] | None = None,
) -> RunResult:
    """Start a run: of a local compiled ``package``, or of the latest uploaded version of ``pipeline_name``.

    Args:
        client: a ``kfp.Client``.
        arguments: candidate pipeline arguments (``params``, ``overrides``, ``dataset_uri``); only those the
            pipeline declares are sent (see :func:`pipeline_arguments`).
        experiment: experiment name (created in ``namespace`` if missing).
        run_name: default ``<pipeline name or package stem>``.
        pipeline_name: run an uploaded pipeline (ignored when ``package`` is given).
        package: run this compiled YAML directly.
        enable_caching: None keeps each task's compiled caching option.
        namespace: Kubeflow profile namespace of the pipeline and the experiment (multi-user clusters).
        service_account: Kubernetes service account of the run's pods ('' or None: the namespace's default).
        flags: names of the arguments in error messages (e.g. ``{"dataset_uri": "--dataset-uri"}``).

    Raises:
        FileNotFoundError: no such package.
        ValueError: neither ``package`` nor ``pipeline_name``, no such uploaded pipeline/version, or arguments
            that do not match the pipeline's parameters.
    """
    service_account = service_account or None
    if package is not None:
        sent = pipeline_arguments(package_spec(package), arguments, flags)
        result = client.create_run_from_pipeline_package(
            str(package), arguments=sent, run_name=run_name or Path(package).stem, experiment_name=experiment,
            namespace=namespace, enable_caching=enable_caching, service_account=service_account,
        )  # fmt: skip
        return RunResult(result.run_id)
    if not pipeline_name:
        raise ValueError("run: give a compiled package or the name of an uploaded pipeline")
    pid = pipeline_id(client, pipeline_name, namespace)
    if pid is None:
        where = f" in namespace {namespace}" if namespace else ""
        raise ValueError(f"no pipeline named {pipeline_name!r}{where} on this server: moon3 pipeline upload first")
    version_id = _latest_version_id(client, pid)
    if version_id is None:
        raise ValueError(f"pipeline {pipeline_name!r} has no version")
    sent = pipeline_arguments(version_spec(client, pid, version_id), arguments, flags)
    exp = client.create_experiment(experiment, namespace=namespace)  # returns the existing experiment of that name
    started = client.run_pipeline(
        experiment_id=exp.experiment_id, job_name=run_name or pipeline_name, params=sent, pipeline_id=pid,
        version_id=version_id, enable_caching=enable_caching, service_account=service_account,
    )  # fmt: skip
    return RunResult(started.run_id, pid, version_id)
