"""``moon3 data fetch-images``: the data commands that live with the data package (registered under ``data``).

Its options are plain CLI options (the same defaults as :class:`moon3.data.fetch.FetchSettings`), not a
``params.yaml`` section: fetching is a one-off step before ``moon3 data import`` / ``prepare``, not a stage.
"""

from __future__ import annotations

from pathlib import Path

import typer

from moon3.common.cli import console, print_json


def fetch_images_cmd(
    path: Path = typer.Argument(..., help="A dataset folder (products.parquet, ...) or an importer input file/folder."),
    out_dir: Path = typer.Option(
        None, "--out", help="Importer input: folder for the fetched copy (the input is never modified)."
    ),
    concurrency: int = typer.Option(16, help="Requests in flight at once."),
    timeout_s: float = typer.Option(30.0, "--timeout", help="Seconds per attempt (connect, headers and body)."),
    retries: int = typer.Option(3, help="Retries on 408, 429, 5xx, timeouts and dropped connections."),
    backoff_s: float = typer.Option(1.0, "--backoff", help="First backoff ceiling in seconds (doubles, full jitter)."),
    backoff_max_s: float = typer.Option(60.0, "--backoff-max", help="Ceiling of every wait, Retry-After included."),
    max_mb: float = typer.Option(20.0, "--max-mb", help="Largest image in MB (10^6 bytes); larger ones fail."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry URLs that failed in an earlier run."),
    allow_octet_stream: bool = typer.Option(
        False, "--allow-octet-stream", help="Also accept application/octet-stream or no Content-Type (still decoded)."
    ),
) -> None:
    """Download the http(s) image URLs of a catalog into local files (resumable; see fetch_report.json)."""
    from moon3.data.fetch import FetchSettings, fetch_images  # here: `moon3 --help` need not load aiohttp

    settings = FetchSettings(
        concurrency=concurrency,
        timeout_s=timeout_s,
        max_retries=retries,
        backoff_base_s=backoff_s,
        backoff_max_s=backoff_max_s,
        max_bytes=int(max_mb * 1_000_000),
        retry_failed=retry_failed,
        allow_octet_stream=allow_octet_stream,
    )
    try:
        report = fetch_images(path, out_dir, settings, progress=True)
    except (ValueError, FileNotFoundError) as err:  # ImportFormatError is a ValueError
        console.print(f"[red]fetch-images failed:[/red] {err}", soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"fetch-images: {report}", markup=False, highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    print_json({k: v for k, v in report.to_dict().items() if k not in ("settings", "failure_examples", "notes")})
    console.print(f"report: {Path(report.out_dir) / 'fetch_report.json'}", markup=False, soft_wrap=True)


def register(data_app: typer.Typer) -> None:
    """Add ``fetch-images`` to the ``moon3 data`` group."""
    data_app.command("fetch-images")(fetch_images_cmd)
