"""``moon3 synthesize``: the trace synthesis stage's command."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from moon3.common.cli import ParamsOpt, SetOpt, config_or_exit, console, print_json


def synthesize_cmd(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    data_dir: Path = typer.Option(None, help="Validated dataset (default: validation.out_dir)."),
    out_dir: Path = typer.Option(None, help="Folder of traces.parquet (default: synthesis.out_dir)."),
    report_dir: Path = typer.Option(None, help="Report folder (default: synthesis.report_dir)."),
) -> None:
    """Write a trace for every training product and query (synthesis.teacher) and gate them by grounding."""
    from moon3.synthesis.synthesize import synthesize

    cfg = config_or_exit(params, overrides)
    try:
        report = synthesize(cfg, data_dir or Path(cfg.validation.out_dir), out_dir, report_dir,
                            progress=sys.stderr.isatty())  # fmt: skip
    except ValueError as err:
        console.print(f"[red]synthesize failed:[/red] {err}")
        raise typer.Exit(2) from None
    print_json({k: v for k, v in report.items() if k != "examples"})


def register(app: typer.Typer) -> None:
    """Add the stage's commands to the ``moon3`` app."""
    app.command("synthesize")(synthesize_cmd)
