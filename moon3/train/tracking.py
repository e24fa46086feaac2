"""Experiment tracking for training stages: MLflow (params, metrics, model) and dvclive (``dvc plots``).

Only rank 0 tracks. MLflow uses ``MLFLOW_TRACKING_URI`` when set, else a local ``sqlite:///mlruns.db``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
        experiment: MLflow experiment name.
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
        self.run_id: str | None = None
        if not enabled:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
        from dvclive import Live

        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else run_name)
        self.run_id = run.info.run_id
        if not resume_run_id:
            mlflow.log_params({k: str(v)[:500] for k, v in _flatten(params).items()})
        self._mlflow = mlflow
        self._live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=None, resume=bool(resume_run_id))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One row of metrics at ``step`` to MLflow and dvclive."""
        if not self.enabled:
            return
        self._mlflow.log_metrics(metrics, step=step)
        self._live.step = step
        for name, value in metrics.items():
            self._live.log_metric(name, value)
        self._live.next_step()

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Final numbers (no step)."""
        if self.enabled:
            self._mlflow.log_metrics(metrics)

    def log_model_dir(self, path: str | Path, artifact_path: str = "model") -> None:
        """Attach a saved model folder to the run."""
        if self.enabled:
            self._mlflow.log_artifacts(str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run and flush dvclive."""
        if self.enabled:
            self._live.end()
            self._mlflow.end_run(status=status)
