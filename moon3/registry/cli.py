"""``moon3 register``, ``moon3 promote`` and ``moon3 rollback``: the MLflow Model Registry commands."""

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
        version = register_model(model_dir, metrics, cfg, pipeline_run_id=pipeline_run_id)
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
    """Gate the challenger against `champion`; on pass move `champion`, on fail exit 1 with the table."""
    from moon3.model.contract import ContractError
    from moon3.registry.promote import GateFailed, PromotionError, format_table, promote
    from moon3.registry.register import client_for

    cfg = config_or_exit(params, overrides)
    try:
        result = promote(cfg, client_for(cfg.promotion.tracking_uri), version, dry_run=dry_run)
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


def register(app: typer.Typer) -> None:
    """Add ``register``, ``promote`` and ``rollback`` to the ``moon3`` app."""
    app.command("register")(register_cmd)
    app.command("promote")(promote_cmd)
    app.command("rollback")(rollback_cmd)
