"""The ``moon3`` command line: one sub-command per stage, all configured from ``params.yaml``.

Every command takes ``--params`` (default ``params.yaml``) and repeatable ``--set section.key=value``
overrides; DVC stages and KFP components call the same library functions with the same config.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.table import Table

from moon3.common.cli import ParamsOpt, SetOpt, config_or_exit, console, out, print_json
from moon3.config import help_table


class Moon3App(typer.Typer):
    """The ``moon3`` command: every error ends as one readable line and a non-zero exit.

    An unexpected exception prints ``moon3: error: <type>: <message>`` (URIs redacted) and exits 1; ``--debug``
    anywhere on the command line (or ``MOON3_DEBUG=1``) shows the full traceback instead.
    """

    def __call__(self, *args, **kwargs):
        debug = "--debug" in sys.argv or os.environ.get("MOON3_DEBUG") == "1"
        if "--debug" in sys.argv:
            sys.argv.remove("--debug")
        if debug:
            return super().__call__(*args, **kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except KeyboardInterrupt:
            print("moon3: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as err:  # noqa: BLE001 - the last resort: one line instead of a traceback
            from moon3.common.redact import redact_text

            message = redact_text(" ".join(str(err).split()))[:1000]
            print(f"moon3: error: {type(err).__name__}: {message} (--debug shows the traceback)", file=sys.stderr)
            raise SystemExit(1) from None


app = Moon3App(help="moon3: reasoning-aware multimodal product embeddings.", no_args_is_help=True,
               pretty_exceptions_enable=False)  # fmt: skip
data_app = typer.Typer(help="Make, import and inspect datasets.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(params: Path = ParamsOpt, overrides: list[str] = SetOpt) -> None:
    """Print the resolved configuration (params.yaml + overrides) as JSON."""
    print_json(config_or_exit(params, overrides).to_dict())


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
    scale: int = typer.Option(None, help="N copies of the catalog with resampled text (default: data.scale)."),
    seed: int = typer.Option(None, help="Generator seed (default: data.seed)."),
) -> None:
    """Generate the mbe3-mini sample dataset."""
    from moon3.data.mini import make_sample
    from moon3.data.stats import dataset_stats

    cfg = config_or_exit(params, overrides).data
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
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    out_dir: Path = typer.Option(None, help="Output dataset folder (default: data.out_dir)."),
    eval_fraction: float = typer.Option(
        None, help="Fraction of products held out for evaluation (default: data.eval_fraction)."
    ),
    seed: int = typer.Option(None, help="Seed of the split assignment (default: data.seed)."),
) -> None:
    """Import a public dataset layout into the moon3 format, as the `prepare` stage does (params.yaml's data
    settings; import_report.json and stats.json beside the tables)."""
    from moon3.data.prepare import import_source, write_stats

    cfg = config_or_exit(params, overrides).data
    cfg.source, cfg.source_path = source, source_path
    cfg.out_dir = str(out_dir) if out_dir is not None else cfg.out_dir
    cfg.eval_fraction = eval_fraction if eval_fraction is not None else cfg.eval_fraction
    cfg.seed = seed if seed is not None else cfg.seed
    try:
        report = import_source(cfg)
    except (ValueError, FileNotFoundError) as err:  # ImportFormatError is a ValueError
        console.print(f"[red]import failed:[/red] {err}", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"imported: {report}", markup=False, highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    _print_stats(write_stats(cfg.out_dir))


@data_app.command("fingerprint")
def data_fingerprint(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    out_path: Path = typer.Option(Path("data/source_fingerprint.json"), "--out", help="Where to write it."),
) -> None:
    """The DVC `source` stage: fingerprint data.source_path, so `prepare` re-runs when the catalog changes."""
    from moon3.data.fingerprint import write_fingerprint

    cfg = config_or_exit(params, overrides).data
    try:
        fingerprint = write_fingerprint(cfg, out_path)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]fingerprint failed:[/red] {err}", soft_wrap=True)
        raise typer.Exit(1) from None
    files = f", {fingerprint['files']} files, {fingerprint['bytes']} bytes" if "files" in fingerprint else ""
    line = f"source {fingerprint['source']} ({fingerprint['kind']}{files}): {out_path}"
    console.print(line, markup=False, highlight=False, soft_wrap=True)


@data_app.command("prepare")
def data_prepare(params: Path = ParamsOpt, overrides: list[str] = SetOpt) -> None:
    """The DVC `prepare` stage: make-sample or import, as params.yaml's data.source says."""
    from moon3.data.prepare import prepare

    cfg = config_or_exit(params, overrides).data
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
        print_json(stats)
    else:
        _print_stats(stats)


STATS_TOP_CATEGORIES = 12  # names printed per category level (the most frequent); --json has them all


def _print_stats(stats: dict) -> None:
    table = Table("table", "total", "train", "eval", title="mbe3 dataset")
    for name in ("products", "queries"):
        s = stats[name]
        table.add_row(name, str(s["total"]), str(s.get("train", 0)), str(s.get("eval", 0)))
    out.print(table)
    out.print("query types: " + (", ".join(f"{k}={v}" for k, v in stats["query_types"].items()) or "none"))
    if not stats["queries"]["total"]:
        out.print(
            "[yellow]notice: no queries. Training will use intra-product pairs (each product's title + attributes "
            "vs its image, CLIP-style); evaluation measures text->image, image->text and zero-shot classification, "
            "and skips the query-based retrieval tasks. Add queries (query_text and/or query_image with a "
            "positive_product_id) to train and measure query retrieval.[/yellow]"
        )
    levels = stats.get("category_levels") or {"1": stats["category_level1"]}
    for level, counts in levels.items():
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{k}={v}" for k, v in top[:STATS_TOP_CATEGORIES])
        more = f", ... (+{len(top) - STATS_TOP_CATEGORIES} more)" if len(top) > STATS_TOP_CATEGORIES else ""
        values = f"{len(counts)} value{'' if len(counts) == 1 else 's'}"
        out.print(f"category level {level} ({values}): {shown}{more}", markup=False, highlight=False)
    attrs = Table("attribute", "values", "top values", title="attributes")
    for key, counts in stats["attributes"].items():
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:4]
        attrs.add_row(key, str(len(counts)), ", ".join(f"{k} ({v})" for k, v in top))
    out.print(attrs)
    out.print(f"size on disk: {stats['bytes_on_disk'] / 1e6:.1f} MB")


# --- stage commands (validate, embed, train, evaluate, pipeline) are registered below, one block each ---


# --- train ---------------------------------------------------------------------------------------------------
train_app = typer.Typer(help="Training stages.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("contrastive")
def train_contrastive_cmd(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    data_dir: Path = typer.Option(None, help="Validated dataset (default: validation.out_dir)."),
    out_dir: Path = typer.Option(None, help="Model output folder (default: train.out_dir)."),
    report_dir: Path = typer.Option(None, help="Metrics and plots folder (default: train.report_dir)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint."),
    allow_config_change: bool = typer.Option(
        False,
        "--allow-config-change",
        help="With --resume: accept model/train settings that differ from the "
        "checkpoint's (each change is printed and tagged on the MLflow run).",
    ),
    ablation: str = typer.Option(
        None, help="Train an ablation instead (no_fusion | no_fire | no_reasoning) into models/ablations/NAME."
    ),
) -> None:
    """Stage A: contrastive pretraining (InfoNCE with hard negatives). Launch with torchrun for several processes."""
    from moon3.train.ablations import ablation_overrides
    from moon3.train.contrastive import train_contrastive

    if ablation:
        try:
            # The ablation's switch and folders first, so an explicit --set still wins.
            overrides = [*ablation_overrides(ablation), *(overrides or [])]
        except ValueError as err:
            console.print(f"[red]--ablation:[/red] {err}")
            raise typer.Exit(2) from None
    from moon3.train.checkpoint import ResumeError

    cfg = config_or_exit(params, overrides)
    try:
        summary = train_contrastive(
            cfg,
            data_dir or Path(cfg.validation.out_dir),
            out_dir=out_dir,
            report_dir=report_dir,
            resume=resume,
            progress=True,  # a bar on a terminal, plain timed lines otherwise (moon3.common.progress)
            allow_config_change=allow_config_change,
        )
    except ResumeError as err:
        console.print(f"[red]resume refused:[/red] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    if os.environ.get("RANK", "0") == "0":
        print_json(summary)


# --- embed ---------------------------------------------------------------------------------------------------
@app.command("embed")
def embed_cmd(
    table_path: Path = typer.Argument(..., help="products.parquet or queries.parquet of a dataset folder."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Output: .parquet (id + embedding) or .npy (+ .ids.json)."),
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    model_dir: str = typer.Option(
        None, "--model", "-m", help="Saved model folder or gs:// prefix (default: an untrained model from model.*)."
    ),
    table: str = typer.Option(None, help="products | queries (default: from the file name)."),
    batch_size: int = typer.Option(None, help="Items per forward (default: eval.batch_size)."),
    reasoning: bool = typer.Option(
        None, "--reasoning/--no-reasoning", help="Write a trace before embedding (default: the model's contract)."
    ),
) -> None:
    """Embed a products or queries table into an embeddings file."""
    from moon3.model.contract import ContractError
    from moon3.model.embed import embed_table
    from moon3.model.embedder import Moon3Embedder
    from moon3.model.items import catalog_texts

    cfg = config_or_exit(params, overrides)
    table = table or table_path.stem
    try:
        if model_dir:
            model = Moon3Embedder.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        else:
            console.print("no --model: embedding with an untrained model built from params.yaml (a baseline)")
            model = Moon3Embedder.from_config(cfg.model, catalog_texts(table_path.parent))
        path = embed_table(
            model,
            table_path,
            table,
            out_path,
            batch_size=batch_size or cfg.eval.batch_size,
            reasoning=reasoning,
            progress=sys.stderr.isatty(),
        )
    except (ValueError, FileNotFoundError, ContractError) as err:
        console.print(f"[red]embed failed:[/red] {err}")
        raise typer.Exit(1) from None
    console.print(f"wrote {path}")


# --- validate ------------------------------------------------------------------------------------------------
@app.command("validate")
def validate_cmd(params: Path = ParamsOpt, overrides: list[str] = SetOpt) -> None:
    """The DVC `validate` stage: the Great Expectations data gate (exit 1 when it fails)."""
    from moon3.validation.gate import validate

    cfg = config_or_exit(params, overrides).validation
    result = validate(cfg, progress=sys.stderr.isatty())
    counts = Table("table", "in", "accepted", "quarantined", "fraction", title="validation")
    for name in ("products", "queries"):
        m = result.metrics.get(name)
        if m:
            counts.add_row(name, str(m["rows_in"]), str(m["rows_accepted"]), str(m["rows_quarantined"]),
                           f"{m['reject_fraction']:.2%}")  # fmt: skip
    out.print(counts)
    if result.failures:
        failed = Table("table", "rule", "level", "count", "example ids", title="failed rules")
        failed.columns[1].no_wrap = True
        for f in result.failures:
            level = f"[red]{f.level}[/red]" if f.blocking else f.level
            failed.add_row(f.table, f.check, level, str(f.count), ", ".join(f.examples))
        out.print(failed)
        # The attribute rules name what offends (keys, key=value): one plain line each, blocking or not.
        for f in result.failures:
            if not f.blocking and f.check.endswith(("_attribute_key", "_attribute_value")):
                console.print(f"{f.table}: {f.check}: {f.message}", markup=False, highlight=False, soft_wrap=True)
    report = result.paths.get("html_report")
    if not result.passed:
        # One plain line per blocking failure too: narrow logs (DVC, CI) wrap the table's message column.
        for f in result.blocking:
            examples = f" (e.g. {', '.join(f.examples)})" if f.examples else ""
            console.print(f"{f.table}: {f.check}: {f.message}{examples}", markup=False, highlight=False, soft_wrap=True)
        console.print(
            f"[red]validation gate FAILED[/red] ({len(result.blocking)} blocking): see {report}", soft_wrap=True
        )
        raise typer.Exit(1)
    console.print(f"validation gate passed: accepted data in {result.out_dir}, report {report}", soft_wrap=True)


# --- evaluate ------------------------------------------------------------------------------------------------
@app.command("evaluate")
def evaluate_cmd(
    params: Path = ParamsOpt,
    overrides: list[str] = SetOpt,
    data_dir: Path = typer.Option(None, help="Dataset (default: validation.out_dir); its eval split is used."),
    out_dir: Path = typer.Option(None, help="Report folder (default: eval.out_dir)."),
) -> None:
    """MBE3.0-style zero-shot evaluation of every saved variant; prints the main table and the report path."""
    from moon3.eval.evaluate import run_evaluation

    cfg = config_or_exit(params, overrides)
    try:
        result = run_evaluation(cfg, data_dir, out_dir, progress=True)  # bar or plain lines (common.progress)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]evaluate failed:[/red] {err}")
        raise typer.Exit(1) from None
    typer.echo(result["table"])  # plain echo: a Markdown table must not be re-wrapped to the terminal width
    for name, reason in result["missing"].items():
        typer.echo(f"not evaluated: {name} ({reason})")
    _echo_reference_check(result)
    typer.echo(f"report: {result['paths']['html']}")


def _echo_reference_check(summary: dict) -> None:
    """The report's "below the non-learned references" block, as plain lines."""
    from moon3.eval.tables import below_reference_lines

    warning, lines = below_reference_lines(summary)
    typer.echo(("WARNING: below the non-learned references. " if warning else "") + lines[0])
    for line in lines[1:]:
        typer.echo(f"  - {line}")


@app.command("summary")
def summary_cmd(params: Path = ParamsOpt, overrides: list[str] = SetOpt) -> None:
    """What the last run produced: data counts, the validation gate, training, and the evaluation table."""
    from moon3.eval.tables import main_table_markdown

    cfg = config_or_exit(params, overrides)
    files = {
        "data": Path(cfg.data.out_dir) / "stats.json",
        "validation": Path(cfg.validation.report_dir) / "validation_metrics.json",
        "train": Path(cfg.train.report_dir) / "train_metrics.json",
        "eval": Path(cfg.eval.out_dir) / "results.json",
    }
    loaded = {k: json.loads(p.read_text()) for k, p in files.items() if p.exists()}
    if "data" in loaded:
        d = loaded["data"]
        typer.echo(f"data: {d['products']['total']} products, {d['queries']['total']} queries ({cfg.data.out_dir})")
    if "validation" in loaded:
        v = loaded["validation"]
        counts = ", ".join(
            f"{t}: {v[t]['rows_in']} in, {v[t]['rows_accepted']} accepted, {v[t]['rows_quarantined']} quarantined"
            for t in ("products", "queries")
            if t in v
        )
        typer.echo(f"validation: {'passed' if v.get('passed') else 'FAILED'} ({counts})")
    if "train" in loaded:
        t = loaded["train"]

        def number(key: str) -> str:  # a metric a run could not measure is absent (listed under `skipped`)
            return f"{t[key]:.3f}" if isinstance(t.get(key), int | float) else "not measured"

        from moon3.common.provenance import RUN_FILE

        run_file = Path(cfg.train.report_dir) / RUN_FILE  # wall-clock numbers, kept out of the DVC outputs
        speed = json.loads(run_file.read_text()).get("pairs_per_second") if run_file.exists() else None
        typer.echo(
            f"pretrain: {t.get('steps', '?')} steps, final InfoNCE {number('final_infonce')}, "
            f"{f'{speed:.1f}' if isinstance(speed, int | float) else 'unknown'} pairs/s, held-out text R@10 "
            f"{number('heldout_text_recall_at_10_init')} -> {number('heldout_text_recall_at_10')}"
        )
    if "eval" in loaded:
        typer.echo("\n" + main_table_markdown(loaded["eval"]))
        _echo_reference_check(loaded["eval"])
        typer.echo(f"\nreport: {Path(cfg.eval.out_dir) / 'report.html'}")
    missing = [str(p) for k, p in files.items() if k not in loaded]
    if missing:
        typer.echo("not produced yet: " + ", ".join(missing))


# --- stages that own their commands (moon3/<stage>/cli.py) -------------------------------------------------
def _register_stage_commands() -> None:
    from moon3.data.cli import register as register_data
    from moon3.model.cli import register as register_model
    from moon3.pipelines.cli import register as register_pipeline
    from moon3.registry.cli import register as register_registry
    from moon3.rl.cli import register as register_rl
    from moon3.serve.cli import register as register_serve
    from moon3.synthesis.cli import register as register_synthesis

    register_data(data_app)
    register_synthesis(app)
    register_rl(train_app)
    register_model(app)
    register_serve(app)
    register_registry(app)
    register_pipeline(app)


_register_stage_commands()


if __name__ == "__main__":  # `python -m moon3.cli` (torchrun, accelerate): after every command is registered
    app()
