"""Upload compiled pipelines to a KFP API server and start runs (``moon3 pipeline upload`` / ``run``).

Each function takes the ``kfp.Client`` as an argument, so tests pass a fake one (no KFP API server can run
here) and users get one from :func:`make_client`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


def make_client(host: str, namespace: str | None = None) -> Any:
    """A ``kfp.Client`` for ``host`` (credentials come from kfp's own mechanisms, never from this repo)."""
    import kfp

    return kfp.Client(host=host, namespace=namespace) if namespace else kfp.Client(host=host)


def _latest_version_id(client: Any, pipeline_id: str) -> str | None:
    resp = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
    versions = getattr(resp, "pipeline_versions", None) or []
    return versions[0].pipeline_version_id if versions else None


def upload(
    client: Any, package: str | Path, pipeline_name: str, version_name: str, description: str | None = None
) -> UploadResult:
    """Upload ``package`` as a new version of ``pipeline_name``, creating the pipeline on its first upload.

    Args:
        client: a ``kfp.Client`` (or anything with the same methods).
        package: the compiled YAML.
        pipeline_name: the pipeline's name in the UI.
        version_name: the new version's name (e.g. ``moon3-training 0.1.0+g1a2b3c4``).
        description: shown in the UI.

    Raises:
        FileNotFoundError: no such package.
        ValueError: a version of that name exists already (compile from a new commit or choose a name).
    """
    package = Path(package)
    if not package.is_file():
        raise FileNotFoundError(f"{package}: compile first (moon3 pipeline compile)")
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        # The first upload creates the pipeline and its first version in one call; the API server names that
        # version after the pipeline, so look its id up afterwards.
        pipeline = client.upload_pipeline(str(package), pipeline_name=pipeline_name, description=description)
        pid = pipeline.pipeline_id
        return UploadResult(pid, _latest_version_id(client, pid), pipeline_name, first_upload=True)
    try:
        version = client.upload_pipeline_version(
            str(package), pipeline_version_name=version_name, pipeline_id=pipeline_id, description=description
        )
    except Exception as err:  # kfp_server_api ApiException
        if getattr(err, "status", None) == 409 or "already exist" in str(err).lower():
            raise ValueError(
                f"pipeline {pipeline_name!r} already has a version {version_name!r}: commit your change (the "
                "version carries the git sha) or pass --version-name"
            ) from err
        raise
    return UploadResult(pipeline_id, version.pipeline_version_id, version_name, first_upload=False)


def run(
    client: Any,
    arguments: dict[str, Any],
    experiment: str = "moon3",
    run_name: str | None = None,
    pipeline_name: str | None = None,
    package: str | Path | None = None,
    enable_caching: bool | None = None,
) -> RunResult:
    """Start a run: of a local compiled ``package``, or of the latest uploaded version of ``pipeline_name``.

    Args:
        client: a ``kfp.Client``.
        arguments: pipeline arguments (``params``, ``overrides``, ``dataset_uri``); missing ones keep their
            compiled defaults.
        experiment: experiment name (created if missing).
        run_name: default ``<pipeline name or package stem> <version or file>``.
        pipeline_name: run an uploaded pipeline (ignored when ``package`` is given).
        package: run this compiled YAML directly.
        enable_caching: None keeps each task's compiled caching option.

    Raises:
        ValueError: neither ``package`` nor ``pipeline_name``, or no such uploaded pipeline/version.
    """
    if package is not None:
        result = client.create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=run_name or Path(package).stem,
            experiment_name=experiment, enable_caching=enable_caching,
        )  # fmt: skip
        return RunResult(result.run_id)
    if not pipeline_name:
        raise ValueError("run: give a compiled package or the name of an uploaded pipeline")
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        raise ValueError(f"no pipeline named {pipeline_name!r} on this server: moon3 pipeline upload first")
    version_id = _latest_version_id(client, pipeline_id)
    if version_id is None:
        raise ValueError(f"pipeline {pipeline_name!r} has no version")
    exp = client.create_experiment(experiment)  # returns the existing experiment of that name
    started = client.run_pipeline(
        experiment_id=exp.experiment_id, job_name=run_name or pipeline_name, params=arguments,
        pipeline_id=pipeline_id, version_id=version_id, enable_caching=enable_caching,
    )  # fmt: skip
    return RunResult(started.run_id, pipeline_id, version_id)
