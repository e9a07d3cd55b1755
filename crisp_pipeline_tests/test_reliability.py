"""Faults, credentials and secrets, through Dagster against the emulator: storms are ridden
out to the exact expected state, a Crisp that keeps failing stops the run cleanly with the
work deferred, bad credentials stop it at once, and the token key is nowhere."""

from __future__ import annotations

import logging
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.emulator import FaultPlan, ForcedAnswer

from .conftest import PLUGIN
from .harness import Pipeline, crisp_env


def people(count: int, plan: str = "pro") -> list[dict]:
    return [{"email": f"f{i:04d}@x.io", "name": f"F {i}", "plan": plan, "score": i}
            for i in range(count)]


def activation(emulator, tmp_path, monkeypatch, name="faulty", **extra) -> Pipeline:
    crisp_env(monkeypatch, emulator)
    config = ActivationConfig(name=name, segment={"table": "people"},
                              fields={"person.nickname": "name"},
                              attributes=["plan", "score"], **extra)
    return Pipeline(emulator, str(tmp_path / "w.duckdb"), config)


def expected_state(rows: list[dict]) -> dict:
    return {r["email"]: ({"nickname": r["name"]}, {"plan": r["plan"], "score": r["score"]})
            for r in rows}


def state(pipeline: Pipeline) -> dict:
    return {email: (p["person"], p["data"]) for email, p in pipeline.crisp().items()}


def test_a_storm_of_faults_is_ridden_out_to_the_exact_expected_state(
        emulator, tmp_path, monkeypatch):
    pipeline = activation(emulator, tmp_path, monkeypatch)
    emulator.emulator.config.rate_limit_status = 420
    emulator.emulator.set_faults(FaultPlan(error_rate=0.15, drop_rate=0.1, latency_ms=5,
                                           latency_jitter_ms=40, slow_body_ms=20,
                                           rate_limit_burst=20), seed=5)
    rows = people(200)
    pipeline.load(rows)
    results = [pipeline.run()]
    while pipeline.metadata(results[-1], "crisp_sync").get("people_deferred") and len(results) < 3:
        results.append(pipeline.run())  # whatever was deferred goes out on the next run
    assert state(pipeline) == expected_state(rows)
    pipeline.assert_snapshot_matches_crisp()
    faults = [e.fault for e in emulator.emulator.requests() if e.fault]
    assert {"error_500", "error_503", "drop_before", "drop_after", "rate_limit_burst"} <= set(faults)
    sync = pipeline.metadata(results[0], "crisp_sync")
    assert sync["retries"] > 0 and sync["retry_wait_seconds"] > 0  # reported what it rode out
    assert any(status in route for route in sync["requests_by_route"]
               for status in ("420", "500", "503", "connection_error"))
    emulator.emulator.set_faults(FaultPlan())
    pipeline.run()
    assert pipeline.writes_of_last_run() == 0


def test_a_crisp_that_keeps_failing_opens_the_circuit_and_defers_the_rest(
        emulator, tmp_path, monkeypatch):
    pipeline = activation(emulator, tmp_path, monkeypatch)
    rows = people(300)
    pipeline.load(rows)
    emulator.emulator.set_faults(FaultPlan(forced=[ForcedAnswer(503, "server_error",
                                                                method="POST")]))
    result = pipeline.run()  # succeeds: nothing lost, everything deferred
    sync = pipeline.metadata(result, "crisp_sync")
    assert sync["people_deferred"] == 300 and "kept failing" in sync["deferred_because"]
    posts = [e for e in emulator.emulator.requests() if e.method == "POST"]
    assert len(posts) <= 60 * 6  # the circuit stopped well before 300 people x 6 attempts
    assert pipeline.checks(result)["no_failed_writes"].passed is False
    emulator.emulator.set_faults(FaultPlan())
    pipeline.run()
    assert state(pipeline) == expected_state(rows)
    pipeline.assert_snapshot_matches_crisp()


def test_bad_credentials_stop_the_run_at_once_naming_the_variable(
        emulator, tmp_path, monkeypatch):
    pipeline = activation(emulator, tmp_path, monkeypatch)
    monkeypatch.setenv("CRISP_TOKEN_KEY", "not-the-key")
    pipeline.load(people(50))
    result = pipeline.run(expect_success=False)
    assert "401" in pipeline.failure_text(result)
    assert "CRISP_TOKEN_KEY" in pipeline.failure_text(result)
    assert len(emulator.emulator.requests()) == 1  # no retry storm


def test_a_refused_scope_mid_sync_stops_the_run_and_keeps_what_was_confirmed(
        emulator, tmp_path, monkeypatch):
    pipeline = activation(emulator, tmp_path, monkeypatch)
    rows = people(50)
    pipeline.load(rows)
    emulator.emulator.set_faults(FaultPlan(forced=[ForcedAnswer(403, "not_allowed",
                                                                method="PATCH")]))
    result = pipeline.run(expect_success=False)
    assert "403" in pipeline.failure_text(result) and "scope" in pipeline.failure_text(result)
    patches = [e for e in emulator.emulator.requests() if e.method == "PATCH"]
    assert len(patches) <= 16  # what was in flight; nothing after the stop
    assert len(pipeline.crisp()) == 50  # the creates were confirmed and recorded
    pipeline.assert_snapshot_matches_crisp()
    emulator.emulator.set_faults(FaultPlan())
    pipeline.run()
    assert state(pipeline) == expected_state(rows)


def test_a_website_without_the_plugin_stops_the_run_naming_the_variable(
        emulator, tmp_path, monkeypatch):
    pipeline = activation(emulator, tmp_path, monkeypatch)
    monkeypatch.setenv("CRISP_WEBSITE_ID", "not-installed")
    pipeline.load(people(5))
    result = pipeline.run(expect_success=False)
    assert "not_subscribed" in pipeline.failure_text(result)
    assert "CRISP_WEBSITE_ID" in pipeline.failure_text(result)
    assert len(emulator.emulator.requests()) == 1


def test_the_token_key_is_nowhere_after_a_sync_with_failures(
        emulator, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    key = PLUGIN.key
    pipeline = activation(emulator, tmp_path, monkeypatch, name="secret")
    rows = people(40) + [{"email": "bad", "name": "B", "plan": "x", "score": 1}]
    pipeline.load(rows)
    emulator.emulator.set_faults(FaultPlan(error_rate=0.2, drop_rate=0.1), seed=2)
    ok = pipeline.run()
    emulator.emulator.set_faults(FaultPlan(forced=[ForcedAnswer(400, "invalid_data",
                                                                method="PATCH", times=3)]))
    pipeline.load(people(40, plan="team"))
    partial = pipeline.run()
    monkeypatch.setenv("CRISP_TOKEN_KEY", key + "-wrong")  # a failure that involves the key
    failed = pipeline.run(expect_success=False)

    texts = [record.getMessage() for record in caplog.records]
    texts += [str(record.args) for record in caplog.records]
    for result in (ok, partial, failed):
        run = pipeline.instance.get_run_by_id(result.run_id)
        texts.append(dg.serialize_value(run.run_config) if hasattr(dg, "serialize_value")
                     else str(run.run_config))
        texts.append(str(run.tags))
        for entry in pipeline.instance.all_logs(result.run_id):
            texts.append(str(entry))  # messages, metadata, errors with their stack traces
    texts.append(pipeline.failure_text(failed))
    connection = duckdb.connect(pipeline.db_path, read_only=True)
    try:
        for schema, table in connection.execute(
                "select table_schema, table_name from information_schema.tables").fetchall():
            texts.append(str(connection.sql(f'select * from "{schema}"."{table}"').fetchall()))
    finally:
        connection.close()
    texts.append(Path(pipeline.db_path).read_bytes().decode("latin-1"))
    texts.append(str([e.as_dict() for e in emulator.emulator.requests()]))
    assert sum(len(t) for t in texts) > 100_000  # the search covered real material
    assert not [t[:200] for t in texts if key in t]
    assert pipeline.store.read("outcomes").filter(pl.col("status") == "rejected").height > 0


def test_a_run_stopped_by_crisp_counts_nobody_it_did_not_send_as_done(
        emulator, tmp_path, monkeypatch):
    """A 403 on the first phase (deletes) stops the run: the updates never sent are
    deferred, not ok."""
    crisp_env(monkeypatch, emulator)
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), ActivationConfig(
        name="stopped", mode="mirror", segment={"table": "people"}, attributes=["plan"],
        guards={"max_delete_fraction": 1.0}))
    pipeline.load([{"email": f"s{i}@x.io", "plan": "pro"} for i in range(21)])
    pipeline.run()
    pipeline.load([{"email": f"s{i}@x.io", "plan": f"plan-{i}"} for i in range(20)])
    emulator.emulator.set_faults(FaultPlan(forced=[ForcedAnswer(403, "not_allowed",
                                                                method="DELETE")]))
    mark = len(emulator.emulator.requests())
    result = pipeline.run(expect_success=False)
    assert "not_allowed" in pipeline.failure_text(result)
    writes = [e for e in emulator.emulator.requests()[mark:]
              if e.method == "PATCH" and e.status < 300]
    last = pipeline.store.read("runs").sort("finished_at").to_dicts()[-1]
    assert writes == [] and last["people_ok"] == 0, last
    assert last["people_deferred"] == 21, last
    emulator.emulator.set_faults(FaultPlan())
    pipeline.run()
    assert {e: p["data"]["plan"] for e, p in pipeline.crisp().items()} == {
        f"s{i}@x.io": f"plan-{i}" for i in range(20)}
