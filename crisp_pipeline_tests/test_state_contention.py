"""Another process holding the DuckDB file while a sync sends: the event loop never stalls on
it, sending stops, and everything Crisp confirmed is recorded once the file is free."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import polars as pl

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
    print("holding", flush=True)
    time.sleep(seconds)
    connection.close()
    print("released", flush=True)
""")


def test_a_state_file_held_by_another_process_defers_the_rest_and_loses_no_confirmed_create(
        emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    monkeypatch.setenv("CRISP_PIPELINE_DB_WAIT_SECONDS", "1")
    config = ActivationConfig(name="held", segment={"table": "people"},
                              fields={"person.nickname": "name"}, attributes=["n"])
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), config)
    pipeline.load([{"email": f"h{i:03d}@x.io", "name": f"H{i}", "n": i} for i in range(90)])
    emulator.emulator.set_faults(FaultPlan(latency_ms=250))
    root = emulator.base_url.removesuffix("v1/")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, root, ADMIN_KEY,
                               pipeline.db_path, "3"], stdout=subprocess.PIPE, text=True)
    try:
        result = pipeline.run()
    finally:
        output, _ = holder.communicate(timeout=60)
    assert "holding" in output and "released" in output
    emulator.emulator.set_faults(FaultPlan())
    sync = pipeline.metadata(result, "crisp_sync")
    assert "state store could not be reached" in sync["deferred_because"]
    created = pipeline.crisp()
    # the budget could not be paid from the held file either: what was not paid was not sent
    assert 0 < len(created) < 90
    # everything Crisp confirmed is recorded: every person created is in the snapshot
    snapshot = pipeline.snapshot()
    assert set(snapshot.get_column("identifier")) == set(created)
    outcomes = pipeline.store.read("outcomes")
    ok = outcomes.filter((pl.col("step") == "create") & (pl.col("status") == "ok"))
    assert set(ok.get_column("identifier")) == set(created)
    deferred = outcomes.filter(pl.col("status") == "deferred")
    assert set(deferred.get_column("reason")) <= {"state_unavailable"}
    assert outcomes.get_column("identifier").n_unique() == 90  # every planned person has a status
    pipeline.run()  # the rest goes out; nobody is created twice
    assert len(pipeline.crisp()) == 90 and pipeline.metadata(
        pipeline.run(), "change_set")["updates"] == 0
    pipeline.assert_snapshot_matches_crisp()
