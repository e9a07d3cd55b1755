"""Another process holding the DuckDB file while a sync sends: the event loop never stalls on
it, sending stops, and everything Crisp confirmed is recorded once the file is free."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import polars as pl
import pytest

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.emulator import FaultPlan

from .conftest import ADMIN_KEY
from .harness import Pipeline, crisp_env

HOLDER = textwrap.dedent("""
    import sys, time, duckdb, httpx
    base, key, path, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    while not any(e["method"] == "POST" for e in httpx.get(
            base + "_emulator/requests", headers={"x-emulator-admin": key}).json()):
        time.sleep(0.02)
    while True:
        try:
            connection = duckdb.connect(path)
            break
        except duckdb.IOException:
            time.sleep(0.01)
    print("holding", time.time(), flush=True)
    time.sleep(seconds)
    connection.close()
    print("released", time.time(), flush=True)
""")

# more people than the budget pays for ahead of the other process taking the file (it
# reserves a block of 50 as the sync starts and the next when half of one is spent)
PEOPLE = 150


@pytest.mark.parametrize("hold_seconds", ["0", "1"])
def test_a_state_file_held_by_another_process_defers_the_rest_and_loses_no_confirmed_create(
        emulator, tmp_path, monkeypatch, hold_seconds):
    """hold_seconds 0: the run opens the file for each use; 1: it keeps the file open, and
    lets go after a second at a stretch, so that the other process gets it mid-sync."""
    crisp_env(monkeypatch, emulator)
    monkeypatch.setenv("CRISP_PIPELINE_DB_WAIT_SECONDS", "1")
    monkeypatch.setenv("CRISP_PIPELINE_DB_HOLD_SECONDS", hold_seconds)
    config = ActivationConfig(name="held", segment={"table": "people"},
                              fields={"person.nickname": "name"}, attributes=["n"])
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), config)
    pipeline.load([{"email": f"h{i:03d}@x.io", "name": f"H{i}", "n": i} for i in range(PEOPLE)])
    emulator.emulator.set_faults(FaultPlan(latency_ms=250))
    root = emulator.base_url.removesuffix("v1/")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, root, ADMIN_KEY,
                               pipeline.db_path, "3"], stdout=subprocess.PIPE, text=True)
    try:
        result = pipeline.run()
        finished = time.time()
    finally:
        output, _ = holder.communicate(timeout=60)
    moments = dict(line.split() for line in output.splitlines())
    # the other process got the file while the run was still going, not only after it
    assert float(moments["holding"]) < float(moments["released"]) <= finished
    emulator.emulator.set_faults(FaultPlan())
    sync = pipeline.metadata(result, "crisp_sync")
    created = pipeline.crisp()
    if hold_seconds == "0":  # the run needs the file often, so it meets the held file
        assert "state store could not be reached" in sync["deferred_because"]
        # the budget could not be paid from the held file: what was not paid was not sent
        assert 0 < len(created) < PEOPLE
    # everything Crisp confirmed is recorded: every person created is in the snapshot
    snapshot = pipeline.snapshot()
    assert set(snapshot.get_column("identifier")) == set(created)
    outcomes = pipeline.store.read("outcomes")
    ok = outcomes.filter((pl.col("step") == "create") & (pl.col("status") == "ok"))
    assert set(ok.get_column("identifier")) == set(created)
    deferred = outcomes.filter(pl.col("status") == "deferred")
    assert set(deferred.get_column("reason")) <= {"state_unavailable"}
    assert outcomes.get_column("identifier").n_unique() == PEOPLE  # every planned person has a status
    pipeline.run()  # the rest goes out; nobody is created twice
    assert len(pipeline.crisp()) == PEOPLE and pipeline.metadata(
        pipeline.run(), "change_set")["updates"] == 0
    pipeline.assert_snapshot_matches_crisp()


def test_the_warehouse_resource_connects_while_a_run_keeps_the_state_open(tmp_path):
    """DuckDB refuses, in one process, a second connection to a file with other settings:
    the state is kept open with the settings of DuckDBResource.get_connection()."""
    from dagster_duckdb import DuckDBResource

    from crisp_pipeline.orchestration.resources import state_connector as _connector

    resource = DuckDBResource(database=str(tmp_path / "w.duckdb"))
    connect = _connector(resource)
    with connect.kept_open():
        with connect() as connection:
            connection.execute("create table t as select 1 as x")
        with resource.get_connection() as connection:
            assert connection.execute("select x from t").fetchone() == (1,)
