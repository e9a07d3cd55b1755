"""The factory of an activation's assets, checks and job, and the steps before a sync that a
step redoes when its own run did not do them."""


import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource

from crisp_pipeline import alerts
from crisp_pipeline.activation import ActivationConfig, Mode
from crisp_pipeline.changes.guards import GuardVerdict
from crisp_pipeline.changes.normalize import SegmentSchemaError
from crisp_pipeline.crisp import CrispError, StopRun
from crisp_pipeline.state import locks
from crisp_pipeline.state.store import STATE_URL_ENV, StateStore
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
from crisp_pipeline.sync.reconcile import ReconcileReport, reconcile_snapshot
from crisp_pipeline.sync.run import GuardRefusal, StaleChangeSet, apply_change_set
from crisp_pipeline.warehouse import SegmentSource, SegmentSourceError

from .automation import activation_schedule, failure_alert_sensor, watermark_sensor
from .metadata import (change_set_metadata, column_schema, guard_counts, guard_result, preview,
                       rejected_rows, segment_verdict, sync_metadata, verdict_of)
from .resources import (CrispResource, CrispRunOptions, pipeline_resources,
                        settings_factory, source_of, source_resource_keys, state_connector,
                        state_kind, state_store, warehouse_kind)
from .run_scope import (STEPS, holding_activation, release_activation, tag_refused,
                        website_lock)

@dataclasses.dataclass(frozen=True)
class AssetPresentation:
    """How an activation's assets appear in Dagster (from the component's YAML): keys under
    `key_prefix`, in `group_name` (default: the activation's name), with `owners`, `tags` and
    extra `kinds`. Nothing here changes what is synced."""

    key_prefix: tuple[str, ...] = ()
    group_name: str | None = None
    owners: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    kinds: tuple[str, ...] = ()


def build_activation_defs(config: ActivationConfig,
                          presentation: AssetPresentation = AssetPresentation()
                          ) -> dg.Definitions:
    """Assets, checks, job, schedule and sensor of one activation, keyed by its name."""
    name = config.name
    if os.environ.get(STATE_URL_ENV, "").strip():  # refused when the definitions load
        from crisp_pipeline.state.postgres import check_name_lengths
        check_name_lengths(list(config.managed_columns), f"activation {name!r}: field")
    key = lambda asset: dg.AssetKey([*presentation.key_prefix, name, asset])
    common = dict(group_name=presentation.group_name or name, pool=f"crisp_{name}",
                  owners=list(presentation.owners),
                  tags={**dict(presentation.tags), "crisp/mode": config.mode.value,
                        "crisp/activation": name})
    extra_kinds = set(presentation.kinds)

    # The steps that may read the source name their resources in the decorator (not as
    # parameters): a segment read through the user's own warehouse resource needs a resource
    # key known only from the configuration (`segment.resource_key`).
    reading = {"crisp_db", "crisp", "crisp_run", "crisp_alerts", *source_resource_keys(config)}

    def source(context: Any) -> SegmentSource:
        return source_of(config, context.resources)

    @contextlib.contextmanager
    def preparing(context: Any, step: str) -> Iterator[_Preparation]:
        """A step that may redo earlier ones: its run's hold on the activation, and what
        the earlier steps need (see `_Preparation`)."""
        crisp_db, crisp, crisp_run = pipeline_resources(context)
        with holding_activation(context, crisp_db, config, crisp_run, step):
            yield _Preparation(context, state_store(crisp_db, config), config, crisp, crisp_db,
                               crisp_run, source(context))

    upstream, external = source_asset(config)

    @dg.asset(key=key("segment"), kinds={warehouse_kind(config), "polars", *extra_kinds},
              deps=[upstream], required_resource_keys=reading, **common,
              description=f"The people of segment {name!r}, normalised; bad rows split off "
              "with a reason (table `rejected`).")
    def segment(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        crisp_db, _, crisp_run = pipeline_resources(context)
        with holding_activation(context, crisp_db, config, crisp_run, "segment"):
            normalized = _stage(state_store(crisp_db, config), config, source(context),
                                context.run.run_id)
        rejected_count = rejected_rows(normalized.rejected)
        return dg.MaterializeResult(metadata={
            "dagster/row_count": normalized.accepted_rows,
            "dagster/column_schema": column_schema(normalized.accepted),
            "dagster/table_name": f"{config.state_schema}.segment",
            "source_rows": normalized.source_rows, "rejected_rows": rejected_count,
            "rows_naming_nobody": normalized.unidentified.height,
            "rejected_preview": preview(normalized.rejected),
        })

    @dg.asset_check(asset=key("segment"), blocking=True, name="segment_usable",
                    description="Fails when every row of a non-empty segment is rejected; "
                    "warns when some are.")
    def segment_usable(context: dg.AssetCheckExecutionContext,
                       crisp_db: DuckDBResource) -> dg.AssetCheckResult:
        result = verdict_of(*state_store(crisp_db, config).segment_counts())
        if not result.passed and result.severity == dg.AssetCheckSeverity.ERROR:
            release_activation(context.op_execution_context, crisp_db, config)
        return result

    @dg.asset(key=key("crisp_snapshot"), deps=[segment],
              kinds={"crisp", state_kind(), *extra_kinds},
              required_resource_keys=reading, **common,
              description="What Crisp holds for the people this activation manages, as last "
              "confirmed; people already in Crisp are adopted by email, never duplicated.")
    def crisp_snapshot(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        with preparing(context, "crisp_snapshot") as prepare:
            store = prepare.store
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

    guard_specs = ([dg.AssetCheckSpec(
        "mirror_guards", asset=key("change_set"),
        description="Mirror refuses an empty segment and deletions beyond max_deletes / "
        "max_delete_fraction (in the run and over the rolling window), unless the run "
        "overrides its guards. A refusal is not a crash: `crisp_sync` sends nothing, says why "
        "(`refused`), is not materialized and tags the run `crisp/refused`; the run succeeds.")]
        if config.mode == Mode.MIRROR else [])  # (deleting is mirror's alone)

    @dg.asset(key=key("change_set"), deps=[crisp_snapshot],
              kinds={"polars", state_kind(), *extra_kinds},
              required_resource_keys=reading, check_specs=guard_specs, **common,
              description="Per person: create, update (changed fields, old and new values), "
              "delete, release or skip (with the reason). History in `change_set_history`.")
    def change_set(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        with preparing(context, "change_set") as prepare:
            store = prepare.store
            prepare.through("crisp_snapshot")
            planned = prepare.change_set()
            checks = ([guard_result(planned.verdict, prepare.options)]
                      if guard_specs else [])
            return dg.MaterializeResult(metadata={
                **change_set_metadata(store, config, planned, prepare.crisp.budget_left(
                    state_connector(prepare.crisp_db))),
                "configuration_changes": dg.MetadataValue.json(
                    store.configuration_changes(context.run.run_id))}, check_results=checks)

    @dg.asset(key=key("crisp_sync"), deps=[change_set], kinds={"crisp", "api", *extra_kinds},
              required_resource_keys=reading, output_required=False, **common,
              description="Applies this run's change set to Crisp; only confirmed writes enter "
              "the snapshot. Per-person outcomes in table `outcomes`. A dry run records an "
              "observation, never a materialization: the activation does not look synced.")
    def crisp_sync(context: dg.AssetExecutionContext):
        run_id = context.run.run_id

        def progress(done: int, total: int, seconds: float) -> None:
            rate = done / seconds if seconds else 0.0
            eta = (total - done) / rate if rate else 0.0
            context.log.info(f"{name}: {done}/{total} people, {rate:.1f}/s, ETA {eta:.0f}s")

        with preparing(context, "crisp_sync") as prepare:
            store, crisp, crisp_db, crisp_run = (prepare.store, prepare.crisp, prepare.crisp_db,
                                                 prepare.options)
            recomputed = prepare.through("change_set")
            verdict = current_verdict(store, config)
            try:
                deadline = (time.monotonic() + crisp_run.sync_deadline_minutes * 60
                            if crisp_run.sync_deadline_minutes else None)
                report = apply_change_set(
                    store, config, run_id, settings_factory(crisp, config),
                    crisp.client_options(deadline), state_connector(crisp_db),
                    dry_run=crisp_run.dry_run, verdict=verdict,
                    override_guards=crisp_run.override_guards, progress=progress,
                    heartbeat=lambda: locks.heartbeat(state_connector(crisp_db), name, run_id),
                    website_lock=website_lock(context, crisp_db, store, config, crisp_run),
                    only=frozenset(crisp_run.only) if crisp_run.only else None)
            except GuardRefusal as refusal:
                refuse(context, str(refusal), verdict, dry_run=crisp_run.dry_run)
                return
            except (StaleChangeSet, CrispError, locks.ActivationLocked) as error:
                raise dg.Failure(description=str(error)) from None
        values = report.as_metadata()
        if not crisp_run.dry_run:
            for alert in alerts.sync_alerts(
                    name, values, run_id=run_id,
                    webserver_url=context.resources.crisp_alerts.link_base(),
                    failed_share=context.resources.crisp_alerts.max_failed_share):
                context.resources.crisp_alerts.send(alert)
        metadata = {**sync_metadata(values),
                    "recomputed_change_set": recomputed,
                    "dagster/table_name": f"{config.state_schema}.outcomes"}
        if crisp_run.dry_run:  # seen, not synced
            context.log_event(dg.AssetObservation(asset_key=key("crisp_sync"),
                                                  metadata=metadata))
            return
        yield dg.MaterializeResult(metadata=metadata)

    def refuse(context: dg.AssetExecutionContext, text: str, verdict: GuardVerdict,
               dry_run: bool) -> None:
        """Mirror's guards refused: an expected outcome, told in one paragraph, not a crash
        with a stack trace. Nothing is sent and nothing is materialized (the activation does
        not look synced); the run's tag `crisp/refused` names the activations refused in it,
        and the alert goes out. The run itself succeeds: it did what it is for, and a failed
        run would be retried by a run retry policy, spending requests to be refused again."""
        run_id = context.run.run_id
        context.log.error(f"{name}: refused by mirror_guards: {text}")
        tag_refused(context, name)
        context.log_event(dg.AssetObservation(asset_key=key("crisp_sync"), metadata={
            "refused": dg.MetadataValue.text(text), **guard_counts(verdict)}))
        if not dry_run:
            destination = context.resources.crisp_alerts
            destination.send(alerts.Alert(
                "guard_refused", name, text, run_id,
                alerts.run_url(destination.link_base(), run_id),
                {"deletes": verdict.deletes, "managed": verdict.managed}))

    @dg.asset_check(asset=key("crisp_sync"), name="no_failed_writes",
                    description="Warns when Crisp refused or deferred some writes of the run "
                    "(they are retried next run; see table `outcomes`).")
    def no_failed_writes(context: dg.AssetCheckExecutionContext,
                         crisp_db: DuckDBResource) -> dg.AssetCheckResult:
        by_reason = state_store(crisp_db, config).failed_outcomes(
            context.op_execution_context.run.run_id)
        failed = sum(by_reason.values())
        return dg.AssetCheckResult(passed=not failed, severity=dg.AssetCheckSeverity.WARN,
                                   description=f"{failed} write(s) refused or deferred",
                                   metadata={"by_reason": by_reason})

    assets = [segment, crisp_snapshot, change_set, crisp_sync]
    checks = [segment_usable, no_failed_writes]
    job = dg.define_asset_job(
        name=f"{name}_job", selection=dg.AssetSelection.assets(*assets),
        executor_def=dg.in_process_executor, tags={"crisp/activation": name},
        description=f"Sync segment {name!r} to Crisp ({config.mode.value}).")
    own_keys = {key(step) for step in STEPS}
    schedules = [activation_schedule(config, job, own_keys)] if config.schedule else []
    sensors = [watermark_sensor(config, job, own_keys)] if config.segment.watermark_sql else []
    sensors.append(failure_alert_sensor(config, job, own_keys))
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
    where = warehouse_kind(config)
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
                verdict = segment_verdict(normalized.accepted_rows, normalized.rejected)
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
                    store, config, settings_factory(self.crisp, config),
                    self.crisp.client_options(), state_connector(self.crisp_db),
                    website_lock(self.context, self.crisp_db, store, config, self.options))
            except StopRun as error:
                raise dg.Failure(description=str(error)) from None
            except locks.ActivationLocked as error:
                raise dg.Failure(description=str(error)) from None
        try:
            reconciled = reconcile_snapshot(
                store, list(config.managed_columns), config.reconcile, self.run_id,
                settings_factory(self.crisp, config),
                self.crisp.client_options(), state_connector(self.crisp_db),
                full=self.options.full_reconcile)
        except StopRun as error:
            raise dg.Failure(description=str(error)) from None
        store.mark_stage("snapshot", self.run_id)
        return changes, rekeyed + report.rekeyed, report, reconciled

    def change_set(self) -> Plan:
        return plan_change_set(self.store, self.config, self.run_id,
                               override_guards=self.options.override_guards)
