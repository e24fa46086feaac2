"""KFP component ``evaluate``: MBE3.0-style tasks for the trained model, its untrained start and its pre-RL self."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from moon3.pipelines.params import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def evaluate(
    params: str,
    overrides: list,
    dataset: Input[Dataset],
    model: Input[Model],
    init_model: Input[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
    summary: Output[Markdown],
    details: Output[Artifact],
    pretrained: Input[Model] = None,
    ablation_model: Input[Model] = None,
    ablation: str = "",
):
    """Evaluate ``model`` against its untrained starting point (and its pre-RL self) on the eval split of ``dataset``.

    Args:
        params: stage sections of ``params.yaml`` (the pipeline's ``params``).
        overrides: ``section.key=value`` strings applied on top.
        dataset: the validated dataset.
        model: the trained embedder (the RL model, or its pretrained copy when RL was skipped).
        init_model: the untrained embedder (baseline).
        metrics: every metric as ``variant/kind/task/metric``.
        confusion: level-1 category confusion matrix of the trained model (zero-shot classification).
        report: the HTML report with tables and plots (KFP UI visualization).
        summary: the same as Markdown.
        details: ``metrics.json``, ``results.json``, plots and their data.
        pretrained: optional, the pretrained model before RL: evaluated as the ``no_rl`` ablation.
        ablation_model: optional, a variant trained with one module off, evaluated beside ``model`` as
            ``ablation`` (paired deltas with intervals).
        ablation: the variant's name (no_fusion | no_fire | no_reasoning).
    """
    import shutil

    from moon3.pipelines.steps import evaluate_step

    pretrained_dir = pretrained.path if pretrained is not None else ""
    extra = {ablation: ablation_model.path} if ablation_model is not None and ablation else None
    out = evaluate_step(params, overrides, dataset.path, model.path, init_model.path, details.path, pretrained_dir,
                        extra)  # fmt: skip
    for name, value in out["metrics"].items():
        metrics.log_metric(name, value)
    if out["confusion"] is not None:
        labels, matrix = out["confusion"]
        confusion.log_confusion_matrix(labels, matrix)
    shutil.copyfile(out["html"], report.path)
    shutil.copyfile(out["markdown"], summary.path)
