"""``moon3 register``, ``promote``, ``rollback`` and ``lineage``: the MLflow Model Registry commands."""

from __future__ import annotations

from pathlib import Path

import typer

from moon3.common.cli import ParamsOpt, SetOpt, config_or_exit, console, out


def register_cmd(
    model_dir: Path = typer.Argument(..., help="Model folder written by save_pretrained (e.g. models/rl/final)."),
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    metrics: Path = typer.Option(None, "--metrics", help="Evaluation metrics.json (default: promotion.metrics_file)."),
    pipeline_run_id: str = typer.Option("", "--pipeline-run-id", help="Id of the pipeline run (lineage tag)."),
    data_version: str = typer.Option(
        "", "--data-version", help="Data version tag (default: the data/validated md5 in dvc.lock)."
    ),
) -> None:
    """Register a model folder with its contract and metrics in the MLflow registry; alias it `challenger`."""
    from moon3.model.contract import ContractError
    from moon3.registry.register import register_model

    cfg = config_or_exit(params, overrides)
    metrics = metrics or Path(cfg.promotion.metrics_file)
    if not metrics.exists():
        console.print(f"[red]register:[/red] no metrics at {metrics} (run `moon3 evaluate`)", highlight=False)
        raise typer.Exit(1)
    try:
        version = register_model(model_dir, metrics, cfg, pipeline_run_id=pipeline_run_id, data_version=data_version)
    except ContractError as err:
        console.print(f"[red]register:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    out.print(f"registered {cfg.promotion.model_name} v{version.version} (run {version.run_id}) as challenger")


def promote_cmd(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    version: str = typer.Option(None, "--version", help="Version to gate (default: the `challenger` alias)."),
    table: Path = typer.Option(None, "--table", help="Also write the gate table (markdown) to this file."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Contract check and gate only; move nothing (CI on PRs)."),
) -> None:
    """Gate the challenger against `champion`; on pass move `champion` and render its InferenceService (canary
    first) to promotion.render_dir; on fail exit 1 with the table."""
    from moon3.model.contract import ContractError
    from moon3.registry.promote import GateFailed, PromotionError, format_table, promote
    from moon3.registry.register import client_for
    from moon3.registry.render import render_promotion

    cfg = config_or_exit(params, overrides)
    client = client_for(cfg.promotion.tracking_uri)
    try:
        result = promote(cfg, client, version, dry_run=dry_run)
    except GateFailed as err:
        if table:
            table.write_text(format_table(err.rows) + "\n")
        out.print(format_table(err.rows), highlight=False, soft_wrap=True)
        console.print("[red]promote:[/red] gate failed; champion unchanged", highlight=False)
        raise typer.Exit(1) from None
    except (ContractError, PromotionError) as err:
        console.print(f"[red]promote:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if table:
        table.write_text(format_table(result.rows) + "\n")
    if dry_run:
        out.print(format_table(result.rows), highlight=False, soft_wrap=True)
        out.print(f"v{result.version} passes the gate against champion v{result.previous} (dry run: nothing moved)")
        return
    if not result.promoted:
        out.print(f"v{result.version} is already champion")
        return
    out.print(format_table(result.rows), highlight=False, soft_wrap=True)
    out.print(f"promoted v{result.version} to champion (previous: {result.previous or 'none'})")
    try:
        info = render_promotion(cfg, client, result.version, result.previous)
    except ValueError as err:
        console.print(f"[red]promote:[/red] v{result.version} is champion, but rendering its InferenceService failed: "
                      f"{err}", highlight=False, soft_wrap=True)  # fmt: skip
        raise typer.Exit(1) from None
    where = Path(info["manifests"]).parent
    out.print(
        f"rendered {info['isvc']} for v{info['version']} at {info['canary_traffic_percent']}% traffic: "
        f"{where / 'manifests.yaml'}, {where / 'promotion.json'}",
        highlight=False,
        soft_wrap=True,
    )
    if info["warning"]:
        console.print(f"[yellow]promote:[/yellow] {info['warning']}", highlight=False, soft_wrap=True)


def rollback_cmd(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    to: str = typer.Option(None, "--to", help="A former champion version (default: the previous one)."),
) -> None:
    """Move `champion` back to the previous champion, keeping the history as tags."""
    from moon3.registry.promote import PromotionError, rollback
    from moon3.registry.register import client_for

    cfg = config_or_exit(params, overrides)
    try:
        old, new = rollback(cfg, client_for(cfg.promotion.tracking_uri), to)
    except PromotionError as err:
        console.print(f"[red]rollback:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    out.print(f"champion rolled back from v{old} to v{new}")


def lineage_cmd(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    version: str = typer.Option(None, "--version", help="A version number or alias (champion, challenger)."),
    manifest: Path = typer.Option(
        None, "--manifest", help="InferenceService YAML (rendered manifests.yaml or `kubectl get isvc NAME -o yaml`)."
    ),
    data_version: str = typer.Option(None, "--data-version", help="List the versions registered from this data."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Walk the lineage: served InferenceService -> registry version -> run -> data, or back from a data hash."""
    import json

    from moon3.registry.lineage import LineageError, data_lineage, format_lineage, manifest_lineage, version_lineage
    from moon3.registry.register import client_for

    given = [x for x in (version, manifest, data_version) if x is not None]
    if len(given) != 1:
        console.print("[red]lineage:[/red] give exactly one of --version, --manifest, --data-version", highlight=False)
        raise typer.Exit(2)
    cfg = config_or_exit(params, overrides)
    client = client_for(cfg.promotion.tracking_uri)
    name = cfg.promotion.model_name
    try:
        if version is not None:
            result: dict | list = version_lineage(client, name, version)
        elif manifest is not None:
            result = manifest_lineage(client, manifest)
        else:
            result = data_lineage(client, name, data_version)
    except (LineageError, ValueError, OSError) as err:
        console.print(f"[red]lineage:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        out.print(json.dumps(result, indent=2), markup=False, highlight=False, soft_wrap=True)
        return
    items = result if isinstance(result, list) else [result]
    if not items:
        out.print(f"no version of {name} with data_version {data_version}")
    out.print("\n\n".join(format_lineage(i) for i in items), markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``register``, ``promote``, ``rollback`` and ``lineage`` to the ``moon3`` app."""
    app.command("register")(register_cmd)
    app.command("promote")(promote_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("lineage")(lineage_cmd)
