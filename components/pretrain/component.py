"""KFP components of contrastive pretraining: in the pipeline pod (``pretrain``) or as a TrainJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from moon3.pipelines.params import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def pretrain(
    params: str,
    overrides: list,
    dataset: Input[Dataset],
    traces: Input[Dataset],
    model: Output[Model],
    init_model: Output[Model],
    metrics: Output[Metrics],
    num_processes: int = 1,
    accelerate_config: str = "",
    deepspeed_config: str = "",
    scratch_dir: str = "",
    run_id: str = "",
    ablation: str = "",
):
    """Contrastive pretraining (``moon3 train contrastive``) on the train split of ``dataset``.

    Args:
        params: stage sections of ``params.yaml`` (the pipeline's ``params``).
        overrides: ``section.key=value`` strings applied on top.
        dataset: the validated dataset.
        traces: the synthesize step's ``traces.parquet`` (trace SFT when ``model.reasoning`` is on).
        model: the trained embedder (``Moon3Embedder.from_pretrained`` folder).
        init_model: the untrained starting point (the evaluation baseline).
        metrics: final loss, InfoNCE, temperature, pairs/s, steps, world size.
        num_processes: > 1: ``accelerate launch`` with ``deepspeed_config``, one process per GPU.
        accelerate_config: accelerate YAML (relative paths resolve under ``$MOON3_HOME``).
        deepspeed_config: DeepSpeed JSON (same).
        scratch_dir: mounted volume for checkpoints (a retried pod resumes); '' = a temporary folder.
        run_id: the pipeline run id, which names the run's folder on ``scratch_dir``.
        ablation: '' for the full model, else the module switched off (no_fusion | no_fire | no_reasoning).
    """
    from moon3.pipelines.steps import pretrain_step

    summary = pretrain_step(params, overrides, dataset.path, model.path, init_model.path, num_processes,
                            accelerate_config, deepspeed_config, scratch_dir, run_id, traces.path,
                            ablation)  # fmt: skip
    for name, value in summary.items():
        metrics.log_metric(name, value)
    model.metadata["framework"] = "moon3"
    model.metadata["ablation"] = ablation


@dsl.component(base_image=default_image(), install_kfp_package=False)
def pretrain_trainjob(
    params: str,
    overrides: list,
    pipeline: dict,
    claim_name: str,
    run_id: str,
    dataset: Input[Dataset],
    traces: Input[Dataset],
    model: Output[Model],
    init_model: Output[Model],
    metrics: Output[Metrics],
):
    """Multi-node pretraining: submit a Kubeflow Trainer TrainJob, wait for it, collect the model.

    Args:
        params: stage sections of ``params.yaml``.
        overrides: ``section.key=value`` strings applied on top.
        pipeline: the ``pipeline`` section (image, nodes, processes, node pool, volume, runtime).
        claim_name: the PersistentVolumeClaim mounted here and in every TrainJob node.
        run_id: the pipeline run id (names the TrainJob and the run's folder on the claim).
        dataset: the validated dataset.
        traces: the synthesize step's ``traces.parquet``.
        model: the trained embedder.
        init_model: the untrained starting point.
        metrics: the training summary.
    """
    from moon3.pipelines.steps import pretrain_trainjob_step

    summary = pretrain_trainjob_step(params, overrides, pipeline, dataset.path, model.path, init_model.path,
                                     claim_name, run_id, traces_dir=traces.path)  # fmt: skip
    for name, value in summary.items():
        metrics.log_metric(name, value)
    model.metadata["framework"] = "moon3"
