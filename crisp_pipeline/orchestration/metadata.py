"""What the UI shows of a step: previews, column schemas, the checks' verdicts and the change
set's figures."""

from __future__ import annotations

import json
from typing import Any

import dagster as dg
import polars as pl

from crisp_pipeline.activation import ActivationConfig, Mode
from crisp_pipeline.changes.diff import counts_by_op
from crisp_pipeline.changes.guards import GuardVerdict
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


def guard_result(verdict: GuardVerdict, options: Any) -> dg.AssetCheckResult:
    """mirror_guards, as the change set's check: failed (ERROR) when the guards refuse and the
    run does not override them; the sync then refuses (see `crisp_sync`)."""
    overridden = not verdict.passed and options.override_guards
    return dg.AssetCheckResult(
        check_name="mirror_guards", passed=verdict.passed or overridden,
        severity=dg.AssetCheckSeverity.ERROR,
        description=("guards overridden for this run: " if overridden else "")
        + verdict.describe(),
        metadata=guard_counts(verdict) | {"override_guards": options.override_guards})


def guard_counts(verdict: GuardVerdict) -> dict[str, Any]:
    return {"deletes": verdict.deletes, "managed": verdict.managed,
            "deleted_in_window": verdict.deleted_in_window,
            "delete_fraction": round(verdict.fraction, 4)}


def refusal_of(result: Any, activation: str) -> str | None:
    """Why the activation's sync was refused in a run (the `refused` observation of its
    `crisp_sync`, keyed `[prefix..., activation, "crisp_sync"]`), or None."""
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.ASSET_OBSERVATION and \
                event.asset_key.path[-2:] == [activation, "crisp_sync"]:
            metadata = event.asset_observation_data.asset_observation.metadata
            if "refused" in metadata:
                return metadata["refused"].value
    return None


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


# skip reasons that come from the mode or from Crisp, not from a bad source row
MODE_SKIPS = {"not_in_crisp", "email_taken"}
PREVIEW_PER_OP = 8
PREVIEW_TEXT = 60  # characters of a value shown in the preview


def _short(value: object) -> str:
    text = "∅" if value is None else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= PREVIEW_TEXT else text[:PREVIEW_TEXT - 1] + "…"


def _differences(changed: list[str] | None, old: str | None, new: str | None) -> str:
    """`field: old → new` for each changed field (values as JSON, long ones cut)."""
    before = json.loads(old) if old else {}
    after = json.loads(new) if new else {}
    fields = changed or sorted(set(before) | set(after))
    return "; ".join(f"{field}: {_short(before.get(field))} → {_short(after.get(field))}"
                     for field in fields)


def change_set_preview(changes: pl.DataFrame, mode: Mode) -> dg.MetadataValue:
    """A preview a person can read in the panel: four narrow columns (identifier, op, what
    changes as `field: old → new`, why for a skip), up to PREVIEW_PER_OP people of each op,
    deletions first for a mirror. Everything else is one query away (the README)."""
    order = (["delete", "release", "create", "update", "skip"] if mode == Mode.MIRROR
             else ["create", "update", "delete", "release", "skip"])
    records = []
    for op in order:
        sample = changes.filter(pl.col("op") == op).head(PREVIEW_PER_OP)
        for row in sample.iter_rows(named=True):
            records.append(dg.TableRecord({
                "identifier": row["identifier"] or "", "op": op,
                "change": _differences(row.get("changed"), row.get("old_values"),
                                       row.get("new_values")) if op in ("create", "update")
                else "",
                "why": row.get("reason") or ""}))
    schema = dg.TableSchema(columns=[dg.TableColumn(c, "string")
                                     for c in ("identifier", "op", "change", "why")])
    return dg.MetadataValue.table(records=records, schema=schema)


def skips_by_reason(changes: pl.DataFrame) -> tuple[dict[str, int], dict[str, int]]:
    """(skips the mode or Crisp decided, by reason; skips of rejected source rows, by
    reason)."""
    skipped = changes.filter(pl.col("op") == "skip")
    counts = dict(skipped.group_by("reason").len().iter_rows()) if skipped.height else {}
    by_mode = {r: int(n) for r, n in counts.items() if r in MODE_SKIPS}
    rejected = {str(r): int(n) for r, n in counts.items() if r not in MODE_SKIPS}
    return by_mode, rejected


def change_set_metadata(store: StateStore, config: ActivationConfig, planned: Plan,
                        budget_left: int | None) -> dict[str, Any]:
    changes = planned.planned.change_set
    counts = counts_by_op(changes)
    plan = request_plan(changes, batch_size=config.batch_size,
                        daily_quota=daily_quota_from_env(), budget_left=budget_left)
    plan["full_reconcile"] = full_reconcile_cost(store, list(config.managed_columns))
    by_mode, rejected = skips_by_reason(changes)
    metadata: dict[str, Any] = {
        "dagster/row_count": changes.height,
        "dagster/column_schema": column_schema(changes),
        "dagster/table_name": f"{config.state_schema}.change_set",
        **{f"{op}s": n for op, n in counts.items()},
        "skipped_by_mode": sum(by_mode.values()),
        "skipped_rejected_rows": sum(rejected.values()),
        "requests_planned": plan["requests"],
        "requests_without_batching": plan["requests_without_batching"],
        "days_to_finish": plan["days_to_finish"],
        "request_plan": dg.MetadataValue.json(plan),
        "preview": change_set_preview(changes, config.mode),
    }
    if by_mode:
        metadata["skips_by_reason"] = dg.MetadataValue.json(by_mode)
    if rejected:
        metadata["rejected_by_reason"] = dg.MetadataValue.json(rejected)
    if plan["budget_left_today"] is not None:
        metadata["budget_left_today"] = plan["budget_left_today"]
    if config.mode == Mode.MIRROR:
        metadata["departures_held"] = planned.planned.held_departures
        metadata["guards"] = planned.verdict.describe()
    return metadata


def sync_metadata(values: dict[str, Any]) -> dict[str, Any]:
    """The sync's report as metadata: nothing empty (no blank reason, no `{}`), the change
    set's run as a link to it, dicts as JSON."""
    metadata: dict[str, Any] = {}
    for name, value in values.items():
        if value is None or value == "" or value == {} or value == []:
            continue
        if name == "change_set_run_id":
            metadata[name] = dg.MetadataValue.dagster_run(str(value))
        elif isinstance(value, (dict, list)):
            metadata[name] = dg.MetadataValue.json(value)
        else:
            metadata[name] = value
    return metadata


def rejected_rows(rejected: pl.DataFrame) -> int:
    return rejected.get_column("row_number").n_unique() if rejected.height else 0
