"""The moon3 training pipeline, the whole chain of the model card as one versioned KFP pipeline:

fingerprint -> prepare (or import) -> validate -> [data gate] -> synthesize -> pretrain -> rl -> evaluate
(ablation variants in a ``dsl.ParallelFor``) -> register -> [promotion gate] -> deploy

Run-time arguments (editable in the KFP UI; their descriptions are the ``Args`` below):
    params: the stage sections of ``params.yaml`` as YAML/JSON text (integers stay integers), defaulting to the
        file the pipeline was compiled from.
    overrides: ``section.key=value`` strings applied on top, like ``--set`` on the CLI.
    dataset_uri: only with ``pipeline.prepare: false``: a moon3-format dataset folder (``gs://...``).

Compile-time settings come from ``params.yaml``'s ``pipeline`` section: the two images (CPU steps, CUDA steps on
the GPU node pool; tag = the source tag ``make image`` gives), caching, retries, resources, the scratch volume
(created per run and deleted by an exit handler, whether the run succeeds, fails or is terminated), the trainer
of pretraining (``accelerate`` in the pod or a ``trainjob``), the MLflow server, the pipeline root, the ablation
variants and what deploy does after a passing promotion gate.

Compile with ``moon3 pipeline compile`` (or ``build_pipeline(load_config(...))`` and the KFP compiler).
"""

import dataclasses
from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import Dataset

from moon3.config import Moon3Config
from moon3.pipelines.compile import load_component
from moon3.pipelines.params import params_text
from moon3.pipelines.placement import check_pipeline, image_refs, place_cpu_task, place_training_task
from moon3.pipelines.version import pipeline_version

fingerprint = load_component("prepare").fingerprint
prepare = load_component("prepare").prepare
validate = load_component("validate").validate
gate_failed = load_component("validate").gate_failed
synthesize = load_component("synthesize").synthesize
pretrain = load_component("pretrain").pretrain
pretrain_trainjob = load_component("pretrain").pretrain_trainjob
rl = load_component("rl").rl
evaluate = load_component("evaluate").evaluate
register = load_component("registry").register
promotion_gate = load_component("registry").gate
promotion_report = load_component("registry").promotion_report
deploy = load_component("deploy").deploy

VERSION_ANNOTATION = "moon3.io/pipeline-version"


def scratch_claim_name(suffix: str) -> str:
    """The per-run claim: ``moon3-<run uuid>-<suffix>`` (a lowercase RFC 1123 name, resolved by KFP at run time)."""
    return f"moon3-{dsl.PIPELINE_JOB_ID_PLACEHOLDER}-{suffix}"


def build_pipeline(cfg: Moon3Config, version: str | None = None) -> Any:
    """The pipeline function for ``cfg`` (compile it with ``kfp.compiler`` or run it with ``kfp.local``).

    Args:
        cfg: the whole config; ``pipeline`` fixes images/placement/trainer, the rest is the ``params`` default.
        version: recorded in the description and on every pod (default: :func:`pipeline_version` of ``cfg``).

    Raises:
        ValueError: a ``pipeline`` setting that cannot schedule, train or track (names the key).
    """
    pc = cfg.pipeline
    check_pipeline(pc)
    version = version or pipeline_version(cfg)
    cpu_image, gpu_image = image_refs(pc)
    defaults = params_text(cfg)
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

    def common(task: Any, name: str, cache: bool, image: str = cpu_image, retry: bool = True) -> Any:
        task.set_display_name(name)
        task.set_caching_options(cache)
        task.set_container_image(image)
        kubernetes.set_image_pull_policy(task, pc.image_pull_policy)
        kubernetes.add_pod_annotation(task, VERSION_ANNOTATION, version)
        task.set_env_variable("MLFLOW_TRACKING_URI", pc.mlflow_tracking_uri)
        task.set_env_variable("MOON3_PIPELINE_VERSION", version)  # labels of what a step creates (TrainJob)
        if retry and pc.retries:
            task.set_retry(num_retries=pc.retries, backoff_duration=pc.retry_backoff, backoff_factor=2.0)
        return task

    def cpu_step(task: Any, name: str, cache: bool, retry: bool = True) -> Any:
        return place_cpu_task(common(task, name, cache, retry=retry), pc)

    def gpu_step(task: Any, name: str, cache: bool, accelerators: int | None = None) -> Any:
        if accelerators == 0:  # a step configured off the GPU pool runs on the CPU image
            return cpu_step(task, name, cache)
        return place_training_task(common(task, name, cache, gpu_image), pc, accelerators=accelerators)

    def mount(task: Any, claim: Any) -> None:
        if claim is not None:
            kubernetes.mount_pvc(task, pvc_name=claim, mount_path=pc.pvc_mount_path)

    def stages(dataset: Any, data_version: Any, params: Any, overrides: Any, claim: Any) -> None:
        checked = cpu_step(
            validate(params=params, overrides=overrides, dataset=dataset, source_fingerprint=data_version),
            "validate", pc.cache_data,
        )  # fmt: skip
        validated = checked.outputs["validated"]
        with dsl.If(checked.outputs["passed"] == True, name="data-gate-passed"):  # noqa: E712 -- a KFP condition
            traces = cpu_step(
                synthesize(params=params, overrides=overrides, dataset=validated), "synthesize", pc.cache_data
            ).outputs["traces"]
            scratch = pc.pvc_mount_path if claim is not None else ""
            if pc.trainer == "trainjob":
                # The TrainJob nodes run the CUDA image; the launcher pod only submits and waits (CPU).
                train = pretrain_trainjob(
                    params=params, overrides=overrides, pipeline={**dataclasses.asdict(pc), "image": gpu_image},
                    claim_name=claim, run_id=run_id, dataset=validated, traces=traces,
                )  # fmt: skip
                cpu_step(train, "pretrain", pc.cache_train)
            else:
                train = pretrain(
                    params=params, overrides=overrides, dataset=validated, traces=traces,
                    num_processes=pc.num_processes, accelerate_config=pc.accelerate_config,
                    deepspeed_config=pc.deepspeed_config, scratch_dir=scratch, run_id=run_id,
                )  # fmt: skip
                gpu_step(train, "pretrain", pc.cache_train)
            mount(train, claim)
            # RL trains in its own pod (one process) whichever trainer pretrained: always on the GPU pool.
            tuned = rl(params=params, overrides=overrides, dataset=validated, pretrained=train.outputs["model"],
                       scratch_dir=scratch, run_id=run_id)  # fmt: skip
            gpu_step(tuned, "rl", pc.cache_train)
            mount(tuned, claim)
            scored = evaluate(
                params=params, overrides=overrides, dataset=validated, model=tuned.outputs["model"],
                init_model=train.outputs["init_model"], pretrained=train.outputs["model"],
            )  # fmt: skip
            gpu_step(scored, "evaluate", pc.cache_eval, accelerators=pc.eval_accelerator_limit)
            if pc.ablations:
                # Each variant: the full recipe with one module off (same data, steps, seed), evaluated beside the
                # model above for paired deltas with intervals. In-pod training (accelerate), whatever the trainer.
                with dsl.ParallelFor(pc.ablations, name="ablations") as variant:
                    variant_model = pretrain(
                        params=params, overrides=overrides, dataset=validated, traces=traces,
                        num_processes=pc.num_processes, accelerate_config=pc.accelerate_config,
                        deepspeed_config=pc.deepspeed_config, scratch_dir=scratch, run_id=run_id, ablation=variant,
                    )  # fmt: skip
                    gpu_step(variant_model, "pretrain-ablation", pc.cache_train)
                    mount(variant_model, claim)
                    gpu_step(
                        evaluate(
                            params=params, overrides=overrides, dataset=validated, model=tuned.outputs["model"],
                            init_model=train.outputs["init_model"], ablation_model=variant_model.outputs["model"],
                            ablation=variant,
                        ),
                        "evaluate-ablation", pc.cache_eval, accelerators=pc.eval_accelerator_limit,
                    )  # fmt: skip
            registered = cpu_step(
                register(params=params, overrides=overrides, model=tuned.outputs["model"],
                         eval_details=scored.outputs["details"], pipeline_run_id=run_id, data_version=data_version),
                "register", False,
            )  # fmt: skip
            gated = cpu_step(
                promotion_gate(params=params, overrides=overrides, version=registered.outputs["version"]),
                "promotion-gate", False,
            )  # fmt: skip
            with dsl.If(gated.outputs["passed"] == True, name="promotion-passed"):  # noqa: E712
                if pc.deploy != "off":
                    cpu_step(
                        deploy(params=params, overrides=overrides, model=tuned.outputs["model"],
                               registry_version=registered.outputs["version"], dry_run=pc.deploy == "render",
                               image=cpu_image, gpu_image=gpu_image),
                        "deploy", False,
                    )  # fmt: skip
                else:
                    cpu_step(promotion_report(summary=gated.outputs["summary"]), "promoted", False)
            with dsl.Else(name="promotion-failed"):
                cpu_step(promotion_report(summary=gated.outputs["summary"]), "not-promoted", False)
        with dsl.Else(name="data-gate-failed"):
            cpu_step(gate_failed(summary=checked.outputs["summary"]), "gate-failed", False, retry=False)

    def chain(params: Any, overrides: Any, dataset_uri: Any = None) -> None:
        """Everything after the optional scratch volume: wrapped in the exit handler that deletes it."""
        claim = None
        if pc.pvc_name and pc.pvc_create:
            # The claim is named after the run, not taken from CreatePVC's output: KFP's exit task may not depend
            # on another task, and the exit handler must delete the claim whether the run succeeds, fails or is
            # terminated (a leaked claim keeps its disk).
            claim = scratch_claim_name(pc.pvc_name)
            cleanup = kubernetes.DeletePVC(pvc_name=claim)
            cleanup.set_display_name("delete-scratch-volume").set_caching_options(False)
            with dsl.ExitHandler(cleanup, name="run-with-scratch-volume"):
                kwargs = {"storage_class_name": pc.pvc_storage_class} if pc.pvc_storage_class else {}  # '' = default
                pvc = kubernetes.CreatePVC(
                    pvc_name=claim, access_modes=[pc.pvc_access_mode], size=pc.pvc_size, **kwargs
                )
                # Never cached: a cached claim name would point at the claim an earlier run deleted.
                pvc.set_display_name("create-scratch-volume").set_caching_options(False)
                data_chain(params, overrides, dataset_uri, claim, after=pvc)
            return
        if pc.pvc_name:
            claim = pc.pvc_name
        data_chain(params, overrides, dataset_uri, claim)

    def data_chain(params: Any, overrides: Any, dataset_uri: Any, claim: Any, after: Any = None) -> None:
        found = cpu_step(
            fingerprint(params=params, overrides=overrides, dataset_uri=dataset_uri if dataset_uri is not None else ""),
            "fingerprint", False,
        )  # fmt: skip
        if after is not None:
            found.after(after)
        if dataset_uri is None:
            prepared = cpu_step(
                prepare(params=params, overrides=overrides, source_fingerprint=found.output), "prepare", pc.cache_data
            )
            stages(prepared.outputs["dataset"], found.output, params, overrides, claim)
        else:
            imported = dsl.importer(artifact_uri=dataset_uri, artifact_class=Dataset, reimport=False)
            imported.set_display_name("import-dataset")
            stages(imported.output, found.output, params, overrides, claim)

    stages_text = "validate (gate) -> synthesize -> pretrain ({}) -> rl -> evaluate{} -> register -> gate{}".format(
        pc.trainer, f" + ablations {pc.ablations}" if pc.ablations else "",
        f" -> deploy ({pc.deploy})" if pc.deploy != "off" else "",
    )  # fmt: skip
    description = f"moon3 {version}: {{}} -> {stages_text}"
    root = pc.pipeline_root or None
    if pc.prepare:

        @dsl.pipeline(name=pc.name, description=description.format("prepare"), pipeline_root=root)
        def training_pipeline(
            params: str = defaults,
            overrides: list = [],  # noqa: B006 -- KFP reads the default from the signature; never mutated
        ):
            """Train, evaluate, register, gate and deploy a moon3 embedding model.

            Args:
                params: Stage sections of params.yaml (data, validation, synthesis, model, train, rl, eval,
                    serve, promotion) as YAML or JSON; the default is the params.yaml this version was
                    compiled from.
                overrides: section.key=value strings applied on top of params, e.g. ["train.steps=1000"].
            """
            chain(params, overrides)

    else:

        @dsl.pipeline(name=pc.name, description=description.format("import dataset_uri"), pipeline_root=root)
        def training_pipeline(
            dataset_uri: str,
            params: str = defaults,
            overrides: list = [],  # noqa: B006 -- KFP reads the default from the signature; never mutated
        ):
            """Import a dataset, then train, evaluate, register, gate and deploy a moon3 embedding model.

            Args:
                dataset_uri: A moon3-format dataset folder (products.parquet, queries.parquet, images/), e.g.
                    gs://bucket/datasets/v3.
                params: Stage sections of params.yaml (data, validation, synthesis, model, train, rl, eval,
                    serve, promotion) as YAML or JSON; the default is the params.yaml this version was
                    compiled from.
                overrides: section.key=value strings applied on top of params, e.g. ["train.steps=1000"].
            """
            chain(params, overrides, dataset_uri)

    return training_pipeline
