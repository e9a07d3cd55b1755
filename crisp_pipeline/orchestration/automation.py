"""What starts runs by itself: the schedule and the source sensor of an activation."""


import json
import os
from typing import Any

import dagster as dg

from crisp_pipeline import alerts
from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.warehouse import SegmentSourceError

from .resources import CrispAlerts, source_of, source_resource_keys
from .run_scope import IN_PROGRESS

def step_prefix(keys: set[dg.AssetKey]) -> str:
    """What every step key of the activation (its assets' and their checks') starts with:
    `<key prefix>__<name>__`."""
    return "__".join(next(iter(keys)).path[:-1]) + "__"


def _planned_steps(instance: dg.DagsterInstance, run: dg.DagsterRun) -> set[str]:
    if run.step_keys_to_execute:
        return set(run.step_keys_to_execute)
    if run.execution_plan_snapshot_id:
        snapshot = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
        return {step.key for step in snapshot.steps}
    return set()


def touches_activation(instance: dg.DagsterInstance, run: dg.DagsterRun, job_name: str,
                       keys: set[dg.AssetKey]) -> bool:
    """Whether `run` materializes any of the activation's assets: a run of its job, a run
    selecting them ("Materialize", "Materialize all"), or any other job whose plan has one
    of its steps (a job of the user's own selecting them by group or kind)."""
    if run.job_name == job_name:
        return True
    if run.asset_selection:
        return bool(keys & set(run.asset_selection))
    if run.job_name.startswith("__ASSET_JOB"):
        return True  # the implicit job with no selection: every asset of the code location
    prefix = step_prefix(keys)
    return any(step.startswith(prefix) for step in _planned_steps(instance, run))


def activation_run_in_progress(instance: dg.DagsterInstance, job_name: str,
                               keys: set[dg.AssetKey]) -> str | None:
    """The id of a run in progress that materializes any of the activation's assets
    (`touches_activation`); None when there is none."""
    for record in instance.get_run_records(dg.RunsFilter(statuses=IN_PROGRESS), limit=200):
        if touches_activation(instance, record.dagster_run, job_name, keys):
            return record.dagster_run.run_id
    return None


def activation_schedule(config: ActivationConfig, job: Any,
                        keys: set[dg.AssetKey]) -> dg.ScheduleDefinition:
    @dg.schedule(name=f"{config.name}_schedule", cron_schedule=config.schedule, job=job,
                 description=f"Syncs {config.name!r} on {config.schedule!r}; skips a tick "
                 "while a run of the activation is still in progress.")
    def schedule(context: dg.ScheduleEvaluationContext):
        running = activation_run_in_progress(context.instance, job.name, keys)
        if running:
            return dg.SkipReason(f"a run of activation {config.name!r} is still in progress "
                                 f"({running})")
        return dg.RunRequest(tags={"crisp/trigger": "schedule"})
    return schedule


def watermark_sensor(config: ActivationConfig, job: Any,
                     keys: set[dg.AssetKey]) -> dg.SensorDefinition:
    @dg.sensor(name=f"{config.name}_source_sensor", job=job, minimum_interval_seconds=60,
               required_resource_keys={"crisp_db", *source_resource_keys(config)},
               description=f"Syncs {config.name!r} when its watermark query's value changes "
               "(to any value, including one seen before).")
    def source_sensor(context: dg.SensorEvaluationContext):
        try:
            watermark = source_of(config, context.resources).watermark()
        except SegmentSourceError as error:
            return dg.SkipReason(str(error))
        if watermark is None:
            return dg.SkipReason("the watermark query returned no value")
        last, changes = sensor_cursor(context.cursor)
        if watermark == last:
            return dg.SkipReason(f"source unchanged (watermark {watermark})")
        if activation_run_in_progress(context.instance, job.name, keys):
            return dg.SkipReason("a run is in progress; the change will be seen next tick")
        context.update_cursor(json.dumps({"watermark": watermark, "changes": changes + 1}))
        # the key counts changes: a watermark back to an old value (its newest row deleted)
        # is a change too, which a key made of the value alone would swallow
        return dg.RunRequest(run_key=f"{config.name}:change-{changes + 1}",
                             tags={"crisp/trigger": "source_sensor", "crisp/watermark": watermark})
    return source_sensor


def sensor_cursor(cursor: str | None) -> tuple[str | None, int]:
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


def failure_alert_sensor(config: ActivationConfig, job: Any,
                         keys: set[dg.AssetKey]) -> dg.SensorDefinition:
    """Tells the `crisp_alerts` webhook when a run of the activation fails (its job, or any
    run materializing its assets). Running by default when the webhook is configured as the
    definitions load, else stopped (turn it on in the UI once it is)."""
    configured = bool(os.environ.get(alerts.DEFAULT_URL_ENV, "").strip())

    @dg.run_failure_sensor(
        name=f"{config.name}_failure_alert",
        default_status=(dg.DefaultSensorStatus.RUNNING if configured
                        else dg.DefaultSensorStatus.STOPPED),
        description=f"Sends an alert when a run of {config.name!r} fails.")
    def failure_alert(context: dg.RunFailureSensorContext, crisp_alerts: CrispAlerts):
        run = context.dagster_run
        prefix = step_prefix(keys)
        failed = {e.step_key for e in context.get_step_failure_events() if e.step_key}
        mine = {step for step in failed if step.startswith(prefix)}
        # a run that failed elsewhere ("Materialize all", another activation) is not this
        # activation's (a refusal of the guards is no failure: it is told as `guard_refused`)
        if not mine and (failed or not touches_activation(context.instance, run, job.name,
                                                          keys)):
            return
        destination = crisp_alerts
        message = (context.failure_event.message or "the run failed").splitlines()[0]
        destination.send(alerts.Alert(
            "run_failed", config.name, message, run.run_id,
            alerts.run_url(destination.link_base(), run.run_id)))
    return failure_alert
