"""What the UI shows of a step: previews, column schemas, the checks' verdicts and the change
set's figures."""

from __future__ import annotations

from typing import Any

import dagster as dg
import polars as pl

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.changes.diff import counts_by_op
from crisp_pipeline.changes.plan import request_plan
from crisp_pipeline.crisp.config import daily_quota_from_env
from crisp_pipeline.state.store import StateStore
from crisp_pipeline.sync.prepare import Plan
from crisp_pipeline.sync.reconcile import full_reconcile_cost

PREVIEW_ROWS = 25


def preview(frame: pl.DataFrame) -> dg.MetadataValue:
    head = frame.head(PREVIEW_ROWS).with_columns(
        (pl.col(c).cast(pl.List(pl.String)).list.join(", ") if isinstance(t, pl.List)
         else pl.col(c).cast(pl.String))
        for c, t in frame.schema.items()
        if not (t.is_numeric() or t == pl.Boolean or t == pl.String))
    columns = [dg.TableColumn(name, "string" if dtype == pl.String else str(dtype).lower())
               for name, dtype in head.schema.items()]
    return dg.MetadataValue.table(records=[dg.TableRecord(row) for row in head.to_dicts()],
                                  schema=dg.TableSchema(columns=columns))


def column_schema(frame: pl.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype))
                                   for name, dtype in frame.schema.items()])


def segment_verdict(accepted: int, rejected: pl.DataFrame) -> dg.AssetCheckResult:
    reasons = (dict(rejected.group_by("reason").len().iter_rows()) if rejected.height else {})
    return verdict_of(accepted, rejected_rows(rejected), reasons)


def verdict_of(accepted: int, bad: int, reasons: dict[str, int]) -> dg.AssetCheckResult:
    """segment_usable: an error when every row of a non-empty segment is rejected, a warning
    when some are or when the segment is empty."""
    if bad and not accepted:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR,
                                   description=f"all {bad} rows were rejected",
                                   metadata={"rejected_by_reason": reasons})
    if not bad and not accepted:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN,
                                   description="the segment is empty")
    return dg.AssetCheckResult(
        passed=bad == 0, severity=dg.AssetCheckSeverity.WARN,
        description=f"{bad} row(s) rejected, {accepted} accepted",
        metadata={"rejected_by_reason": reasons})


def change_set_metadata(store: StateStore, config: ActivationConfig, planned: Plan,
                         budget_left: int | None) -> dict[str, Any]:
    changes = planned.planned.change_set
    counts = counts_by_op(changes)
    plan = request_plan(changes, batch_size=config.batch_size,
                        daily_quota=daily_quota_from_env(), budget_left=budget_left)
    plan["full_reconcile"] = full_reconcile_cost(store, list(config.managed_columns))
    return {
        "dagster/row_count": changes.height,
        "dagster/column_schema": column_schema(changes),
        "dagster/table_name": f"{config.state_schema}.change_set",
        **{f"{op}s": n for op, n in counts.items()},
        "departures_held": planned.planned.held_departures,
        "requests_planned": plan["requests"],
        "requests_without_batching": plan["requests_without_batching"],
        "budget_left_today": plan["budget_left_today"] if plan["budget_left_today"]
        is not None else -1,
        "days_to_finish": plan["days_to_finish"],
        "request_plan": dg.MetadataValue.json(plan),
        "guards": planned.verdict.describe(),
        "preview": preview(changes),
    }


def rejected_rows(rejected: pl.DataFrame) -> int:
    return rejected.get_column("row_number").n_unique() if rejected.height else 0
