"""KFP components of the data validation gate: ``validate`` and ``gate_failed`` (fails the run on purpose)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from moon3.pipelines.params import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def validate(
    params: str,
    overrides: list,
    dataset: Input[Dataset],
    validated: Output[Dataset],
    quarantine: Output[Dataset],
    report: Output[HTML],
    details: Output[Artifact],
    metrics: Output[Metrics],
    source_fingerprint: str = "",
) -> NamedTuple("ValidateOutputs", [("passed", bool), ("summary", str)]):
    """Run the validation gate (``moon3 validate``); it never raises on bad data, it says ``passed``.

    Args:
        params: stage sections of ``params.yaml`` (the pipeline's ``params``).
        overrides: ``section.key=value`` strings applied on top.
        dataset: the dataset to check.
        validated: accepted rows (written only when the gate passes); images by ``gs://`` URI into ``dataset``,
            else carried in this artifact.
        quarantine: rejected rows with their reasons.
        report: the HTML report (KFP UI visualization).
        details: ``gx_results.json`` (Great Expectations), ``validation_metrics.json`` and the report.
        metrics: row counts, reject fractions, timings.
        source_fingerprint: the ``fingerprint`` step's output (keys the cache on the input's content; recorded as
            the validated dataset's ``data_version``).

    Returns:
        ``passed`` (the pipeline's gate condition) and ``summary`` (the blocking failures, one per line).
    """
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from moon3.pipelines.steps import validate_step

    out = validate_step(params, overrides, dataset.path, dataset.uri, validated.path, quarantine.path, details.path)
    shutil.copyfile(out["html"], report.path)
    for name, value in out["metrics"].items():
        metrics.log_metric(name, value)
    Path(validated.path).mkdir(parents=True, exist_ok=True)  # an empty artifact when the gate fails
    validated.metadata["data_version"] = source_fingerprint
    return namedtuple("ValidateOutputs", ["passed", "summary"])(out["passed"], out["summary"])


@dsl.component(base_image=default_image(), install_kfp_package=False)
def gate_failed(summary: str):
    """Fail the run with the gate's blocking failures, so a rejected dataset shows as a failed run in the UI."""
    raise RuntimeError(summary)
