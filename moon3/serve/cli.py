"""``moon3 serve``, ``moon3 index build`` and ``moon3 deploy``: the serving stage's commands."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from moon3.common.cli import ParamsOpt, SetOpt, config_or_exit, console, out, print_json
from moon3.common.redact import redact_text
from moon3.config import DEFAULT_PARAMS, Moon3Config

index_app = typer.Typer(help="Search index of a product gallery (served as moon3-search).", no_args_is_help=True)


def _config(params: Path, overrides: list[str] | None) -> Moon3Config:
    """The config; without a params.yaml in the working directory (the serving image) the built-in defaults."""
    if params == DEFAULT_PARAMS and not params.exists():
        console.print("no params.yaml here: built-in defaults + --set", highlight=False)
        return config_or_exit(None, overrides)  # type: ignore[arg-type]
    return config_or_exit(params, overrides)


def serve_cmd(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    model: str = typer.Option(
        None, "--model", "-m", help="Model folder, gs:// prefix or MLflow URI (default: serve.model_dir)."
    ),
    index: str = typer.Option(None, "--index", help="Index folder or gs:// prefix (default: serve.index_dir)."),
    no_index: bool = typer.Option(False, "--no-index", help="Serve embeddings only (no moon3-search, no demo)."),
    host: str = typer.Option(None, help="Bind address (default: serve.host)."),
    port: int = typer.Option(None, help="HTTP port (default: serve.http_port)."),
) -> None:
    """Serve the model with KServe: v1 + v2 embeddings, moon3-search, /metrics, health and the /demo page."""
    cfg = _config(params, overrides)
    serve_cfg = cfg.serve
    serve_cfg.host = host or serve_cfg.host
    serve_cfg.http_port = port or serve_cfg.http_port
    model_uri = model or serve_cfg.model_dir
    index_uri = "" if no_index else (serve_cfg.index_dir if index is None else index)
    from moon3.serve.engine import local_index_exists
    from moon3.serve.resolve import is_mlflow_uri

    # Fail before the server starts on what can be checked at once; the rest fails the background load (exit 1).
    if not (is_mlflow_uri(model_uri) or model_uri.startswith("gs://") or Path(model_uri).exists()):
        console.print(f"[red]serve:[/red] no model at {redact_text(model_uri)} (train one, or pass --model)",
                      soft_wrap=True, highlight=False)  # fmt: skip
        raise typer.Exit(1)
    if index_uri and not local_index_exists(index_uri):
        console.print(f"[red]serve:[/red] no index at {index_uri}: build it with `moon3 index build` "
                      "(or pass --no-index)", soft_wrap=True, highlight=False)  # fmt: skip
        raise typer.Exit(1)
    from moon3.serve.server import serve

    console.print(f"serving {redact_text(model_uri)} on http://{serve_cfg.host}:{serve_cfg.http_port} "
                  f"(index: {redact_text(index_uri) or 'none'})", highlight=False, soft_wrap=True)  # fmt: skip
    raise typer.Exit(serve(serve_cfg, model_uri, index_uri, trust_remote_code=cfg.model.trust_remote_code))


def index_build_cmd(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    model: str = typer.Option(
        None, "--model", "-m", help="Model folder, gs:// prefix or MLflow URI (default: serve.model_dir)."
    ),
    data_dir: Path = typer.Option(None, "--data", help="Dataset folder (default: serve.index_data_dir)."),
    out_dir: Path = typer.Option(None, "--out", "-o", help="Index folder (default: serve.index_dir)."),
    split: str = typer.Option(None, help="all | train | eval (default: serve.index_split)."),
    batch_size: int = typer.Option(None, help="Items per forward (default: eval.batch_size)."),
    reasoning: bool = typer.Option(
        None, "--reasoning/--no-reasoning", help="Embed after a trace (default: the model's contract)."
    ),
) -> None:
    """Embed a dataset's products and write the FAISS index moon3-search serves (with the model's contract)."""
    from moon3.model.contract import ContractError
    from moon3.model.embedder import Moon3Embedder
    from moon3.serve.index import build_index
    from moon3.serve.resolve import resolve_model_uri

    cfg = config_or_exit(params, overrides)
    model_uri = model or cfg.serve.model_dir
    target = out_dir or cfg.serve.index_dir
    if not str(target):
        console.print("[red]index build:[/red] serve.index_dir is empty: pass --out")
        raise typer.Exit(2)
    try:
        local = resolve_model_uri(model_uri)
        embedder = Moon3Embedder.from_pretrained(local, trust_remote_code=cfg.model.trust_remote_code)
        meta = build_index(embedder, local, data_dir or cfg.serve.index_data_dir, target,
                           split=split or cfg.serve.index_split, batch_size=batch_size or cfg.eval.batch_size,
                           reasoning=reasoning, model_uri=model_uri, progress=sys.stderr.isatty())  # fmt: skip
    except (ValueError, FileNotFoundError, ContractError) as err:
        console.print(f"[red]index build failed:[/red] {redact_text(str(err))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    console.print(f"wrote {target}: {meta['count']} products, dim {meta['embed_dim']}, "
                  f"reasoning {'on' if meta['reasoning'] else 'off'}", highlight=False)  # fmt: skip
    print_json(meta)


def deploy_cmd(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the manifests; apply nothing."),
    variant: str = typer.Option(None, help="cpu | gpu (default: serve.variant)."),
    storage_uri: str = typer.Option(None, help="Model folder URI KServe copies (default: serve.storage_uri)."),
    index_uri: str = typer.Option(None, help="Index folder URI ('' = no search; default: serve.index_uri)."),
    namespace: str = typer.Option(None, help="Namespace (default: serve.namespace)."),
    out_dir: Path = typer.Option(
        None, "--out", help="Also write servingruntime.yaml and inferenceservice-{cpu,gpu}.yaml into this folder."
    ),
    context: str = typer.Option(None, help="kubeconfig context (outside a cluster)."),
    registry_version: str = typer.Option(
        None,
        "--registry-version",
        help="Serve this registry version or alias of promotion.model_name (e.g. champion): annotates the "
        "InferenceService with it (lineage), serves its source unless --storage-uri, tags it served_isvc.",
    ),
) -> None:
    """Render the KServe ServingRuntime and InferenceService from params.yaml; apply them unless --dry-run."""
    from moon3.registry.lineage import LineageError, tag_served
    from moon3.serve.deploy import DeployError, apply_manifests, make_api, prepare, resolve_registry
    from moon3.serve.manifests import inference_service, serving_runtime, to_dict, to_yaml

    full = _config(params, overrides)
    cfg = full.serve
    try:
        ref, client, source = resolve_registry(full, registry_version or "")
        manifests = prepare(cfg, storage_uri or source, index_uri, namespace or "", variant or "", ref)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            header = (
                "# Rendered from params.yaml (section serve) by `moon3 deploy --dry-run --out DIR`: edit the\n"
                "# params and render again rather than editing this file.\n"
            )
            (out_dir / "servingruntime.yaml").write_text(header + to_yaml([to_dict(serving_runtime(cfg))]))
            for name in ("cpu", "gpu"):
                isvc = to_yaml([to_dict(inference_service(cfg, name))])
                (out_dir / f"inferenceservice-{name}.yaml").write_text(header + isvc)
            console.print(f"wrote {out_dir}/servingruntime.yaml, inferenceservice-cpu.yaml, inferenceservice-gpu.yaml")
    except (ValueError, LineageError) as err:
        console.print(f"[red]deploy:[/red] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    if dry_run:
        out.print(to_yaml(manifests), markup=False, highlight=False, soft_wrap=True, end="")
        return
    try:
        applied = apply_manifests(manifests, make_api(context))
    except DeployError as err:
        console.print(f"[red]deploy failed:[/red] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    for a in applied:
        console.print(f"{a['kind']} {a['namespace']}/{a['name']}: {a['action']}", highlight=False)
    if ref is not None:
        tag_served(client, ref.model, ref.version, f"{cfg.namespace}/{cfg.isvc_name}", "applied")


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``index build`` and ``deploy`` to the ``moon3`` app."""
    app.command("serve")(serve_cmd)
    index_app.command("build")(index_build_cmd)
    app.add_typer(index_app, name="index")
    app.command("deploy")(deploy_cmd)
