"""What starts runs by itself: the schedule and the source sensor of an activation."""


import json
from typing import Any

import dagster as dg

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.warehouse import SegmentSourceError

from .resources import source_of, source_resource_keys
from .run_scope import IN_PROGRESS

def activation_schedule(config: ActivationConfig, job: Any) -> dg.ScheduleDefinition:
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


def watermark_sensor(config: ActivationConfig, job: Any) -> dg.SensorDefinition:
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
