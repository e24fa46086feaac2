"""``moon3 model ...``: commands about the model itself (``moon3 model plan``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from moon3.common.cli import ParamsOpt, SetOpt, config_or_exit, console, out, print_json

model_app = typer.Typer(help="Inspect model architectures.", no_args_is_help=True)


@model_app.command("plan")
def plan_cmd(
    config: str = typer.Argument(
        "qwen2_5_vl_3b",
        help="Backbone config: a shipped name (qwen2_5_vl_3b, qwen2_5_vl_7b: moon3/model/real/), a config JSON, or an "
        "HF model folder (its config.json).",
    ),
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    batch: int = typer.Option(0, help="Query/product pairs per GPU per micro-step (0: train.batch_size)."),
    seq_len: int = typer.Option(0, help="Tokens per sequence (0: square photo's image tokens + 128 + trace budget)."),
    gpus: int = typer.Option(4, help="Data-parallel GPUs that ZeRO partitions over."),
    reasoning: bool = typer.Option(None, "--reasoning/--no-reasoning", help="Trace SFT on (default: model.reasoning)."),
    checkpointing: bool = typer.Option(True, "--checkpointing/--no-checkpointing", help="Gradient checkpointing."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON instead of the table."),
) -> None:
    """Parameters per part, memory per GPU under ZeRO-2/3 and image tokens per product, from a config alone.

    The model is built on the meta device (no weights, no memory); the preset (model.preset) is resolved
    against the config as training would. Formulas: moon3/model/plan.py.
    """
    from moon3.model.plan import plan, real_config, render

    cfg = config_or_exit(params, overrides)
    path = real_config(config)
    if not path.exists():
        console.print(f"[red]plan failed:[/red] {config}: no such shipped config or file")
        raise typer.Exit(1)
    if gpus < 1 or batch < 0 or seq_len < 0:
        console.print("[red]plan failed:[/red] --gpus must be >= 1, --batch and --seq-len >= 0")
        raise typer.Exit(2)
    try:
        result = plan(path, cfg.model, batch=batch or cfg.train.batch_size,
                      hard_negatives=cfg.train.hard_negatives_per_query, seq_len=seq_len, gpus=gpus,
                      reasoning=reasoning, checkpointing=checkpointing)  # fmt: skip
    except (ValueError, KeyError, OSError) as err:
        console.print(f"[red]plan failed:[/red] {err}")
        raise typer.Exit(1) from None
    if as_json:
        payload = dataclasses.asdict(result)
        payload["cfg"] = dataclasses.asdict(result.cfg)
        print_json(payload)
    else:
        out.print(render(result), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the ``moon3 model`` group."""
    app.add_typer(model_app, name="model")
