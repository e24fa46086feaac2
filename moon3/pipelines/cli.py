"""``moon3 pipeline compile|upload|run``: the Kubeflow Pipelines commands.

Credentials never travel on the command line (shell history, CI logs): a bearer token is read from an
environment variable (``--token-env``, default ``KFP_TOKEN`` when set), ``--in-cluster`` uses the pod's projected
service-account token, and otherwise kfp's own mechanisms apply (IAP, cookies, kube context).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from moon3.common.cli import ParamsOpt, SetOpt, config_or_exit, console, print_json
from moon3.config import Moon3Config

HostOpt = typer.Option(
    ..., "--host", envvar="KF_PIPELINES_ENDPOINT",
    help="KFP API server URL, e.g. https://kubeflow.example.com/pipeline (or $KF_PIPELINES_ENDPOINT).",
)  # fmt: skip
NamespaceOpt = typer.Option(
    None, "--namespace", help="Kubeflow profile namespace (multi-user clusters): of the client, the uploaded "
    "pipeline, the experiment and the run.",
)  # fmt: skip
TokenEnvOpt = typer.Option(
    None, "--token-env", metavar="NAME",
    help="Environment variable holding a bearer token (e.g. an OIDC/identity token in CI); default: KFP_TOKEN "
    "when it is set. The token itself is never an option.",
)  # fmt: skip
InClusterOpt = typer.Option(
    False, "--in-cluster", help="Authenticate with the pod's projected service-account token (a client in a pod)."
)
# How the run command names each pipeline parameter in its errors.
ARGUMENT_FLAGS = {"params": "--params", "overrides": "--set", "dataset_uri": "--dataset-uri"}


def _client(host: str, namespace: str | None, token_env: str | None, in_cluster: bool):
    from moon3.pipelines import client as kfp_client

    try:
        return kfp_client.make_client(host, namespace, token_env=token_env, in_cluster=in_cluster)
    except ValueError as err:
        console.print(f"[red]KFP client:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None


def _compile(params: Path, overrides: list[str] | None, out: Path | None = None) -> tuple[Moon3Config, Path, str]:
    from moon3.pipelines.compile import compile_pipeline
    from moon3.pipelines.version import pipeline_version

    cfg = config_or_exit(params, overrides)
    version = pipeline_version(cfg)
    try:
        path = compile_pipeline(cfg, out, version=version)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]compile failed:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(f"compiled {cfg.pipeline.name} {version} -> {path}")
    return cfg, path, version


def compile_cmd(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    out: Path = typer.Option(None, "--out", help="Output YAML (default: pipelines/compiled/<pipeline.name>.yaml)."),
) -> None:
    """Compile the training pipeline (its version, from the source and params hashes, is in its metadata)."""
    _compile(params, overrides, out)


def upload_cmd(
    host: str = HostOpt,
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    namespace: str = NamespaceOpt,
    token_env: str = TokenEnvOpt,
    in_cluster: bool = InClusterOpt,
    version_name: str = typer.Option(None, help="Name of the new version (default: the compiled version)."),
) -> None:
    """Compile, then upload as a new version of the pipeline (creating the pipeline on its first upload)."""
    from moon3.pipelines import client as kfp_client

    client = _client(host, namespace, token_env, in_cluster)
    # The server keeps the uploaded YAML; compiling to a temp folder leaves the committed file alone.
    cfg, path, version = _compile(params, overrides, Path(tempfile.mkdtemp()) / "pipeline.yaml")
    try:
        result = kfp_client.upload(client, path, cfg.pipeline.name, version_name or version,
                                   description=f"moon3 {version}", namespace=namespace)  # fmt: skip
    except ValueError as err:
        console.print(f"[red]upload failed:[/red] {err}")
        raise typer.Exit(1) from None
    print_json(vars(result))


def run_cmd(
    host: str = HostOpt,
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    namespace: str = NamespaceOpt,
    token_env: str = TokenEnvOpt,
    in_cluster: bool = InClusterOpt,
    dataset_uri: str = typer.Option(
        "", help="Import this dataset folder URI (a pipeline compiled with pipeline.prepare=false needs one)."
    ),
    experiment: str = typer.Option("moon3", help="KFP experiment (created if missing)."),
    run_name: str = typer.Option(None, help="Run name (default: the pipeline name)."),
    package: Path = typer.Option(None, help="Run this compiled YAML instead of the latest uploaded version."),
) -> None:
    """Start a run with this params file as `params` and the --set values as `overrides`.

    Only the parameters the pipeline declares are sent, in the types it declares; the run's pods use
    pipeline.service_account of the params file.
    """
    from moon3.pipelines import client as kfp_client
    from moon3.pipelines.params import pipeline_params

    compile_time = [o for o in overrides or [] if o.strip().startswith("pipeline.")]
    if compile_time:
        console.print(f"[red]run:[/red] {compile_time[0]} is fixed at compile time: use `moon3 pipeline upload`")
        raise typer.Exit(2)
    cfg = config_or_exit(params, overrides)  # checks every key before anything reaches the server
    arguments = {"params": pipeline_params(config_or_exit(params, None)), "overrides": list(overrides or []),
                 "dataset_uri": dataset_uri}  # fmt: skip
    client = _client(host, namespace, token_env, in_cluster)
    try:
        result = kfp_client.run(
            client, arguments, experiment=experiment, run_name=run_name, pipeline_name=cfg.pipeline.name,
            package=package, namespace=namespace, service_account=cfg.pipeline.service_account,
            flags=ARGUMENT_FLAGS,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]run failed:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    print_json(vars(result))


def register(app: typer.Typer) -> None:
    """Add the ``pipeline`` command group to the ``moon3`` app."""
    pipeline_app = typer.Typer(help="Compile, upload and run the Kubeflow training pipeline.", no_args_is_help=True)
    pipeline_app.command("compile")(compile_cmd)
    pipeline_app.command("upload")(upload_cmd)
    pipeline_app.command("run")(run_cmd)
    app.add_typer(pipeline_app, name="pipeline")
