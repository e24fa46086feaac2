"""What every stage's commands share: the ``--params`` / ``--set`` options, the consoles, config loading.

Each stage keeps its own commands in ``moon3/<stage>/cli.py``; ``moon3/cli.py`` only routes to them.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from moon3.config import ConfigError, Moon3Config, load_config

console = Console(stderr=True)
out = Console()

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="YAML file with one section per stage.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a key, e.g. --set train.lr=3e-4 (repeatable).")


def config_or_exit(params: Path, overrides: list[str] | None) -> Moon3Config:
    """The resolved config, or exit 2 with the error naming the key."""
    try:
        return load_config(params, overrides)
    except ConfigError as err:
        console.print(f"[red]config error:[/red] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


def print_json(payload: dict) -> None:
    """A result as JSON on stdout."""
    out.print_json(json.dumps(payload, default=str))
