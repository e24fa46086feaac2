"""Register an evaluated model folder in the MLflow Model Registry and alias it ``challenger``.

One registration = one MLflow run (experiment ``promotion.experiment``) holding the model folder (artifact
``model/``), its contract (``contract/moon3_config.json``) and the evaluation metrics (``eval/metrics.json``, also
logged as run metrics), plus a model version whose source is that ``model/`` folder. Lineage tags, on both the run
and the version: ``data_version`` (given by the caller, e.g. the pipeline's fingerprint of the validated dataset,
else the ``data/validated`` md5 in ``dvc.lock``), ``git_sha``, ``params_hash`` and
``pipeline_run_id``. Walk it from either end: version -> run -> data hash, or search versions by tag.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml

from moon3.common.provenance import git_sha, params_hash
from moon3.model.contract import CONTRACT_FILE, load_contract

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT, METRICS_ARTIFACT, CONTRACT_ARTIFACT = "model", "eval/metrics.json", "contract/" + CONTRACT_FILE


def client_for(tracking_uri: str = "") -> Any:
    """An ``MlflowClient`` for ``tracking_uri`` (registry at the same URI); '' = MLflow's environment default."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or None, registry_uri=tracking_uri or None)


def data_version(lock_file: str | Path = "dvc.lock", path: str = "data/validated") -> str:
    """The md5 DVC recorded for ``path`` (a stage output) in ``lock_file``; '' when absent."""
    try:
        lock = yaml.safe_load(Path(lock_file).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == path:
                return str(out.get("md5", ""))
    return ""


_lock_data_version = data_version  # register_model's argument of the same name shadows it


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of a nested metrics dict as ``a/b/c`` keys (``deltas`` and booleans left out)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if not prefix and key == "deltas":
                continue
            out.update(flat_metrics(value, name + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def ensure_registered_model(client: Any, name: str) -> None:
    """Create registered model ``name`` unless it exists (a concurrent creation is fine)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise


def register_model(
    model_dir: str | Path,
    metrics_file: str | Path,
    cfg: Any,
    pipeline_run_id: str = "",
    client: Any = None,
    lock_file: str | Path = "dvc.lock",
    data_version: str = "",
) -> Any:
    """Register ``model_dir`` with its contract and evaluation metrics; alias the new version ``challenger``.

    Args:
        model_dir: a folder written by ``Moon3Embedder.save_pretrained``.
        metrics_file: the evaluation's ``metrics.json`` for that model.
        cfg: the full :class:`~moon3.config.Moon3Config` (its ``promotion`` section, and its hash as a tag).
        pipeline_run_id: id of the pipeline run that produced the model ('' outside a pipeline).
        client: an ``MlflowClient`` (default: one for ``promotion.tracking_uri``).
        lock_file: ``dvc.lock`` whose ``data/validated`` md5 is the data version when none is given.
        data_version: the data version tag ('' = from ``lock_file``): a pipeline has no ``dvc.lock`` and passes
            the validated dataset's content fingerprint.

    Returns:
        The new ``ModelVersion``.

    Raises:
        ContractError: ``model_dir`` has no valid contract for this code.
        FileNotFoundError: no metrics file.
    """
    from mlflow.entities import Metric

    pcfg = cfg.promotion
    client = client or client_for(pcfg.tracking_uri)
    contract, _ = load_contract(model_dir)
    metrics_path = Path(metrics_file)
    metrics = json.loads(metrics_path.read_text())
    tags = {
        "data_version": data_version or _lock_data_version(lock_file),
        "git_sha": git_sha() or "",
        "params_hash": params_hash(cfg.to_dict()),
        "pipeline_run_id": pipeline_run_id,
        "contract_version": contract.version,
        "embed_dim": str(contract.embed_dim),
    }
    experiment = client.get_experiment_by_name(pcfg.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(pcfg.experiment)
    run = client.create_run(experiment_id, tags={**tags, "mlflow.runName": f"register-{pcfg.model_name}"})
    run_id = run.info.run_id
    try:
        client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / Path(METRICS_ARTIFACT).name).write_text(json.dumps(metrics, indent=2) + "\n")
            client.log_artifact(
                run_id, str(Path(tmp) / Path(METRICS_ARTIFACT).name), str(Path(METRICS_ARTIFACT).parent)
            )
            (Path(tmp) / CONTRACT_FILE).write_text(json.dumps({"contract": contract.to_dict()}, indent=2) + "\n")
            client.log_artifact(run_id, str(Path(tmp) / CONTRACT_FILE), str(Path(CONTRACT_ARTIFACT).parent))
        flat = flat_metrics(metrics)
        items = [Metric(k, v, 0, 0) for k, v in flat.items()]
        for start in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[start : start + 1000])
        client.set_terminated(run_id)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    ensure_registered_model(client, pcfg.model_name)
    version = client.create_model_version(
        pcfg.model_name, source=f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id, tags=tags
    )
    client.set_registered_model_alias(pcfg.model_name, CHALLENGER, version.version)
    return version
