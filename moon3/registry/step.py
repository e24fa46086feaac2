"""The ``register`` and ``gate`` KFP steps (``components/registry/component.py`` calls them).

``register_step`` registers the evaluated model (as ``moon3 register``, with the pipeline run id and the validated
dataset's fingerprint as lineage). ``gate_step`` gates a version against ``champion`` and, on pass, promotes and
renders it (as ``moon3 promote``). A failed gate is a normal outcome the pipeline branches on (``dsl.If`` on
``passed``), so it returns ``passed=False``; a contract mismatch, a conflicting promotion or a registry error raises
and fails the task. The MLflow server is ``promotion.tracking_uri``, else the pod's ``MLFLOW_TRACKING_URI``.
``params`` is the pipeline's: YAML/JSON text or a KFP struct (numbers as floats), read by
:func:`moon3.pipelines.params.config_from_params`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"


def register_step(
    params: dict[str, Any] | str,
    overrides: list[str] | None,
    model_dir: str,
    metrics_file: str,
    pipeline_run_id: str = "",
    data_version: str = "",
    client: Any = None,
) -> dict[str, str]:
    """Register ``model_dir`` with its evaluation metrics; alias the new version ``challenger``.

    Args:
        params: the pipeline's ``params`` (YAML/JSON text or a struct).
        overrides: ``section.key=value`` strings.
        model_dir: the model folder (``save_pretrained`` layout).
        metrics_file: the evaluation's ``metrics.json``, or the folder holding it (the evaluate step's ``details``).
        pipeline_run_id: the pipeline run (lineage tag).
        data_version: the validated dataset's content fingerprint ('' = from ``dvc.lock``).
        client: an ``MlflowClient`` (default: one for ``promotion.tracking_uri``).

    Returns:
        ``version``, ``run_id``, ``model`` (registered name) and ``summary`` (one line).

    Raises:
        ContractError: no valid contract in ``model_dir``.
        FileNotFoundError: no metrics file.
    """
    from moon3.pipelines.params import config_from_params
    from moon3.registry.register import client_for, register_model

    cfg = config_from_params(params, list(overrides or []))
    metrics = Path(metrics_file)
    if metrics.is_dir():
        metrics = metrics / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(f"no evaluation metrics at {metrics}")
    client = client or client_for(cfg.promotion.tracking_uri)
    mv = register_model(
        model_dir, metrics, cfg, pipeline_run_id=pipeline_run_id, client=client, data_version=data_version
    )
    name = cfg.promotion.model_name
    summary = f"registered {name} v{mv.version} (run {mv.run_id}) as challenger"
    return {"version": str(mv.version), "run_id": mv.run_id, "model": name, "summary": summary}


def gate_step(
    params: dict[str, Any] | str,
    overrides: list[str] | None,
    version: str = "",
    out_dir: str = "",
    client: Any = None,
) -> dict[str, Any]:
    """Gate ``version`` against ``champion``; on pass promote it and render its InferenceService (canary first).

    Args:
        params: the pipeline's ``params`` (YAML/JSON text or a struct).
        overrides: ``section.key=value`` strings.
        version: the version to gate ('' = the ``challenger`` alias).
        out_dir: where the new champion's ``manifests.yaml`` / ``promotion.json`` go ('' = ``promotion.render_dir``).
        client: an ``MlflowClient`` (default: one for ``promotion.tracking_uri``).

    Returns:
        ``passed`` (bool), ``promoted`` (bool: ``champion`` moved), ``version``, ``previous`` (the champion gated
        against, '' if none), ``table`` (markdown), ``summary`` (one line) and ``rendered`` (promotion.json's
        content, or None).

    Raises:
        ContractError: the version's contract does not match the serving configuration.
        PromotionError: no challenger, or another promotion holds the lock or moved ``champion`` (nothing changed).
        MlflowException: a registry error.
    """
    from moon3.pipelines.params import config_from_params
    from moon3.registry.promote import FAIL, GateFailed, format_table, promote
    from moon3.registry.register import client_for
    from moon3.registry.render import render_promotion

    cfg = config_from_params(params, list(overrides or []))
    client = client or client_for(cfg.promotion.tracking_uri)
    try:
        result = promote(cfg, client, version or None)
    except GateFailed as err:
        failed = ", ".join(r.metric for r in err.rows if r.verdict == FAIL)
        against = f"champion v{err.champion}" if err.champion else "the minimums (no champion yet)"
        summary = f"v{err.version} failed the gate against {against}: {failed}; champion unchanged"
        return {"passed": False, "promoted": False, "version": err.version, "previous": err.champion or "",
                "table": format_table(err.rows), "summary": summary, "rendered": None}  # fmt: skip
    if not result.promoted:
        summary = f"v{result.version} is already champion; nothing moved"
        return {"passed": True, "promoted": False, "version": result.version, "previous": result.previous or "",
                "table": summary, "summary": summary, "rendered": None}  # fmt: skip
    rendered = render_promotion(cfg, client, result.version, result.previous, out_dir or None)
    canary = rendered["canary_traffic_percent"]
    summary = (
        f"promoted v{result.version} to champion (previous: {('v' + result.previous) if result.previous else 'none'});"
        f" rendered {rendered['isvc']} at {canary}% to {rendered['manifests']}"
    )
    return {"passed": True, "promoted": True, "version": result.version, "previous": result.previous or "",
            "table": format_table(result.rows), "summary": summary, "rendered": rendered}  # fmt: skip
