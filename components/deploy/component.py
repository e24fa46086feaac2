"""KFP component ``deploy``: render the KServe ServingRuntime + InferenceService from the params and apply them."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from moon3.pipelines.params import default_image


@dsl.component(base_image=default_image(), install_kfp_package=False)
def deploy(
    params: str,
    overrides: list,
    model: Input[Model],
    manifests: Output[Artifact],
    index: Input[Artifact] = None,
    namespace: str = "",
    variant: str = "",
    dry_run: bool = False,
    registry_version: str = "",
    image: str = "",
    gpu_image: str = "",
) -> str:
    """Serve ``model`` with KServe: create or replace the runtime and the InferenceService (canary per params).

    The pod's service account needs create/get/update on ``servingruntimes`` and ``inferenceservices``
    (``serving.kserve.io``) in the target namespace; KServe's storage initializer reads ``model.uri``.

    Args:
        params: stage sections of ``params.yaml`` (the pipeline's ``params``); the ``serve`` section is used.
        overrides: ``section.key=value`` strings applied on top.
        model: the model folder to serve (its URI becomes the InferenceService's ``storageUri``).
        manifests: the applied ``manifests.yaml`` and ``deploy.json`` (what was created or replaced).
        index: optional, the ``moon3 index build`` folder (default: ``serve.index_uri``).
        namespace: target namespace ('' = ``serve.namespace``).
        variant: ``cpu`` | ``gpu`` ('' = ``serve.variant``).
        dry_run: render only.
        registry_version: the registry version (or alias) of ``promotion.model_name`` that ``model`` is: the
            InferenceService is annotated with it and, once applied, the version is tagged ``served_isvc`` /
            ``served_at`` ('' = none; needs the MLflow server, ``promotion.tracking_uri`` or ``MLFLOW_TRACKING_URI``).
        image: the serving image of the CPU variant ('' = ``serve.image``); the pipeline passes its own CPU image,
            so the served code is the code that was trained and evaluated.
        gpu_image: the same for the GPU variant ('' = ``serve.gpu_image``).

    Returns:
        One line: the InferenceService, variant, canary share and what was applied.
    """
    from moon3.serve.deploy import deploy_step

    index_uri = index.uri if index is not None else None
    out = deploy_step(params, overrides, model.uri, manifests.path, index_uri=index_uri, namespace=namespace,
                      variant=variant, dry_run=dry_run, registry_version=registry_version, image=image,
                      gpu_image=gpu_image)  # fmt: skip
    print(out["summary"])
    return out["summary"]
