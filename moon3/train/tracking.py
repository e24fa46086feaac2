"""Experiment tracking for training stages: MLflow (params, metrics, model) and dvclive (``dvc plots``).

Only rank 0 tracks. MLflow uses ``MLFLOW_TRACKING_URI`` when set, else a local ``sqlite:///mlruns.db``. An empty
experiment name (``--set train.mlflow_experiment=``) means "MLflow off", as it does for ``eval.mlflow_experiment``:
no MLflow run is started and dvclive still writes its metrics and plots.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moon3.common.redact import redact_text

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


class Tracker:
    """MLflow run + dvclive folder for one training run; every method is a no-op when ``enabled`` is False.

    Args:
        enabled: False on ranks other than 0.
        experiment: MLflow experiment name; empty (or blank) = MLflow off, dvclive only.
        run_name: MLflow run name.
        live_dir: dvclive output folder (metrics and plots for ``dvc plots``).
        params: nested config dict, logged flattened.
        resume_run_id: continue this MLflow run (after ``--resume``) instead of starting a new one.
    """

    def __init__(
        self,
        enabled: bool,
        experiment: str,
        run_name: str,
        live_dir: str | Path,
        params: dict[str, Any],
        resume_run_id: str | None = None,
    ):
        self.enabled = enabled
        self.mlflow_on = enabled and bool((experiment or "").strip())
        self.run_id: str | None = None
        if not enabled:
            return
        from dvclive import Live

        if self.mlflow_on:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            import mlflow

            mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
            mlflow.set_experiment(experiment)
            try:
                run = mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else run_name)
            except mlflow.exceptions.MlflowException as err:
                if not resume_run_id:
                    raise
                # The checkpoint's run is not in this tracking store (another machine, a fresh database).
                print(f"warning: MLflow run {resume_run_id} not found ({str(err)[:120]}); logging to a new run")
                resume_run_id = None
                run = mlflow.start_run(run_name=run_name)
            self.run_id = run.info.run_id
            if not resume_run_id:
                mlflow.log_params({k: redact_text(str(v))[:500] for k, v in _flatten(params).items()})
            self._mlflow = mlflow
        self._live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=None, resume=bool(resume_run_id))

    def log_metrics(self, metrics: dict[str, float], step: int, live: bool = True) -> None:
        """One row of metrics at ``step`` to MLflow and (``live``) dvclive. Wall-clock numbers go to MLflow only
        (``live=False``): dvclive's files are DVC outputs, which a repeated run must reproduce exactly."""
        if not self.enabled:
            return
        if self.mlflow_on:
            self._mlflow.log_metrics(metrics, step=step)
        if not live:
            return
        self._live.step = step
        for name, value in metrics.items():
            self._live.log_metric(name, value)
        self._live.next_step()

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Final numbers (no step); MLflow only."""
        if self.mlflow_on:
            self._mlflow.log_metrics(metrics)

    def set_tag(self, key: str, value: str) -> None:
        """A tag on the MLflow run (redacted, at most 5000 characters)."""
        if self.mlflow_on:
            self._mlflow.set_tag(key, redact_text(value)[:5000])

    def log_model_dir(self, path: str | Path, artifact_path: str = "model") -> None:
        """Attach a saved model folder to the MLflow run."""
        if self.mlflow_on:
            self._mlflow.log_artifacts(str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run and flush dvclive."""
        if self.enabled:
            self._live.end()
        if self.mlflow_on:
            self._mlflow.end_run(status=status)
