"""The ``moon3`` command line: one sub-command per stage, all configured from ``params.yaml``.

Every command takes ``--params`` (default ``params.yaml``) and repeatable ``--set section.key=value``
overrides; DVC stages and KFP components call the same library functions with the same config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from moon3.config import ConfigError, Moon3Config, help_table, load_config

app = typer.Typer(help="moon3: reasoning-aware multimodal product embeddings.", no_args_is_help=True)
data_app = typer.Typer(help="Make, import and inspect datasets.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

console = Console(stderr=True)
out = Console()

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="YAML file with one section per stage.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a key, e.g. --set train.lr=3e-4 (repeatable).")


def _config(params: Path, overrides: list[str] | None) -> Moon3Config:
    try:
        return load_config(params, overrides)
    except ConfigError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from None


def _print_json(payload: dict) -> None:
    out.print_json(json.dumps(payload, default=str))


@config_app.command("show")
def config_show(params: Path = ParamsOpt, overrides: list[str] = SetOpt) -> None:
    """Print the resolved configuration (params.yaml + overrides) as JSON."""
    _print_json(_config(params, overrides).to_dict())


@config_app.command("keys")
def config_keys() -> None:
    """List every key with its built-in default and help."""
    table = Table("key", "default", "help")
    for row in help_table():
        table.add_row(*row)
    out.print(table)


@data_app.command("make-sample")
def data_make_sample(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    out_dir: Path = typer.Option(None, help="Output folder (default: data.out_dir)."),
    scale: int = typer.Option(
        None, help="N copies of the catalog with resampled text (default: data.scale)."
    ),
    seed: int = typer.Option(None, help="Generator seed (default: data.seed)."),
) -> None:
    """Generate the mbe3-mini sample dataset."""
    from moon3.data.mini import make_sample
    from moon3.data.stats import dataset_stats

    cfg = _config(params, overrides).data
    cfg.scale = scale if scale is not None else cfg.scale
    cfg.seed = seed if seed is not None else cfg.seed
    target = out_dir or Path(cfg.out_dir)
    counts = make_sample(cfg, target, progress=sys.stderr.isatty())
    console.print(f"wrote {counts} to {target}")
    _print_stats(dataset_stats(target))


@data_app.command("import")
def data_import(
    source: str = typer.Argument(..., help="mbe | fashion200k | m5product"),
    source_path: str = typer.Argument(..., help="Input folder or file (local or gs://)."),
    out_dir: Path = typer.Option(Path("data/prepared"), help="Output dataset folder."),
    eval_fraction: float = typer.Option(0.2, help="Fraction of products held out for evaluation."),
    seed: int = typer.Option(0, help="Seed of the split assignment."),
) -> None:
    """Import a public dataset layout into the moon3 format."""
    from moon3.data.importers import import_dataset
    from moon3.data.stats import dataset_stats

    report = import_dataset(source, source_path, out_dir, eval_fraction=eval_fraction, seed=seed)
    console.print(f"imported: {report}")
    _print_stats(dataset_stats(out_dir))


@data_app.command("prepare")
def data_prepare(params: Path = ParamsOpt, overrides: list[str] = SetOpt) -> None:
    """The DVC `prepare` stage: make-sample or import, as params.yaml's data.source says."""
    from moon3.data.prepare import prepare

    cfg = _config(params, overrides).data
    try:
        stats = prepare(cfg, progress=sys.stderr.isatty())
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]prepare failed:[/red] {err}")
        raise typer.Exit(1) from None
    _print_stats(stats)


@data_app.command("stats")
def data_stats(
    root: Path = typer.Argument(Path("data/prepared"), help="Dataset folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Per-split counts, category and attribute distributions of a dataset."""
    from moon3.data.stats import dataset_stats

    stats = dataset_stats(root)
    if as_json:
        _print_json(stats)
    else:
        _print_stats(stats)


def _print_stats(stats: dict) -> None:
    table = Table("table", "total", "train", "eval", title="mbe3 dataset")
    for name in ("products", "queries"):
        s = stats[name]
        table.add_row(name, str(s["total"]), str(s.get("train", 0)), str(s.get("eval", 0)))
    out.print(table)
    out.print("query types: " + ", ".join(f"{k}={v}" for k, v in stats["query_types"].items()))
    out.print("category level 1: " + ", ".join(f"{k}={v}" for k, v in stats["category_level1"].items()))
    attrs = Table("attribute", "values", "top values", title="attributes")
    for key, counts in stats["attributes"].items():
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:4]
        attrs.add_row(key, str(len(counts)), ", ".join(f"{k} ({v})" for k, v in top))
    out.print(attrs)
    out.print(f"size on disk: {stats['bytes_on_disk'] / 1e6:.1f} MB")


# --- stage commands (validate, embed, train, evaluate, pipeline) are registered below, one block each ---


if __name__ == "__main__":
    app()
