"""Run the checks as Great Expectations 1.x suites on the check frames (ephemeral context, pandas).

GX is imported here and only here, lazily (5-7 s). Speed notes, measured on 1M rows (GX 1.24):

* One suite per check-frame column, each validated on a one-column frame: column-map
  expectations filter the whole batch frame per metric (a full copy each time), so a 13-column frame costs
  ~40 % more than 13 one-column frames.
* Results in ``SUMMARY`` format without ``unexpected_index_column_names``: GX then reports row positions,
  which the gate maps to ids (with index columns GX builds a dict per unexpected row: ~55 us each).
* ``ExpectColumnValuesToBeBetween`` is vectorised only for int64/float64 columns; the check frames use those.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from moon3.validation.checks import INFO, ROW, Check

SEVERITY = {ROW: "warning", INFO: "info"}  # table-level rules keep GX's default, "critical"


def run_suites(
    table: str, frame: pd.DataFrame, checks: list[Check], partial_count: int, progress: bool = False
) -> list[Any]:
    """Validate ``frame`` against ``checks``; one GX suite per check-frame column.

    Args:
        table: products or queries; prefixes the data source, asset and suite names.
        frame: the check frame (default RangeIndex: unexpected indexes are row positions).
        checks: the rules; each expectation gets ``meta={"check": name, "level": level, ...}``.
        partial_count: how many unexpected values / positions GX keeps per expectation.
        progress: a progress bar over the suites (GX's own bars stay off).

    Returns:
        The ``ExpectationSuiteValidationResult`` of each suite, in the order of first use of its column.
    """
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    # One asset and batch definition serve every column: the frame itself is passed at run time.
    batch = context.data_sources.add_pandas(f"moon3_{table}").add_dataframe_asset(table)
    batch = batch.add_batch_definition_whole_dataframe("all_rows")
    groups: dict[str, list[Any]] = {}
    for check in checks:
        expectation = check.expectation(gx.expectations)
        expectation.meta = {"check": check.name, "level": check.level, "description": check.description}
        expectation.severity = SEVERITY.get(check.level, "critical")
        # Table-level rules without a column (row count) ride along with the first column's suite.
        groups.setdefault(check.column or frame.columns[0], []).append(expectation)
    frame = frame.reset_index(drop=True)
    results = []
    for column, expectations in tqdm(groups.items(), desc=f"GX {table}", disable=not progress):
        name = f"{table}.{column}"
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        results.append(
            definition.run(
                batch_parameters={"dataframe": frame[_columns(column, expectations)]},
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": partial_count},
            )
        )
    return results


def _columns(column: str, expectations: list[Any]) -> list[str]:
    """The check-frame columns a group of expectations reads (column pairs read two)."""
    names = [column]
    for expectation in expectations:
        for attr in ("column", "column_A", "column_B"):
            value = getattr(expectation, attr, None)
            if value and value not in names:
                names.append(value)
    return names


def _import_gx():
    # GX logs every datasource/asset it adds on some versions; the gate writes its own report.
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx

    return gx
