"""KFP component of trace synthesis: a trace for every training item, gated by grounding (``moon3 synthesize``)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from moon3.pipelines.params import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def synthesize(
    params: str,
    overrides: list,
    dataset: Input[Dataset],
    traces: Output[Dataset],
    report: Output[HTML],
    details: Output[Artifact],
    metrics: Output[Metrics],
):
    """Ask the configured teacher (``synthesis.teacher``) for traces and keep those the grounding gate accepts.

    Args:
        params: stage sections of ``params.yaml`` (the pipeline's ``params``).
        overrides: ``section.key=value`` strings applied on top.
        dataset: the validated dataset.
        traces: ``traces.parquet`` (accepted traces), which pretraining reads when ``model.reasoning`` is on.
        report: the HTML report (KFP UI visualization).
        details: ``synthesis_report.json`` and ``rejected.parquet``.
        metrics: counts by outcome (in = accepted + rejected + failed), claim accuracy, trace length.
    """
    import shutil

    from moon3.pipelines.steps import synthesize_step

    out = synthesize_step(params, overrides, dataset.path, traces.path, details.path)
    shutil.copyfile(out["html"], report.path)
    for name, value in out["metrics"].items():
        metrics.log_metric(name, value)
