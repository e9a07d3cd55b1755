"""Schedules, sensors, the repository's definitions and the activation component, for real."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test
from pydantic import ValidationError

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.component import CrispActivation, pipeline_db

from .harness import Pipeline, crisp_env


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:  # a real instance, with a reference
        yield test_instance


def scheduled(emulator, tmp_path, monkeypatch, instance) -> Pipeline:
    crisp_env(monkeypatch, emulator)
    config = ActivationConfig(name="auto", segment={
        "table": "people", "watermark_sql": "select max(updated_at) from people"},
        attributes=["plan"], schedule="0 * * * *")
    return Pipeline(emulator, str(tmp_path / "w.duckdb"), config, instance)


def test_the_schedule_requests_a_run_that_syncs_and_skips_while_one_is_in_progress(
        emulator, tmp_path, monkeypatch, instance):
    pipeline = scheduled(emulator, tmp_path, monkeypatch, instance)
    pipeline.load([{"email": "s@x.io", "plan": "pro", "updated_at": datetime(2024, 1, 1)}])
    schedule = pipeline.defs.resolve_schedule_def("auto_schedule")
    assert schedule.cron_schedule == "0 * * * *" and schedule.job_name == "auto_job"

    context = dg.build_schedule_context(instance=pipeline.instance,
                                        scheduled_execution_time=datetime(2024, 1, 1, tzinfo=UTC))
    tick = schedule.evaluate_tick(context)
    assert len(tick.run_requests) == 1
    request = tick.run_requests[0]
    result = pipeline.job.execute_in_process(instance=pipeline.instance, tags=request.tags)
    assert result.success and set(pipeline.crisp()) == {"s@x.io"}

    running = create_run_for_test(pipeline.instance, job_name="auto_job",
                                  status=dg.DagsterRunStatus.STARTED)
    tick = schedule.evaluate_tick(context)
    assert tick.run_requests == [] and running.run_id in tick.skip_message


def test_the_source_sensor_requests_a_run_when_the_watermark_moves(emulator, tmp_path, monkeypatch,
                                                                   instance):
    pipeline = scheduled(emulator, tmp_path, monkeypatch, instance)
    pipeline.load([{"email": "w@x.io", "plan": "pro", "updated_at": datetime(2024, 1, 1)}])
    sensor = pipeline.defs.resolve_sensor_def("auto_source_sensor")
    resources = {"crisp_db": pipeline_db(pipeline.db_path)}

    context = dg.build_sensor_context(instance=pipeline.instance, cursor=None, resources=resources)
    first = sensor.evaluate_tick(context)
    assert len(first.run_requests) == 1
    assert first.run_requests[0].tags["crisp/watermark"] == "2024-01-01 00:00:00"

    context = dg.build_sensor_context(instance=pipeline.instance, cursor=first.cursor,
                                      resources=resources)
    unchanged = sensor.evaluate_tick(context)
    assert unchanged.run_requests == [] and "unchanged" in unchanged.skip_message

    pipeline.load([{"email": "w@x.io", "plan": "team", "updated_at": datetime(2024, 1, 2)}])
    moved = sensor.evaluate_tick(dg.build_sensor_context(
        instance=pipeline.instance, cursor=first.cursor, resources=resources))
    assert len(moved.run_requests) == 1
    assert moved.run_requests[0].tags["crisp/watermark"] == "2024-01-02 00:00:00"
    result = pipeline.job.execute_in_process(instance=pipeline.instance,
                                             tags=moved.run_requests[0].tags)
    assert result.success and pipeline.crisp()["w@x.io"]["data"] == {"plan": "team"}

    # the newest row is hard-deleted: the watermark goes back to a value seen before, and
    # that is a change too (its run key must not repeat the first run's)
    pipeline.load([{"email": "w@x.io", "plan": "pro", "updated_at": datetime(2024, 1, 1)}])
    back = sensor.evaluate_tick(dg.build_sensor_context(
        instance=pipeline.instance, cursor=moved.cursor, resources=resources))
    assert len(back.run_requests) == 1
    keys = {first.run_requests[0].run_key, moved.run_requests[0].run_key,
            back.run_requests[0].run_key}
    assert len(keys) == 3, keys


def test_the_source_sensor_waits_while_a_run_is_in_progress(emulator, tmp_path, monkeypatch,
                                                            instance):
    pipeline = scheduled(emulator, tmp_path, monkeypatch, instance)
    pipeline.load([{"email": "w@x.io", "plan": "pro", "updated_at": datetime(2024, 1, 1)}])
    create_run_for_test(pipeline.instance, job_name="auto_job", status=dg.DagsterRunStatus.STARTED)
    sensor = pipeline.defs.resolve_sensor_def("auto_source_sensor")
    tick = sensor.evaluate_tick(dg.build_sensor_context(
        instance=pipeline.instance, resources={"crisp_db": pipeline_db(pipeline.db_path)}))
    assert tick.run_requests == [] and tick.cursor is None


def test_the_repository_definitions_load_with_one_activation_per_mode():
    from crisp_pipeline.definitions import defs

    definitions = defs()
    dg.Definitions.validate_loadable(definitions)
    jobs = {job.name for job in definitions.resolve_all_job_defs()}
    assert {"paying_customers_job", "trial_users_job", "newsletter_job"} <= jobs
    assert definitions.resolve_schedule_def("paying_customers_schedule").cron_schedule == "0 * * * *"
    assert definitions.resolve_sensor_def("trial_users_source_sensor")
    keys = {key.to_user_string() for key in definitions.resolve_asset_graph().get_all_asset_keys()}
    for name in ("paying_customers", "trial_users", "newsletter"):
        assert {f"{name}/segment", f"{name}/crisp_snapshot", f"{name}/change_set",
                f"{name}/crisp_sync"} <= keys


def test_dg_check_defs_passes_from_the_repository_root():
    result = subprocess.run([sys.executable, "-m", "dagster_dg_cli.cli", "check", "defs"],
                            capture_output=True, text=True, timeout=240)
    if "No module named" in result.stderr:
        result = subprocess.run(["dg", "check", "defs"], capture_output=True, text=True,
                                timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("change,message", [
    ({"mode": "merge"}, "Input should be 'upsert', 'update_only' or 'mirror'"),
    ({"fields": {"person.shoe_size": "x"}}, "'person.shoe_size' is not a Crisp profile field"),
    ({"fields": {"email": "x"}}, "the identity is set with `identifier`"),
    ({"attributes": ["Plan Name"]}, "{column: 'Plan Name', key: 'plan_name'}"),
    ({"attributes": [{"column": "p", "key": "Bad Key"}]}, "try 'bad_key'"),
    ({"attributes": ["plan", {"column": "tier", "key": "plan"}]}, "written twice"),
    ({"segment": {"sql": "select 1", "table": "t"}}, "exactly one of `sql` or `table`"),
    ({"name": "Has Spaces"}, "lower-case letters"),
    ({"guards": {"max_delete_fraction": 2}}, "less than or equal to 1"),
])
def test_bad_activation_configuration_is_refused_when_definitions_load(change, message):
    values = {"name": "ok", "segment": {"sql": "select 1"}, **change}
    with pytest.raises(ValidationError) as refused:
        CrispActivation(**values)
    assert message in str(refused.value)


def test_the_demo_runs_every_activation_twice_and_then_writes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    result = subprocess.run(
        [sys.executable, "-m", "crisp_pipeline.cli", "demo", "--db", str(tmp_path / "crisp_pipeline.duckdb"),
         "--people", "400"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # its runs stay where `dg dev` shows them, and it says how to get there
    home = tmp_path / "dagster_home"
    assert f"export DAGSTER_HOME={home}" in result.stdout
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert len(instance.get_run_records()) == 9  # 3 activations x 3 runs
    tables = result.stdout.split("\n\n")
    third = next(block for block in tables if block.startswith("Third run"))
    rows = [line.split() for line in third.splitlines()[2:]]
    assert {row[0] for row in rows} == {"newsletter", "paying_customers", "trial_users"}
    assert all(row[-2] == "0" for row in rows), third  # writes
    first = next(block for block in tables if block.startswith("First run"))
    created = {line.split()[0]: int(line.split()[2]) for line in first.splitlines()[2:]}
    assert created["paying_customers"] > 0 and created["newsletter"] > 0
    assert created["trial_users"] == 0  # update_only never creates


def test_the_shipped_dagster_yaml_limits_each_activation_to_one_run(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parents[1] / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    instance = dg.DagsterInstance.get()
    try:
        config = instance.get_concurrency_config()
        assert config.pool_config.default_pool_limit == 1
        assert config.run_queue_config.tag_concurrency_limits == [
            {"key": "crisp/activation", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
    finally:
        instance.dispose()
