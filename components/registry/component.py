"""KFP components ``register`` and ``gate``: the MLflow Model Registry steps after ``evaluate``.

``register`` registers the evaluated model as ``challenger``; ``gate`` gates it against ``champion`` and, on pass,
promotes it and renders its InferenceService (canary first). A failed gate is an outcome (``passed`` false) the
pipeline branches on with ``dsl.If``, not a failed task. The MLflow server is ``promotion.tracking_uri``, else the
pod's ``MLFLOW_TRACKING_URI``.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Model, Output

from moon3.pipelines.params import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def register(
    params: str,
    overrides: list,
    model: Input[Model],
    eval_details: Input[Artifact],
    pipeline_run_id: str = "",
    data_version: str = "",
) -> NamedTuple("Outputs", [("version", str), ("run_id", str)]):
    """Register ``model`` with its evaluation metrics and contract in the MLflow registry; alias it ``challenger``.

    Args:
        params: stage sections of ``params.yaml`` (the pipeline's ``params``); the ``promotion`` section is used.
        overrides: ``section.key=value`` strings applied on top.
        model: the evaluated model folder.
        eval_details: the evaluate step's ``details`` folder (holds ``metrics.json``).
        pipeline_run_id: the pipeline run (lineage tag).
        data_version: the validated dataset's content fingerprint (lineage tag).

    Returns:
        ``version`` (the new registry version) and ``run_id`` (its MLflow run).
    """
    from collections import namedtuple

    from moon3.registry.step import register_step

    out = register_step(params, overrides, model.path, eval_details.path, pipeline_run_id, data_version)
    print(out["summary"])
    return namedtuple("Outputs", ["version", "run_id"])(out["version"], out["run_id"])


@dsl.component(base_image=default_image(), install_kfp_package=False)
def gate(
    params: str,
    overrides: list,
    version: str,
    table: Output[Markdown],
    rendered: Output[Artifact],
) -> NamedTuple("Outputs", [("passed", bool), ("summary", str)]):
    """Gate ``version`` against ``champion``; on pass move ``champion`` and render its InferenceService.

    Args:
        params: stage sections of ``params.yaml``; the ``promotion`` and ``serve`` sections are used.
        overrides: ``section.key=value`` strings applied on top.
        version: the registry version to gate ('' = the ``challenger`` alias).
        table: the gate table (metric, champion, challenger, limit, verdict).
        rendered: on promotion, the new champion's ``manifests.yaml`` and ``promotion.json``.

    Returns:
        ``passed`` (false: the gate failed, champion unchanged) and ``summary`` (one line).
    """
    from collections import namedtuple
    from pathlib import Path

    from moon3.registry.step import gate_step

    out = gate_step(params, overrides, version, out_dir=rendered.path)
    Path(table.path).write_text(out["table"] + "\n")
    print(out["summary"])
    return namedtuple("Outputs", ["passed", "summary"])(out["passed"], out["summary"])


@dsl.component(base_image=default_image(), install_kfp_package=False)
def promotion_report(summary: str):
    """Print the promotion gate's one-line verdict and end well: a model that is not promoted is an outcome, not an
    error (``champion`` and the serving revision are unchanged); the table is the gate step's ``table``."""
    print(summary)
