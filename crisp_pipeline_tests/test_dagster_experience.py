"""What a data engineer sees, clicks and is told in Dagster, asserted from the definitions and
from real runs (screenshots are not tests): every way of materializing an activation keeps its
guarantees, mirror-only things only on mirror, a readable change-set preview, dry runs that do
not look synced, no empty or sentinel metadata, alerts to a webhook, and the component as a
user's own project sees it (scaffolded, checked by `dg`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.component import pipeline_definitions
from crisp_pipeline.emulator import FaultPlan, ForcedAnswer
from crisp_pipeline.orchestration.assets import build_activation_defs
from crisp_pipeline.orchestration.resources import CrispAlerts

from .conftest import WEBSITE
from .harness import Pipeline, crisp_env
from .test_mirror_trust import WEBSITE_TOKEN, _hold_activation, _tokens, children

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "shop_crm"
DG = str(Path(sys.executable).with_name("dg"))


def pipeline_for(emulator, tmp_path, monkeypatch, **config) -> Pipeline:
    crisp_env(monkeypatch, emulator)
    config.setdefault("segment", {"table": "people"})
    return Pipeline(emulator, str(tmp_path / "w.duckdb"), ActivationConfig(**config))


# ---------------------------------------------------------------- every way of materializing


def test_materialize_all_runs_in_process_and_keeps_the_one_run_limit(
        emulator, tmp_path, monkeypatch):
    """"Materialize all" launches the implicit asset job: in process (the code location's
    executor), and held off by a run of the activation in another process exactly as a
    second run of its job would be."""
    executor = dg.Definitions.merge(
        build_activation_defs(ActivationConfig(name="x", segment={"table": "t"})),
        pipeline_definitions(str(tmp_path / "x.duckdb"))
    ).resolve_implicit_global_asset_job_def().executor_def
    assert executor.name == "in_process"
    with children() as started:
        pipeline, holder, _, start = _hold_activation(emulator, tmp_path, monkeypatch, "held_all")
        started.append(holder)
        everything = pipeline.defs.resolve_implicit_global_asset_job_def()
        result = everything.execute_in_process(
            instance=pipeline.instance, raise_on_error=False,
            run_config={"resources": {"crisp_run": {"config": {"lock_wait_seconds": 0.5}}}})
        first = holder.wait()
    assert first["success"], first
    assert not result.success
    assert f"locked by run {first['run_id']}" in pipeline.failure_text(result)
    assert not _tokens(emulator, start, WEBSITE_TOKEN), "Materialize all sent requests"


@pytest.mark.parametrize("job_name, selected", [
    ("__ASSET_JOB", ["sched", "segment"]),       # "Materialize" on one of its assets
    ("__ASSET_JOB", None),                       # "Materialize all"
    ("sched_job", None),                         # its own job
])
def test_the_schedule_and_sensor_skip_while_any_run_materializes_the_activation(
        tmp_path, job_name, selected):
    config = ActivationConfig(name="sched", segment={"table": "t", "watermark_sql": "select 1"},
                              schedule="* * * * *")
    defs = dg.Definitions.merge(build_activation_defs(config),
                                pipeline_definitions(str(tmp_path / "s.duckdb")))
    with dg.instance_for_test() as instance:
        schedule = defs.resolve_schedule_def("sched_schedule")
        fresh = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
        assert fresh.run_requests, "nothing in progress: the schedule must request a run"
        instance.add_run(dg.DagsterRun(
            job_name=job_name, run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED,
            asset_selection=frozenset({dg.AssetKey(selected)}) if selected else None))
        tick = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
        assert not tick.run_requests and "still in progress" in tick.skip_message
        sensor = defs.resolve_sensor_def("sched_source_sensor")
        with dg.build_sensor_context(instance=instance,
                                     resources=pipeline_definitions(
                                         str(tmp_path / "s.duckdb")).resources) as context:
            result = sensor.evaluate_tick(context)
        assert not result.run_requests


def test_another_activations_run_does_not_hold_this_one_back(tmp_path):
    config = ActivationConfig(name="mine", segment={"table": "t"}, schedule="* * * * *")
    defs = dg.Definitions.merge(build_activation_defs(config),
                                pipeline_definitions(str(tmp_path / "s.duckdb")))
    with dg.instance_for_test() as instance:
        instance.add_run(dg.DagsterRun(
            job_name="__ASSET_JOB", run_id=str(uuid.uuid4()),
            status=dg.DagsterRunStatus.STARTED,
            asset_selection=frozenset({dg.AssetKey(["theirs", "segment"])})))
        tick = defs.resolve_schedule_def("mine_schedule").evaluate_tick(
            dg.build_schedule_context(instance=instance))
        assert tick.run_requests


# ---------------------------------------------------------------- what the UI shows


@pytest.mark.parametrize("mode, guarded", [("mirror", True), ("upsert", False),
                                           ("update_only", False)])
def test_mirror_guards_only_on_a_mirror(mode, guarded, tmp_path):
    defs = dg.Definitions.merge(
        build_activation_defs(ActivationConfig(name="m", segment={"table": "t"}, mode=mode)),
        pipeline_definitions(str(tmp_path / "m.duckdb")))
    checks = {key.name for key in defs.resolve_asset_graph().asset_check_keys}
    assert ("mirror_guards" in checks) is guarded
    assert {"segment_usable", "no_failed_writes"} <= checks


def test_a_mirrors_preview_shows_its_deletions_first_in_four_narrow_columns(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="prev", mode="mirror",
                            attributes=["plan"],
                            guards={"max_deletes": 100, "max_delete_fraction": 1.0})
    pipeline.load([{"email": f"p{i:02d}@x.io", "plan": "pro"} for i in range(40)])
    pipeline.run()
    pipeline.load([{"email": f"p{i:02d}@x.io", "plan": "team"} for i in range(20, 40)]
                  + [{"email": f"n{i:02d}@x.io", "plan": "free"} for i in range(30)])
    result = pipeline.run(dry_run=True)
    metadata = pipeline.metadata(result, "change_set")
    preview = metadata["preview"]
    assert [c.name for c in preview.schema.columns] == ["identifier", "op", "change", "why"]
    ops = [r.data["op"] for r in preview.records]
    assert ops[:8] == ["delete"] * 8 and ops.count("create") == 8 and ops.count("update") == 8
    update = next(r.data for r in preview.records if r.data["op"] == "update")
    assert update["change"] == 'data.plan: "pro" → "team"'
    assert metadata["deletes"] == 20
    assert "skips_by_reason" not in metadata and "rejected_by_reason" not in metadata  # none


def test_update_only_counts_its_skips_by_reason_apart_from_rejected_rows(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="uo", mode="update_only",
                            attributes=["plan"])
    pipeline.load([{"email": f"u{i}@x.io", "plan": "pro"} for i in range(30)]
                  + [{"email": "broken", "plan": "x"}])
    result = pipeline.run()
    metadata = pipeline.metadata(result, "change_set")
    assert metadata["skips_by_reason"] == {"not_in_crisp": 30}
    assert metadata["rejected_by_reason"] == {"invalid_email": 1}
    assert metadata["skipped_by_mode"] == 30 and metadata["skipped_rejected_rows"] == 1
    assert "mirror_guards" not in pipeline.checks(result) and "guards" not in metadata


def test_metadata_has_no_empty_entries_no_sentinels_and_links_its_run(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="meta", attributes=["plan"])
    monkeypatch.delenv("CRISP_DAILY_QUOTA", raising=False)
    pipeline.load([{"email": "a@x.io", "plan": "pro"}])
    result = pipeline.run()
    for asset in ("segment", "crisp_snapshot", "change_set", "crisp_sync"):
        for name, value in pipeline.metadata(result, asset).items():
            assert value not in ("", {}, -1), (asset, name, value)
    sync = result.asset_materializations_for_node("meta__crisp_sync")[0].metadata
    assert isinstance(sync["change_set_run_id"], dg.DagsterRunMetadataValue)
    assert sync["change_set_run_id"].value == result.run_id


def test_the_last_progress_line_is_logged_once(emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="prog", attributes=["plan"])
    pipeline.load([{"email": f"g{i}@x.io", "plan": "pro"} for i in range(6)])
    result = pipeline.run()
    lines = [entry.user_message for entry in pipeline.instance.all_logs(result.run_id)
             if "people," in entry.user_message and "ETA" in entry.user_message]
    assert lines and len(lines) == len(set(lines)), lines


# ---------------------------------------------------------------- alerts


def evaluate_failure_sensor(sensor, result, instance) -> None:
    """Run the failure-alert sensor on a failed run, as the daemon would."""
    failure = next(e for e in result.all_events
                   if e.event_type == dg.DagsterEventType.RUN_FAILURE)
    sensor(dg.build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_instance=instance,
        dagster_run=instance.get_run_by_id(result.run_id), dagster_event=failure,
        resources={"crisp_alerts": CrispAlerts()}).for_run_failure())


class Receiver:
    """A local webhook: every POST body it received, as JSON."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the standard library's name)
                length = int(self.headers.get("content-length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def events(self) -> list[str]:
        return [body["event"] for body in self.received]


@pytest.fixture
def webhook(monkeypatch):
    receiver = Receiver()
    monkeypatch.setenv("CRISP_ALERT_WEBHOOK_URL", receiver.url)
    yield receiver
    receiver.server.shutdown()


def test_a_partly_failed_sync_is_reported_with_counts_and_a_run_link(
        emulator, tmp_path, monkeypatch, webhook):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="partly", attributes=["plan"])
    pipeline.load([{"email": f"f{i}@x.io", "plan": "pro"} for i in range(4)])
    pipeline.run()
    assert webhook.received == []  # a clean sync tells nobody
    pipeline.load([{"email": f"f{i}@x.io", "plan": "team"} for i in range(4)])
    emulator.emulator.set_faults(FaultPlan(forced=[ForcedAnswer(400, "invalid_data",
                                                                 method="PATCH")]))
    result = pipeline.run()
    emulator.emulator.set_faults(FaultPlan())
    [alert] = webhook.received
    assert alert["event"] == "sync_partly_failed" and alert["activation"] == "partly"
    assert alert["counts"]["rejected"] == 4
    assert alert["run_url"] == f"http://localhost:3000/runs/{result.run_id}"
    assert "partly" in alert["text"] and alert["run_url"] in alert["text"]


def test_a_budget_that_runs_out_is_reported(emulator, tmp_path, monkeypatch, webhook):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="short", attributes=["plan"])
    monkeypatch.setenv("CRISP_DAILY_QUOTA", "5")
    pipeline.load([{"email": f"b{i}@x.io", "plan": "pro"} for i in range(12)])
    pipeline.run()
    assert "budget_exhausted" in webhook.events()
    alert = next(a for a in webhook.received if a["event"] == "budget_exhausted")
    assert alert["counts"]["deferred"] > 0


def test_a_guard_refusal_is_reported(emulator, tmp_path, monkeypatch, webhook):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="guarded", mode="mirror",
                            attributes=["plan"],
                            guards={"max_deletes": 1, "max_delete_fraction": 1.0})
    pipeline.load([{"email": f"g{i}@x.io", "plan": "pro"} for i in range(5)])
    pipeline.run()
    pipeline.load([{"email": "g0@x.io", "plan": "pro"}])
    pipeline.run()
    [alert] = webhook.received
    assert alert["event"] == "guard_refused" and alert["counts"]["deletes"] == 4
    assert "max_deletes" in alert["text"]


def test_a_guard_refusal_reads_as_one_paragraph_not_a_stack_trace(emulator, tmp_path,
                                                                   monkeypatch, webhook):
    """What the run page shows: no failed step (each would carry Dagster's stack trace), the
    check failed with the reason, one ERROR line, the run tagged, the sync not materialized
    (the activation does not look synced) and nothing sent; a dry run is refused the same way
    and alerts nobody."""
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="calm", mode="mirror",
                            attributes=["plan"],
                            guards={"max_deletes": 1, "max_delete_fraction": 1.0})
    pipeline.load([{"email": f"c{i}@x.io", "plan": "pro"} for i in range(4)])
    pipeline.run()
    synced = pipeline.instance.get_latest_materialization_event(
        dg.AssetKey(["calm", "crisp_sync"])).run_id
    pipeline.load([{"email": "c0@x.io", "plan": "pro"}])
    for dry_run in (True, False):
        result = pipeline.run(dry_run=dry_run)
        assert not [e for e in result.all_events if e.is_step_failure]
        assert pipeline.instance.get_run_by_id(result.run_id).tags["crisp/refused"] == "calm"
        errors = [entry.user_message for entry in pipeline.instance.all_logs(result.run_id)
                  if entry.level >= logging.ERROR]
        assert len(errors) == 1 and "3 people would be deleted" in errors[0], errors
        assert "Traceback" not in errors[0] and "\n" not in errors[0]
        assert "override_guards: true" in pipeline.refusal(result)
        assert not pipeline.checks(result)["mirror_guards"].passed
        assert pipeline.writes_of_last_run() == 0 and len(pipeline.crisp()) == 4
        assert pipeline.instance.get_latest_materialization_event(
            dg.AssetKey(["calm", "crisp_sync"])).run_id == synced
        assert webhook.events() == ([] if dry_run else ["guard_refused"])
    pipeline.run(override_guards=True)
    assert list(pipeline.crisp()) == ["c0@x.io"]


def test_materialize_all_tells_which_activation_was_refused(emulator, tmp_path, monkeypatch):
    """Two mirrors in one "Materialize all" run: the refused one sends nothing and is named by
    the run's tag and its own observation; the other syncs."""
    crisp_env(monkeypatch, emulator)
    db = str(tmp_path / "w.duckdb")
    tight = {"max_deletes": 1, "max_delete_fraction": 1.0}
    strict = Pipeline(emulator, db, ActivationConfig(
        name="strict", mode="mirror", segment={"table": "people_s"}, attributes=["plan"],
        guards=tight))
    loose = Pipeline(emulator, db, ActivationConfig(
        name="loose", mode="mirror", segment={"table": "people_l"}, attributes=["plan"],
        guards={"max_deletes": 100, "max_delete_fraction": 1.0}), instance=strict.instance)
    for pipeline, table, prefix in ((strict, "people_s", "s"), (loose, "people_l", "l")):
        pipeline.load([{"email": f"{prefix}{i}@x.io", "plan": "pro"} for i in range(4)],
                      table=table)
        pipeline.run()
        pipeline.load([{"email": f"{prefix}0@x.io", "plan": "pro"}], table=table)
    everything = dg.Definitions.merge(
        build_activation_defs(strict.config), build_activation_defs(loose.config),
        dg.Definitions(resources=strict.defs.resources))
    result = everything.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=strict.instance)
    assert result.success
    assert strict.instance.get_run_by_id(result.run_id).tags["crisp/refused"] == "strict"
    assert "3 people would be deleted" in strict.refusal(result)
    assert loose.refusal(result) is None
    crisp = strict.crisp()
    assert {f"s{i}@x.io" for i in range(4)} <= set(crisp)
    assert not {f"l{i}@x.io" for i in range(1, 4)} & set(crisp)


def test_a_failed_run_is_reported_by_the_failure_sensor(emulator, tmp_path, monkeypatch,
                                                       webhook):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="failing",
                            segment={"sql": "select * from no_such_table"})
    result = pipeline.run(expect_success=False)
    sensor = pipeline.defs.resolve_sensor_def("failing_failure_alert")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING  # a webhook is set
    evaluate_failure_sensor(sensor, result, pipeline.instance)
    [alert] = webhook.received
    assert alert["event"] == "run_failed" and alert["run_id"] == result.run_id


def test_an_unreachable_webhook_never_fails_the_run(emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("CRISP_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/hook")
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="deaf", mode="mirror",
                            attributes=["plan"],
                            guards={"max_deletes": 1, "max_delete_fraction": 1.0})
    pipeline.load([{"email": f"d{i}@x.io", "plan": "pro"} for i in range(3)])
    pipeline.run()
    pipeline.load([{"email": "d0@x.io", "plan": "pro"}])
    result = pipeline.run()  # the refusal stands; the alert is lost
    assert not pipeline.checks(result)["mirror_guards"].passed and pipeline.refusal(result)
    assert pipeline.crisp().keys() == {"d0@x.io", "d1@x.io", "d2@x.io"}


# ---------------------------------------------------------------- a user's own project


def test_the_example_project_scaffolds_a_mirror_that_dg_accepts(tmp_path):
    project = tmp_path / "shop_crm"
    shutil.copytree(EXAMPLE, project)
    env = {**os.environ, "PYTHONPATH": str(project / "src"),
           "CRISP_PIPELINE_DB": str(tmp_path / "p.duckdb")}
    scaffold = subprocess.run(
        [DG, "scaffold", "defs", "crisp_pipeline.CrispActivation", "newsletter", "--mode",
         "mirror", "--table", "analytics.subscribers"],
        cwd=project, env=env, capture_output=True, text=True, timeout=180)
    assert scaffold.returncode == 0, scaffold.stderr[-2000:]
    written = (project / "src/shop_crm/defs/newsletter/defs.yaml").read_text()
    attributes = yaml.safe_load(written)["attributes"]
    assert attributes["mode"] == "mirror"
    assert attributes["segment"] == {"table": "analytics.subscribers"}
    assert "max_delete_fraction" in written and written.count("#") > 10  # commented
    check = subprocess.run([DG, "check", "defs"], cwd=project, env=env, capture_output=True,
                           text=True, timeout=180)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    assert "All definitions loaded successfully" in check.stdout + check.stderr


def test_the_example_projects_presentation_settings_reach_the_assets(tmp_path, monkeypatch):
    monkeypatch.setenv("CRISP_PIPELINE_DB", str(tmp_path / "p.duckdb"))
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    from shop_crm.definitions import defs

    graph = defs().resolve_asset_graph()
    key = dg.AssetKey(["crm", "shop_customers", "crisp_sync"])
    node = graph.get(key)
    assert node.group_name == "crm_sync" and node.owners == ["team:growth"]
    assert node.tags["domain"] == "crm" and "crm" in node.kinds
    assert node.metadata["runbook"] == "https://wiki.example.com/crisp"  # post_processing
    segment = graph.get(dg.AssetKey(["crm", "shop_customers", "segment"]))
    assert dg.AssetKey(["analytics", "customers"]) in segment.parent_keys


def test_a_bad_setting_in_yaml_is_refused_naming_it(tmp_path):
    from crisp_pipeline.component import CrispActivation
    with pytest.raises(ValueError, match="mode"):
        CrispActivation(name="x", segment={"table": "t"}, mode="mirrorr")
    with pytest.raises(ValueError, match="asset_key_prefix"):
        CrispActivation(name="x", segment={"table": "t"}, asset_key_prefix=["a/b"])
    schema = CrispActivation.get_schema().model_json_schema()
    assert set(schema["properties"]["mode"].get("enum", [])) or "$ref" in json.dumps(
        schema["properties"]["mode"])


# ---------------------------------------------------------------- one person first


def test_try_shows_one_persons_exact_requests_then_sends_only_them(
        emulator, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from crisp_pipeline.cli import main

    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="one",
                            fields={"person.nickname": "name"}, attributes=["plan"])
    pipeline.load([{"email": "ada@x.io", "name": "Ada", "plan": "pro"},
                   {"email": "bob@x.io", "name": "Bob", "plan": "free"}])
    for name, value in {"TRUST_ACTIVATION": pipeline.config.model_dump_json(),
                        "TRUST_DB": pipeline.db_path,
                        "CRISP_PIPELINE_DB": pipeline.db_path}.items():
        monkeypatch.setenv(name, value)
    command = ["try", "one", "Ada@x.io", "--module", "crisp_pipeline_tests.concurrent_child"]
    shown = CliRunner().invoke(main, command)
    assert shown.exit_code == 0, shown.output
    assert '"op": "create"' in shown.output and "Nothing was sent" in shown.output
    assert '"method": "POST"' in shown.output and "/people/profile" in shown.output
    assert '"email": "ada@x.io"' in shown.output and '"nickname": "Ada"' in shown.output
    assert "bob@x.io" not in shown.output and pipeline.crisp() == {}
    assert [r for r in emulator.emulator.requests() if r.method != "GET"] == []
    sent = CliRunner().invoke(main, [*command, "--send"])
    assert sent.exit_code == 0, sent.output
    assert set(pipeline.crisp()) == {"ada@x.io"}  # only her
    assert pipeline.crisp()["ada@x.io"]["data"] == {"plan": "pro"}
    assert pipeline.snapshot().get_column("identifier").to_list() == ["ada@x.io"]
    pipeline.run()  # the rest on the next run; she is not written again
    assert set(pipeline.crisp()) == {"ada@x.io", "bob@x.io"}
    assert len(emulator.emulator.people(WEBSITE)) == 2
    planned = pipeline.store.read("change_set")
    assert planned.filter(pl.col("op") != "skip").get_column("identifier").to_list() \
        == ["bob@x.io"]


def test_the_full_change_set_is_one_command_away(emulator, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from crisp_pipeline.cli import main

    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="full", attributes=["plan"])
    pipeline.load([{"email": f"c{i:02d}@x.io", "plan": "pro"} for i in range(60)]
                  + [{"email": "broken", "plan": "x"}])
    pipeline.run(dry_run=True)
    shown = CliRunner().invoke(main, ["changes", "full", "--db", pipeline.db_path, "--limit", "5"])
    assert shown.exit_code == 0, shown.output
    assert "c00@x.io" in shown.output and "56 more row(s)" in shown.output
    skips = CliRunner().invoke(main, ["changes", "full", "--db", pipeline.db_path, "--op", "skip",
                                      "--csv"])
    lines = skips.output.strip().splitlines()
    assert lines[0].startswith("identifier,op,changed") and len(lines) == 2
    assert "invalid_email" in lines[1]


# ---------------------------------------------------------------- found by a hostile review


def test_syncing_one_person_never_lets_the_next_run_delete_held_departures(
        emulator, tmp_path, monkeypatch):
    """p1-p4 lose their email in the source (a broken join): their departures are held. A
    sync of p0 alone (with the guards overridden) must not make the rows naming nobody the
    accepted baseline: the next run still holds p1-p4."""
    schema = {"email": pl.String, "name": pl.String, "plan": pl.String}
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="held_one", mode="mirror",
                            fields={"person.nickname": "name"}, attributes=["plan"],
                            guards={"max_deletes": 1000, "max_delete_fraction": 1.0})
    rows = [{"email": f"p{i}@x.io", "name": f"P{i}", "plan": "pro"} for i in range(5)]
    pipeline.load(rows, schema=schema)
    pipeline.run()
    pipeline.load([{**rows[0], "plan": "team"}] + [{**r, "email": None} for r in rows[1:]],
                  schema=schema)
    pipeline.run(override_guards=True, only=["p0@x.io"])
    assert pipeline.crisp()["p0@x.io"]["data"] == {"plan": "team"}
    pipeline.run()
    assert len(pipeline.crisp()) == 5, "a held departure was deleted after a one-person sync"


def test_try_under_an_external_id_never_shows_another_persons_change(
        emulator, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from crisp_pipeline.cli import main

    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="ext",
                            identifier={"external_id": "uid", "email": "email"},
                            attributes=["plan"])
    pipeline.load([{"uid": "ABC", "email": "up@x.io", "plan": "pro"}])
    pipeline.run()
    pipeline.load([{"uid": "ABC", "email": "up@x.io", "plan": "pro"},
                   {"uid": "abc", "email": "low@x.io", "plan": "free"}])
    for name, value in {"TRUST_ACTIVATION": pipeline.config.model_dump_json(),
                        "TRUST_DB": pipeline.db_path}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CRISP_PIPELINE_DB", raising=False)  # the module's resource says
    shown = CliRunner().invoke(main, ["try", "ext", "ABC", "--module",
                                      "crisp_pipeline_tests.concurrent_child"])
    assert shown.exit_code != 0 and "not in the change set" in shown.output  # nothing to do
    assert "low@x.io" not in shown.output


@pytest.mark.parametrize("url", ["http://[::1/hook", "http://127.0.0.1:9/x y/SECRETPART"])
def test_a_malformed_or_dead_webhook_never_fails_the_sync_nor_shows_its_url(
        emulator, tmp_path, monkeypatch, caplog, url):
    monkeypatch.setenv("CRISP_ALERT_WEBHOOK_URL", url)
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="hooked", attributes=["plan"])
    pipeline.load([{"email": f"h{i}@x.io", "plan": "pro"} for i in range(3)])
    pipeline.run()
    pipeline.load([{"email": f"h{i}@x.io", "plan": "team"} for i in range(3)])
    emulator.emulator.set_faults(FaultPlan(forced=[ForcedAnswer(400, "invalid_data",
                                                                 method="PATCH")]))
    pipeline.run()  # partly failed: an alert is due, and cannot be delivered
    emulator.emulator.set_faults(FaultPlan())
    assert "not delivered" in caplog.text
    assert "SECRETPART" not in caplog.text and "[::1" not in caplog.text


def test_a_guard_refusal_is_told_once_and_another_activations_failure_not_at_all(
        emulator, tmp_path, monkeypatch, webhook):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="once", mode="mirror",
                            attributes=["plan"],
                            guards={"max_deletes": 1, "max_delete_fraction": 1.0})
    pipeline.load([{"email": f"o{i}@x.io", "plan": "pro"} for i in range(4)])
    pipeline.run()
    pipeline.load([{"email": "o0@x.io", "plan": "pro"}])
    refused = pipeline.run()  # a refused run succeeds: no run failure to tell twice
    assert pipeline.refusal(refused)
    other = pipeline_for(emulator, tmp_path / "other", monkeypatch, name="other",
                         segment={"sql": "select * from nowhere"})
    (tmp_path / "other").mkdir(exist_ok=True)
    failed_elsewhere = other.run(expect_success=False)
    sensor = pipeline.defs.resolve_sensor_def("once_failure_alert")
    evaluate_failure_sensor(sensor, failed_elsewhere, other.instance)
    assert webhook.events() == ["guard_refused"]


def test_a_users_own_job_selecting_the_activation_holds_the_schedule_back(tmp_path):
    config = ActivationConfig(name="grp", segment={"table": "t"}, schedule="* * * * *")
    nightly = dg.define_asset_job("crm_nightly", selection=dg.AssetSelection.groups("grp"))
    defs = dg.Definitions.merge(build_activation_defs(config),
                                pipeline_definitions(str(tmp_path / "s.duckdb")),
                                dg.Definitions(jobs=[nightly]))
    with dg.instance_for_test() as instance:
        job = defs.resolve_job_def("crm_nightly")
        run = instance.create_run_for_job(job, run_id=str(uuid.uuid4()),
                                          status=dg.DagsterRunStatus.STARTED)
        assert run.asset_selection is None  # what makes it hard: no selection on the run
        tick = defs.resolve_schedule_def("grp_schedule").evaluate_tick(
            dg.build_schedule_context(instance=instance))
        assert not tick.run_requests


@pytest.mark.parametrize("attributes, message", [
    ({"group_name": "crm sync!"}, "group_name"),
    ({"asset_key_prefix": ["crm x"]}, "asset_key_prefix"),
    ({"tags": {"bad tag!": "x"}}, "tags"),
])
def test_bad_presentation_values_are_refused_naming_the_setting(attributes, message):
    from crisp_pipeline.component import CrispActivation
    with pytest.raises(ValueError, match=message):
        CrispActivation(name="x", segment={"table": "t"}, **attributes)



@pytest.mark.parametrize("held_elsewhere, methods", [(set(), ["DELETE"]), ({"id-s"}, [])])
def test_a_preview_deletes_only_whom_the_sync_would(held_elsewhere, methods):
    """The gate the sync asks before a delete (another activation may have taken the person
    on since the change set was planned) is asked by the preview too."""
    from crisp_pipeline.sync.preview import planned_requests

    from .test_engine import SETTINGS

    departed = {"identifier": "s@x.io", "op": "delete", "email": "s@x.io",
                "people_id": "id-s", "new_values": None, "data_values": None,
                "old_values": None}
    config = ActivationConfig(name="gate", mode="mirror", segment={"table": "t"},
                              attributes=["plan"])
    asked = []

    def holders(people_ids: list[str]) -> set[str]:
        asked.append(people_ids)
        return held_elsewhere
    requests = planned_requests([departed], config, SETTINGS, 0.0,
                                is_managed=lambda people_id: True, held_elsewhere=holders)
    assert [r["method"] for r in requests] == methods and asked == [["id-s"]]
