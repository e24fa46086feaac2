"""The moon3 training pipeline: prepare (or import) -> validate -> [gate] -> synthesize -> pretrain -> rl -> evaluate.

Run-time arguments (editable in the KFP UI):
    params: the stage sections of ``params.yaml`` (``data``, ``validation``, ``synthesis``, ``model``, ``train``,
        ``rl``, ``eval``), defaulting to the file the pipeline was compiled from.
    overrides: ``section.key=value`` strings applied on top, like ``--set`` on the CLI.
    dataset_uri: only with ``pipeline.prepare: false``: a moon3-format dataset folder (``gs://...``) that is
        imported as is instead of running ``prepare``.

Compile-time settings come from ``params.yaml``'s ``pipeline`` section: the image, caching, the GPU node pool
of the training steps, the scratch volume and the trainer of pretraining (``accelerate`` in the pod or a
``trainjob``). RL fine-tuning (``rl``) always runs in its own pod on the GPU node pool, one process, with its
checkpoints on the scratch volume; evaluation scores the RL model, with the pretrained one as ``no_rl``.

Compile with ``moon3 pipeline compile`` (or ``build_pipeline(load_config(...))`` and the KFP compiler).
"""

import dataclasses
from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import Dataset

from moon3.config import Moon3Config
from moon3.pipelines.compile import load_component, pipeline_version
from moon3.pipelines.params import pipeline_params
from moon3.pipelines.placement import check_trainer, place_training_task

prepare = load_component("prepare").prepare
validate = load_component("validate").validate
gate_failed = load_component("validate").gate_failed
synthesize = load_component("synthesize").synthesize
pretrain = load_component("pretrain").pretrain
pretrain_trainjob = load_component("pretrain").pretrain_trainjob
rl = load_component("rl").rl
evaluate = load_component("evaluate").evaluate

VERSION_ANNOTATION = "moon3.io/pipeline-version"


def build_pipeline(cfg: Moon3Config, version: str | None = None) -> Any:
    """The pipeline function for ``cfg`` (compile it with ``kfp.compiler`` or run it with ``kfp.local``).

    Args:
        cfg: the whole config; ``pipeline`` fixes image/placement/trainer, the rest is the ``params`` default.
        version: recorded in the description and on every pod (default: package version + git short sha).

    Raises:
        ValueError: a ``pipeline`` setting that cannot schedule or train (names the key).
    """
    pc = cfg.pipeline
    check_trainer(pc)
    version = version or pipeline_version()
    defaults = pipeline_params(cfg)

    def common(task: Any, name: str, cache: bool) -> Any:
        task.set_display_name(name)
        task.set_caching_options(cache)
        task.set_container_image(pc.image)
        kubernetes.set_image_pull_policy(task, pc.image_pull_policy)
        kubernetes.add_pod_annotation(task, VERSION_ANNOTATION, version)
        return task

    def stages(dataset: Any, params: Any, overrides: Any) -> None:
        checked = common(validate(params=params, overrides=overrides, dataset=dataset), "validate", pc.cache_data)
        with dsl.If(checked.outputs["passed"] == True, name="data-gate-passed"):  # noqa: E712 -- a KFP condition
            traces = common(
                synthesize(params=params, overrides=overrides, dataset=checked.outputs["validated"]),
                "synthesize", pc.cache_data,
            ).outputs["traces"]  # fmt: skip
            claim = None
            if pc.pvc_name and pc.pvc_create:
                pvc = kubernetes.CreatePVC(
                    pvc_name_suffix=f"-{pc.pvc_name}", access_modes=[pc.pvc_access_mode], size=pc.pvc_size,
                    storage_class_name=pc.pvc_storage_class,
                )  # fmt: skip
                # Never cached: a cached claim name would point at the claim an earlier run deleted.
                pvc.set_display_name("create-scratch-volume").set_caching_options(False)
                claim = pvc.outputs["name"]
            elif pc.pvc_name:
                claim = pc.pvc_name
            if pc.trainer == "trainjob":
                train = pretrain_trainjob(
                    params=params, overrides=overrides, pipeline=dataclasses.asdict(pc), claim_name=claim,
                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, dataset=checked.outputs["validated"], traces=traces,
                )  # fmt: skip
            else:
                train = pretrain(
                    params=params, overrides=overrides, dataset=checked.outputs["validated"], traces=traces,
                    num_processes=pc.num_processes, accelerate_config=pc.accelerate_config,
                    deepspeed_config=pc.deepspeed_config, scratch_dir=pc.pvc_mount_path if claim else "",
                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                )  # fmt: skip
            common(train, "pretrain", pc.cache_train)
            place_training_task(train, pc, gpu=pc.trainer == "accelerate")
            if claim is not None:
                kubernetes.mount_pvc(train, pvc_name=claim, mount_path=pc.pvc_mount_path)
            # RL trains in its own pod (one process) whichever trainer pretrained: always on the GPU pool.
            tuned = rl(
                params=params, overrides=overrides, dataset=checked.outputs["validated"],
                pretrained=train.outputs["model"], scratch_dir=pc.pvc_mount_path if claim else "",
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            )  # fmt: skip
            common(tuned, "rl", pc.cache_train)
            place_training_task(tuned, pc)
            if claim is not None:
                kubernetes.mount_pvc(tuned, pvc_name=claim, mount_path=pc.pvc_mount_path)
            if pc.pvc_name and pc.pvc_create:
                delete = kubernetes.DeletePVC(pvc_name=claim).after(train, tuned)
                delete.set_display_name("delete-scratch-volume").set_caching_options(False)
            scored = evaluate(
                params=params, overrides=overrides, dataset=checked.outputs["validated"],
                model=tuned.outputs["model"], init_model=train.outputs["init_model"],
                pretrained=train.outputs["model"],
            )  # fmt: skip
            common(scored, "evaluate", pc.cache_eval)
            for task in (train, tuned, scored):
                if pc.mlflow_tracking_uri:
                    task.set_env_variable("MLFLOW_TRACKING_URI", pc.mlflow_tracking_uri)
        with dsl.Else(name="data-gate-failed"):
            common(gate_failed(summary=checked.outputs["summary"]), "gate-failed", False)

    chain = f"validate (gate) -> synthesize -> pretrain ({pc.trainer}) -> rl -> evaluate"
    description = f"moon3 {version}: {{}} -> {chain}"
    if pc.prepare:

        @dsl.pipeline(name=pc.name, description=description.format("prepare"))
        def training_pipeline(
            params: dict = defaults,
            overrides: list = [],  # noqa: B006 -- KFP reads the default from the signature; never mutated
        ):
            prepared = common(prepare(params=params, overrides=overrides), "prepare", pc.cache_data)
            stages(prepared.outputs["dataset"], params, overrides)

    else:

        @dsl.pipeline(name=pc.name, description=description.format("import dataset_uri"))
        def training_pipeline(
            dataset_uri: str,
            params: dict = defaults,
            overrides: list = [],  # noqa: B006 -- KFP reads the default from the signature; never mutated
        ):
            imported = dsl.importer(artifact_uri=dataset_uri, artifact_class=Dataset, reimport=False)
            imported.set_display_name("import-dataset")
            stages(imported.output, params, overrides)

    return training_pipeline
