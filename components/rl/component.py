"""KFP component ``rl``: GRPO fine-tuning (stage B) of the pretrained model, in the pipeline pod."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from moon3.pipelines.params import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def rl(
    params: str,
    overrides: list,
    dataset: Input[Dataset],
    pretrained: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    scratch_dir: str = "",
    run_id: str = "",
):
    """RL fine-tuning with GRPO (``moon3 train rl``) on the train split of ``dataset``, starting from ``pretrained``.

    One process (multi-GPU RL is not built yet). A starting model trained without traces, or ``rl.enabled:
    false``, is copied to ``model`` unchanged and ``metrics`` say ``skipped``.

    Args:
        params: stage sections of ``params.yaml`` (the pipeline's ``params``).
        overrides: ``section.key=value`` strings applied on top.
        dataset: the validated dataset.
        pretrained: the pretrained embedder (the pretrain step's ``model``).
        model: the RL embedder (``Moon3Embedder.from_pretrained`` folder), or the unchanged copy.
        metrics: skipped (1/0), steps, rewards and trace-closure statistics (first vs last 10 % of steps), KL,
            timing, and the starting model's training record.
        scratch_dir: mounted volume for checkpoints (a retried pod resumes); '' = a temporary folder.
        run_id: the pipeline run id, which names the run's folder on ``scratch_dir``.
    """
    from moon3.pipelines.steps import rl_step

    summary = rl_step(params, overrides, dataset.path, pretrained.path, model.path, scratch_dir, run_id)
    for name, value in summary.items():
        metrics.log_metric(name, value)
    model.metadata["framework"] = "moon3"
