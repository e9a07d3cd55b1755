"""The Dagster face of an activation: resources, the factory that builds its assets, checks,
job, schedule and sensor, and the `CrispActivation` component that YAML instantiates.

Everything here is thin: reading, diffing, adopting and sending live in `changes/`, `state/`
and `sync/`, which do not import Dagster.
"""


import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from dagster_duckdb import DuckDBResource
from pydantic import Field, model_validator

from crisp_pipeline.activation import ActivationConfig, Mode
from crisp_pipeline.changes.diff import counts_by_op
from crisp_pipeline.changes.normalize import SegmentSchemaError
from crisp_pipeline.changes.plan import request_plan
from crisp_pipeline.crisp import CrispError, CrispSettings, SettingsError, StopRun
from crisp_pipeline.crisp.config import daily_quota_from_env
from crisp_pipeline.state import locks
from crisp_pipeline.state.budget import remaining_today
from crisp_pipeline.state.store import (STATE_URL_ENV, StateStore, StateUnavailable,
                                         connect_file, connect_state)
from crisp_pipeline.sync.client import ClientOptions
from crisp_pipeline.sync.prepare import (
    AdoptionReport,
    Plan,
    adopt_new_people,
    apply_configuration_changes,
    current_verdict,
    plan_change_set,
    rekey_moved_people,
    stage_segment,
)
from crisp_pipeline.sync.reconcile import (
    ReconcileReport,
    full_reconcile_cost,
    reconcile_snapshot,
)
from crisp_pipeline.sync.run import GuardRefusal, StaleChangeSet, apply_change_set
from crisp_pipeline.warehouse import SegmentSource, SegmentSourceError, segment_source

DEFAULT_DB = "data/crisp_pipeline.duckdb"
IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
               dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
               dg.DagsterRunStatus.CANCELING]
PREVIEW_ROWS = 25


# ---------------------------------------------------------------- resources


class CrispResource(dg.ConfigurableResource):
    """How to reach Crisp. The website, token pair, tier and quota are read from the CRISP_*
    environment variables when a run starts, so the token never enters Dagster's config,
    event log or UI."""

    max_in_flight: int = 16
    requests_per_second: float | None = None
    request_deadline_seconds: float = Field(
        default=30.0, gt=0, description="The longest one request may take, answer included, "
        "however slowly it trickles in (then it is retried or deferred).")

    def settings(self, website_id: str | None = None) -> CrispSettings:
        settings = CrispSettings.from_env()
        return dataclasses.replace(settings, website_id=website_id) if website_id else settings

    def client_options(self, deadline: float | None = None) -> ClientOptions:
        return ClientOptions(self.max_in_flight, self.requests_per_second,
                             self.request_deadline_seconds, deadline)

    def budget_left(self, connect) -> int | None:
        """Today's requests left for the configured token (no secret needed)."""
        token = os.environ.get("CRISP_TOKEN_IDENTIFIER")
        quota = daily_quota_from_env()
        return remaining_today(connect, token, quota) if token else None


class CrispRunOptions(dg.ConfigurableResource):
    """Per-run choices, set in the launchpad under `resources.crisp_run.config`."""

    dry_run: bool = False
    override_guards: bool = False
    lock_wait_seconds: float = 120.0
    sync_deadline_minutes: float | None = Field(
        default=None, gt=0, description="How long the sync may send; past it, what was not "
        "sent is deferred to the next run (recorded as `deferred`, reason `deadline`).")
    full_reconcile: bool = Field(
        default=False, description="Re-read every managed person in Crisp this run (its cost "
        "is in the change set's `request_plan` as `full_reconcile`), instead of the share of "
        "the day's budget the activation's `reconcile` settings allow.")


def pipeline_db(path: str | None = None) -> DuckDBResource:
    """The DuckDB file holding the default warehouse and every activation's state."""
    database = path or os.environ.get("CRISP_PIPELINE_DB") or DEFAULT_DB
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    return DuckDBResource(database=database)


def default_resources(db_path: str | None = None) -> dict[str, Any]:
    return {"crisp_db": pipeline_db(db_path), "crisp": CrispResource(),
            "crisp_run": CrispRunOptions()}


class StateUnavailableFailure(dg.Failure, StateUnavailable):
    """The state file cannot be opened: a step failure for Dagster, and still a
    `StateUnavailable` for the code that can wait it out (the budget, the sync's recording)."""


def _duckdb_config(db: DuckDBResource) -> dict:
    # the settings DuckDBResource.get_connection() opens the file with: DuckDB refuses a
    # second connection with other settings while the file is kept open in this process
    return {"custom_user_agent": "dagster", **db.connection_config}


def _duckdb_connector(db: DuckDBResource):
    """Connections to the resource's DuckDB file itself (the default warehouse), whatever
    holds the state."""
    return _failing_as_steps(connect_file(db.database, _duckdb_config(db)))


def _connector(db: DuckDBResource):
    """Connections to the state: the Postgres database of CRISP_PIPELINE_STATE_URL, else the
    resource's DuckDB file, opened as `state.store.open_duckdb` does (waiting out another
    writer's lock, failing at once on anything else); always closed or given back."""
    return _failing_as_steps(connect_state(db.database, _duckdb_config(db)))


def _failing_as_steps(connect):
    """`connect`, its `StateUnavailable` raised as a step failure."""

    @contextlib.contextmanager
    def guarded() -> Iterator[Any]:
        try:
            with connect() as connection:
                yield connection
        except StateUnavailable as error:
            raise StateUnavailableFailure(description=str(error)) from None

    @contextlib.contextmanager
    def kept_open() -> Iterator[None]:
        kept = contextlib.ExitStack()
        try:
            if hasattr(connect, "kept_open"):
                kept.enter_context(connect.kept_open())
        except StateUnavailable as error:
            raise StateUnavailableFailure(description=str(error)) from None
        with kept:
            yield

    guarded.kept_open = kept_open
    return guarded


def _store(db: DuckDBResource, config: ActivationConfig) -> StateStore:
    return StateStore(_connector(db), config.state_schema, config.resolved_website_id())


STEPS = ("segment", "crisp_snapshot", "change_set", "crisp_sync")


def _is_last_step(context: Any, config: ActivationConfig, step: str) -> bool:
    """Whether `step` is the last of the activation's steps this run executes (a run may
    select only some of them, or re-execute from a failed one)."""
    planned = context.run.step_keys_to_execute
    mine = [s for s in STEPS if planned is None or f"{config.name}__{s}" in planned]
    return not mine or mine[-1] == step


@contextlib.contextmanager
def _holding_activation(context: Any, db: DuckDBResource, config: ActivationConfig,
                        options: "CrispRunOptions", step: str) -> Iterator[None]:
    """Hold the activation's lock in the state store for this run (see `state.locks`); give
    it back when the step fails (the run goes no further) or when the run's last step ends."""
    connect, run_id = _connector(db), context.run.run_id
    try:
        locks.acquire(connect, config.name, run_id, wait_seconds=options.lock_wait_seconds,
                      run_active=_run_active(context))
    except locks.ActivationLocked as error:
        raise dg.Failure(description=str(error)) from None
    try:
        _keep_open_for_run(connect, run_id, config.name)
        yield
    except BaseException:
        _let_go(connect, config.name, run_id)
        raise
    if _is_last_step(context, config, step):
        _let_go(connect, config.name, run_id)


# The state file kept open from an activation's first step of a run to its last (steps run
# one after another in one process with the activation job's executor): see
# `state.store.file_kept_open`, which also lets it go while idle or after a long stretch, so
# that other processes get their turn.
_OPEN_FOR_RUN: dict[tuple[str, str], contextlib.ExitStack] = {}


def _keep_open_for_run(connect: Any, run_id: str, name: str) -> None:
    if (run_id, name) not in _OPEN_FOR_RUN:
        kept = contextlib.ExitStack()
        kept.enter_context(connect.kept_open())
        _OPEN_FOR_RUN[(run_id, name)] = kept


def _let_go(connect: Any, name: str, run_id: str) -> None:
    """The run goes no further: its lock is given back and its file let go."""
    try:
        locks.release(connect, name, run_id)
    finally:
        kept = _OPEN_FOR_RUN.pop((run_id, name), None)
        if kept is not None:
            kept.close()


def _run_active(context: Any):
    """Whether a run is in progress, as this Dagster instance knows it (None: unknown)."""
    def active(holder: str) -> bool | None:
        record = context.instance.get_run_by_id(holder.split("/")[0])
        return None if record is None else record.status in IN_PROGRESS
    return active


def _website_lock(context: Any, db: DuckDBResource, store: StateStore,
                  config: ActivationConfig, options: "CrispRunOptions"):
    """The website's lock (see `state.locks`): a mirror's deletes and adoptions by any
    activation on the website never overlap, even within one run ("Materialize all" runs
    every activation in one run), so it is held by the run *and* the activation."""
    def hold():
        return locks.holding(_connector(db), locks.website_lock_name(store.website_id or ""),
                             f"{context.run.run_id}/{config.name}",
                             wait_seconds=options.lock_wait_seconds,
                             run_active=_run_active(context))
    return hold


def _release_activation(context: Any, db: DuckDBResource, config: ActivationConfig) -> None:
    """A blocking check failed: the run stops here, so its lock is given back."""
    _let_go(_connector(db), config.name, context.run.run_id)


def _preview(frame: pl.DataFrame) -> dg.MetadataValue:
    head = frame.head(PREVIEW_ROWS).with_columns(
        (pl.col(c).cast(pl.List(pl.String)).list.join(", ") if isinstance(t, pl.List)
         else pl.col(c).cast(pl.String))
        for c, t in frame.schema.items()
        if not (t.is_numeric() or t == pl.Boolean or t == pl.String))
    columns = [dg.TableColumn(name, "string" if dtype == pl.String else str(dtype).lower())
               for name, dtype in head.schema.items()]
    return dg.MetadataValue.table(records=[dg.TableRecord(row) for row in head.to_dicts()],
                                  schema=dg.TableSchema(columns=columns))


def _column_schema(frame: pl.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype))
                                   for name, dtype in frame.schema.items()])


def _settings_factory(crisp: CrispResource, config: ActivationConfig):
    def settings() -> CrispSettings:
        try:
            return crisp.settings(config.website_id)
        except SettingsError as error:
            raise dg.Failure(description=f"Crisp settings: {error}") from None
    return settings


# ---------------------------------------------------------------- the factory


def _source_resource_keys(config: ActivationConfig) -> set[str]:
    """The user's warehouse resource a segment is read through, if any."""
    return {config.segment.resource_key} if config.segment.resource_key else set()


def _source_of(config: ActivationConfig, resources: Any) -> SegmentSource:
    resource = (getattr(resources, config.segment.resource_key)
                if config.segment.resource_key else None)
    return segment_source(config.segment, config.name, _duckdb_connector(resources.crisp_db),
                          needed=config.source_columns, resource=resource)


def _pipeline_resources(context: Any) -> tuple[DuckDBResource, CrispResource, CrispRunOptions]:
    resources = context.resources
    return resources.crisp_db, resources.crisp, resources.crisp_run


def _warehouse_kind(config: ActivationConfig) -> str:
    """The segment's kind tag: its warehouse (for a resource, what kind of resource)."""
    if config.segment.warehouse != "resource":
        return config.segment.warehouse
    return config.segment.resource_key or "warehouse"


def _state_kind() -> str:
    return "postgres" if os.environ.get(STATE_URL_ENV, "").strip() else "duckdb"



def build_activation_defs(config: ActivationConfig) -> dg.Definitions:
    """Assets, checks, job, schedule and sensor of one activation, keyed by its name."""
    name = config.name
    if os.environ.get(STATE_URL_ENV, "").strip():  # refused when the definitions load
        from crisp_pipeline.state.postgres import check_name_lengths
        check_name_lengths(list(config.managed_columns), f"activation {name!r}: field")
    key = lambda asset: dg.AssetKey([name, asset])
    common = dict(group_name=name, pool=f"crisp_{name}", owners=[],
                  tags={"crisp/mode": config.mode.value})

    # The steps that may read the source name their resources in the decorator (not as
    # parameters): a segment read through the user's own warehouse resource needs a resource
    # key known only from the configuration (`segment.resource_key`).
    reading = {"crisp_db", "crisp", "crisp_run", *_source_resource_keys(config)}

    def source(context: Any) -> SegmentSource:
        return _source_of(config, context.resources)

    upstream, external = source_asset(config)

    @dg.asset(key=key("segment"), kinds={_warehouse_kind(config), "polars"}, deps=[upstream],
              required_resource_keys=reading, **common,
              description=f"The people of segment {name!r}, normalised; bad rows split off "
              "with a reason (table `rejected`).")
    def segment(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        crisp_db, _, crisp_run = _pipeline_resources(context)
        with _holding_activation(context, crisp_db, config, crisp_run, "segment"):
            normalized = _stage(_store(crisp_db, config), config, source(context),
                                context.run.run_id)
        rejected_rows = _rejected_rows(normalized.rejected)
        return dg.MaterializeResult(metadata={
            "dagster/row_count": normalized.accepted_rows,
            "dagster/column_schema": _column_schema(normalized.accepted),
            "dagster/table_name": f"{config.state_schema}.segment",
            "source_rows": normalized.source_rows, "rejected_rows": rejected_rows,
            "rows_naming_nobody": normalized.unidentified.height,
            "rejected_preview": _preview(normalized.rejected),
        })

    @dg.asset_check(asset=key("segment"), blocking=True, name="segment_usable",
                    description="Fails when every row of a non-empty segment is rejected; "
                    "warns when some are.")
    def segment_usable(context: dg.AssetCheckExecutionContext,
                       crisp_db: DuckDBResource) -> dg.AssetCheckResult:
        result = _verdict(*_store(crisp_db, config).segment_counts())
        if not result.passed and result.severity == dg.AssetCheckSeverity.ERROR:
            _release_activation(context.op_execution_context, crisp_db, config)
        return result

    @dg.asset(key=key("crisp_snapshot"), deps=[segment], kinds={"crisp", _state_kind()},
              required_resource_keys=reading, **common,
              description="What Crisp holds for the people this activation manages, as last "
              "confirmed; people already in Crisp are adopted by email, never duplicated.")
    def crisp_snapshot(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        crisp_db, crisp, crisp_run = _pipeline_resources(context)
        store = _store(crisp_db, config)
        with _holding_activation(context, crisp_db, config, crisp_run, "crisp_snapshot"):
            prepare = _Preparation(context, store, config, crisp, crisp_db, crisp_run,
                                   source(context))
            prepare.through("segment")
            changes, rekeyed, report, reconciled = prepare.snapshot()
        for change in changes:
            context.log.warning(f"{name}: configuration change: {change}")
        if reconciled.gone or reconciled.edited:
            context.log.warning(
                f"{name}: reconcile found {reconciled.gone} people gone from Crisp and "
                f"{reconciled.edited} edited there (table `drift`); the change set puts "
                "them back as the source says")
        return dg.MaterializeResult(metadata={
            "dagster/row_count": store.count("snapshot"),
            "dagster/table_name": f"{config.state_schema}.snapshot",
            "website_id": store.website_id or "",
            "configuration_changes": dg.MetadataValue.json(changes),
            "rekeyed": rekeyed, "looked_up": report.looked_up, "adopted": report.adopted,
            "adoption_conflicts": report.conflicts,
            "lookups_unanswered": report.unanswered, "lookup_method": report.method,
            "requests_sent": report.stats.sent + reconciled.stats.sent,
            "reconcile": dg.MetadataValue.json(reconciled.as_metadata()),
        })

    @dg.asset(key=key("change_set"), deps=[crisp_snapshot], kinds={"polars", _state_kind()},
              required_resource_keys=reading, **common, description="Per person: create, update (changed fields, old and new "
              "values), delete, release or skip (with the reason). History in "
              "`change_set_history`.")
    def change_set(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        crisp_db, crisp, crisp_run = _pipeline_resources(context)
        store = _store(crisp_db, config)
        with _holding_activation(context, crisp_db, config, crisp_run, "change_set"):
            prepare = _Preparation(context, store, config, crisp, crisp_db, crisp_run,
                                   source(context))
            prepare.through("crisp_snapshot")
            planned = prepare.change_set()
            return dg.MaterializeResult(metadata={
                **_change_set_metadata(store, config, planned,
                                       crisp.budget_left(_connector(crisp_db))),
                "configuration_changes": dg.MetadataValue.json(
                    store.configuration_changes(context.run.run_id))})

    @dg.asset_check(asset=key("change_set"), blocking=True, name="mirror_guards",
                    description="Mirror refuses an empty segment and deletions beyond "
                    "max_deletes / max_delete_fraction (in the run and over the rolling "
                    "window), unless the run overrides its guards.")
    def mirror_guards(context: dg.AssetCheckExecutionContext, crisp_db: DuckDBResource,
                      crisp_run: CrispRunOptions) -> dg.AssetCheckResult:
        verdict = current_verdict(_store(crisp_db, config), config)
        overridden = not verdict.passed and crisp_run.override_guards
        if not (verdict.passed or overridden):
            _release_activation(context.op_execution_context, crisp_db, config)
        return dg.AssetCheckResult(
            passed=verdict.passed or overridden, severity=dg.AssetCheckSeverity.ERROR,
            description=("guards overridden for this run: " if overridden else "")
            + verdict.describe(),
            metadata={"deletes": verdict.deletes, "managed": verdict.managed,
                      "deleted_in_window": verdict.deleted_in_window,
                      "delete_fraction": round(verdict.fraction, 4),
                      "override_guards": crisp_run.override_guards})

    @dg.asset(key=key("crisp_sync"), deps=[change_set], kinds={"crisp", "api"},
              required_resource_keys=reading, **common,
              description="Applies this run's change set to Crisp; only confirmed writes enter "
              "the snapshot. Per-person outcomes in table `outcomes`.")
    def crisp_sync(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        crisp_db, crisp, crisp_run = _pipeline_resources(context)
        store, run_id = _store(crisp_db, config), context.run.run_id

        def progress(done: int, total: int, seconds: float) -> None:
            rate = done / seconds if seconds else 0.0
            eta = (total - done) / rate if rate else 0.0
            context.log.info(f"{name}: {done}/{total} people, {rate:.1f}/s, ETA {eta:.0f}s")

        with _holding_activation(context, crisp_db, config, crisp_run, "crisp_sync"):
            prepare = _Preparation(context, store, config, crisp, crisp_db, crisp_run,
                                   source(context))
            recomputed = prepare.through("change_set")
            try:
                deadline = (time.monotonic() + crisp_run.sync_deadline_minutes * 60
                            if crisp_run.sync_deadline_minutes else None)
                report = apply_change_set(
                    store, config, run_id, _settings_factory(crisp, config),
                    crisp.client_options(deadline), _connector(crisp_db),
                    dry_run=crisp_run.dry_run,
                    verdict=current_verdict(store, config),
                    override_guards=crisp_run.override_guards, progress=progress,
                    heartbeat=lambda: locks.heartbeat(_connector(crisp_db), name, run_id),
                    website_lock=_website_lock(context, crisp_db, store, config, crisp_run))
            except (GuardRefusal, StaleChangeSet, CrispError, locks.ActivationLocked) as error:
                raise dg.Failure(description=str(error)) from None
        return dg.MaterializeResult(metadata={
            **{k: (dg.MetadataValue.json(v) if isinstance(v, dict) else v)
               for k, v in report.as_metadata().items()},
            "recomputed_change_set": recomputed,
            "dagster/table_name": f"{config.state_schema}.outcomes",
        })

    @dg.asset_check(asset=key("crisp_sync"), name="no_failed_writes",
                    description="Warns when Crisp refused or deferred some writes of the run "
                    "(they are retried next run; see table `outcomes`).")
    def no_failed_writes(context: dg.AssetCheckExecutionContext,
                         crisp_db: DuckDBResource) -> dg.AssetCheckResult:
        by_reason = _store(crisp_db, config).failed_outcomes(
            context.op_execution_context.run.run_id)
        failed = sum(by_reason.values())
        return dg.AssetCheckResult(passed=not failed, severity=dg.AssetCheckSeverity.WARN,
                                   description=f"{failed} write(s) refused or deferred",
                                   metadata={"by_reason": by_reason})

    assets = [segment, crisp_snapshot, change_set, crisp_sync]
    checks = [segment_usable, mirror_guards, no_failed_writes]
    job = dg.define_asset_job(
        name=f"{name}_job", selection=dg.AssetSelection.assets(*assets),
        executor_def=dg.in_process_executor, tags={"crisp/activation": name},
        description=f"Sync segment {name!r} to Crisp ({config.mode.value}).")
    schedules = [_schedule(config, job)] if config.schedule else []
    sensors = [_source_sensor(config, job)] if config.segment.watermark_sql else []
    return dg.Definitions(assets=[*external, *assets], asset_checks=checks, jobs=[job],
                          schedules=schedules, sensors=sensors)


DEFAULT_SCHEMAS = {"postgres": "public", "duckdb": "main"}


def source_asset(config: ActivationConfig) -> tuple[dg.AssetKey, list[dg.AssetSpec]]:
    """What the segment reads, upstream of it in the graph: the user's own asset when the
    activation names it (`segment.upstream`, e.g. a dbt model), else an external asset for
    the table (`<warehouse>/<schema>/<table>`; two activations reading one table share it) or
    for the query (`<warehouse>/<activation>_query`)."""
    segment = config.segment
    if segment.upstream:
        if segment.upstream[0] == config.name and segment.upstream[1:] in ([s] for s in STEPS):
            raise ValueError(f"activation {config.name!r}: segment.upstream names one of its "
                             "own assets; name the asset the segment reads")
        return dg.AssetKey(segment.upstream), []
    where = _warehouse_kind(config)
    if segment.table:
        parts = segment.table.split(".")
        if len(parts) == 2 and parts[0] == DEFAULT_SCHEMAS.get(segment.warehouse):
            parts = parts[1:]  # `public.customers` and `customers` are one table
        key = dg.AssetKey([where, *parts])
        description = f"Table {segment.table} in {where}, read by segments."
    else:
        key = dg.AssetKey([where, f"{config.name}_query"])
        description = (f"The rows the segment query of {config.name!r} reads in "
                       f"{where}:\n\n```sql\n{segment.sql}\n```")
    return key, [dg.AssetSpec(key, kinds={where}, description=description)]


def _stage(store: StateStore, config: ActivationConfig, source: SegmentSource, run_id: str):
    try:
        return stage_segment(store, config, source, run_id)
    except (SegmentSourceError, SegmentSchemaError) as error:
        raise dg.Failure(description=str(error)) from None


def _segment_verdict(accepted: int, rejected: pl.DataFrame) -> dg.AssetCheckResult:
    reasons = (dict(rejected.group_by("reason").len().iter_rows()) if rejected.height else {})
    return _verdict(accepted, _rejected_rows(rejected), reasons)


def _verdict(accepted: int, bad: int, reasons: dict[str, int]) -> dg.AssetCheckResult:
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


class _Preparation:
    """The steps before a sync, for one run. A step uses only what earlier steps of its own
    run left in the state: when one of them did not run in this run (a re-execution from
    failure, a selection of assets, a dry run in between), it is done again, from the source
    and Crisp as they are now, and so is everything after it."""

    def __init__(self, context: Any, store: StateStore, config: ActivationConfig,
                 crisp: CrispResource, crisp_db: DuckDBResource, options: CrispRunOptions,
                 source: SegmentSource) -> None:
        self.context, self.store, self.config = context, store, config
        self.crisp, self.crisp_db, self.options, self.source = crisp, crisp_db, options, source
        self.run_id = context.run.run_id

    def through(self, step: str) -> bool:
        """Redo every step up to `step` that this run did not do; True when any was redone."""
        stages = {"segment": "segment", "crisp_snapshot": "snapshot", "change_set": "change_set"}
        redo = False
        for name in STEPS[:STEPS.index(step) + 1]:
            if not redo and self.store.stage_run(stages[name]) == self.run_id:
                continue
            if not redo:
                self.context.log.warning(
                    f"{self.config.name}: {name} was not done by this run; doing it again "
                    "from the source and Crisp as they are now")
            redo = True
            if name == "segment":
                normalized = _stage(self.store, self.config, self.source, self.run_id)
                verdict = _segment_verdict(normalized.accepted_rows, normalized.rejected)
                if not verdict.passed and verdict.severity == dg.AssetCheckSeverity.ERROR:
                    raise dg.Failure(description=f"segment_usable: {verdict.description}")
            elif name == "crisp_snapshot":
                self.snapshot()
            else:
                self.change_set()
        return redo

    def snapshot(self) -> tuple[list[str], int, AdoptionReport, ReconcileReport]:
        """Configuration changes, re-keyed people, adoption of the people still unknown, then
        a reconcile of the people managed (within its allowance, or in full when asked)."""
        store, config = self.store, self.config
        if not store.website_id:
            raise dg.Failure(description=f"activation {config.name!r}: no Crisp website: set "
                             "`website_id` or CRISP_WEBSITE_ID")
        changes = apply_configuration_changes(store, config, self.run_id,
                                              self.options.dry_run)
        rekeyed, report = 0, AdoptionReport()
        if store.has_arrivals():  # (re-keying and adoption both start from the arrivals)
            rekeyed = rekey_moved_people(store)
            try:
                report = adopt_new_people(
                    store, config, _settings_factory(self.crisp, config),
                    self.crisp.client_options(), _connector(self.crisp_db),
                    _website_lock(self.context, self.crisp_db, store, config, self.options))
            except StopRun as error:
                raise dg.Failure(description=str(error)) from None
            except locks.ActivationLocked as error:
                raise dg.Failure(description=str(error)) from None
        try:
            reconciled = reconcile_snapshot(
                store, list(config.managed_columns), config.reconcile, self.run_id,
                _settings_factory(self.crisp, config),
                self.crisp.client_options(), _connector(self.crisp_db),
                full=self.options.full_reconcile)
        except StopRun as error:
            raise dg.Failure(description=str(error)) from None
        store.mark_stage("snapshot", self.run_id)
        return changes, rekeyed + report.rekeyed, report, reconciled

    def change_set(self) -> Plan:
        return plan_change_set(self.store, self.config, self.run_id,
                               override_guards=self.options.override_guards)


def _change_set_metadata(store: StateStore, config: ActivationConfig, planned: Plan,
                         budget_left: int | None) -> dict[str, Any]:
    changes = planned.planned.change_set
    counts = counts_by_op(changes)
    plan = request_plan(changes, batch_size=config.batch_size,
                        daily_quota=daily_quota_from_env(), budget_left=budget_left)
    plan["full_reconcile"] = full_reconcile_cost(store, list(config.managed_columns))
    return {
        "dagster/row_count": changes.height,
        "dagster/column_schema": _column_schema(changes),
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
        "preview": _preview(changes),
    }


def _rejected_rows(rejected: pl.DataFrame) -> int:
    return rejected.get_column("row_number").n_unique() if rejected.height else 0


def _schedule(config: ActivationConfig, job: Any) -> dg.ScheduleDefinition:
    @dg.schedule(name=f"{config.name}_schedule", cron_schedule=config.schedule, job=job,
                 description=f"Syncs {config.name!r} on {config.schedule!r}; skips a tick "
                 "while a run of the activation is still in progress.")
    def schedule(context: dg.ScheduleEvaluationContext):
        running = context.instance.get_run_records(
            dg.RunsFilter(job_name=job.name, statuses=IN_PROGRESS), limit=1)
        if running:
            return dg.SkipReason(f"a run of {job.name} is still in progress "
                                 f"({running[0].dagster_run.run_id})")
        return dg.RunRequest(tags={"crisp/trigger": "schedule"})
    return schedule


def _source_sensor(config: ActivationConfig, job: Any) -> dg.SensorDefinition:
    @dg.sensor(name=f"{config.name}_source_sensor", job=job, minimum_interval_seconds=60,
               required_resource_keys={"crisp_db", *_source_resource_keys(config)},
               description=f"Syncs {config.name!r} when its watermark query's value changes "
               "(to any value, including one seen before).")
    def source_sensor(context: dg.SensorEvaluationContext):
        try:
            watermark = _source_of(config, context.resources).watermark()
        except SegmentSourceError as error:
            return dg.SkipReason(str(error))
        if watermark is None:
            return dg.SkipReason("the watermark query returned no value")
        last, changes = _sensor_cursor(context.cursor)
        if watermark == last:
            return dg.SkipReason(f"source unchanged (watermark {watermark})")
        running = context.instance.get_run_records(
            dg.RunsFilter(job_name=job.name, statuses=IN_PROGRESS), limit=1)
        if running:
            return dg.SkipReason("a run is in progress; the change will be seen next tick")
        context.update_cursor(json.dumps({"watermark": watermark, "changes": changes + 1}))
        # the key counts changes: a watermark back to an old value (its newest row deleted)
        # is a change too, which a key made of the value alone would swallow
        return dg.RunRequest(run_key=f"{config.name}:change-{changes + 1}",
                             tags={"crisp/trigger": "source_sensor", "crisp/watermark": watermark})
    return source_sensor


def _sensor_cursor(cursor: str | None) -> tuple[str | None, int]:
    """(last watermark, changes seen) from the sensor's cursor (a bare watermark: older)."""
    if not cursor:
        return None, 0
    try:
        state = json.loads(cursor)
    except ValueError:
        return cursor, 0
    if not isinstance(state, dict):
        return cursor, 0
    return state.get("watermark"), int(state.get("changes", 0))


# ---------------------------------------------------------------- the component


class CrispActivation(dg.Component, dg.Model, dg.Resolvable):
    """One segment synced to one Crisp website in one mode (see the README for the fields)."""

    name: str
    segment: dict[str, str | float | list[str]]
    identifier: str | dict[str, str] = "email"
    mode: str = "upsert"
    fields: dict[str, str] = {}
    attributes: list[str | dict[str, str]] = []
    website_id: str | None = None
    schedule: str | None = None
    guards: dict[str, float] = {}
    mirror: dict[str, str | bool | float] = {}
    reconcile: dict[str, float] = {}
    order: list[str] | None = None
    batch_size: int | None = None
    history_days: float | None = None

    @model_validator(mode="after")
    def _valid(self) -> "CrispActivation":
        self.activation()  # refuse a bad configuration when the definitions load
        return self

    def activation(self) -> ActivationConfig:
        values = self.model_dump(exclude_none=True)
        for section in ("guards", "mirror", "reconcile"):
            if not values.get(section):
                values.pop(section, None)
        return ActivationConfig.model_validate(values)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return build_activation_defs(self.activation())


__all__ = ["CrispActivation", "CrispResource", "CrispRunOptions", "Mode",
           "build_activation_defs", "default_resources", "pipeline_db"]
