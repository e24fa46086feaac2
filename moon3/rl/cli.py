"""``moon3 train rl``: the GRPO stage's command (registered under ``moon3 train``)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from moon3.common.cli import ParamsOpt, SetOpt, config_or_exit, console, print_json


def rl_cmd(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    data_dir: Path = typer.Option(None, help="Validated dataset (default: validation.out_dir)."),
    init_dir: Path = typer.Option(None, help="Pretrained model to start from (default: rl.init_dir)."),
    out_dir: Path = typer.Option(None, help="Model output folder (default: rl.out_dir)."),
    report_dir: Path = typer.Option(None, help="Metrics and plots folder (default: rl.report_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint."),
) -> None:
    """Stage B: GRPO on the model's own traces, rewarded by the rank of the positive after each trace."""
    from moon3.model.contract import ContractError
    from moon3.rl.finetune import train_rl

    cfg = config_or_exit(params, overrides)
    try:
        summary = train_rl(cfg, data_dir or Path(cfg.validation.out_dir), init_dir, out_dir, report_dir,
                           resume=resume, progress=sys.stderr.isatty())  # fmt: skip
    except (ContractError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]rl failed:[/red] {err}")
        raise typer.Exit(1) from None
    print_json({k: v for k, v in summary.items() if k != "history"})


def register(train_app: typer.Typer) -> None:
    """Add ``rl`` to the ``moon3 train`` group."""
    train_app.command("rl")(rl_cmd)
