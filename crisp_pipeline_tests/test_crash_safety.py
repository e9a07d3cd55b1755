"""Killing the sync (SIGKILL) at any moment and running again converges to the exact expected
Crisp state: no duplicate profile, no lost update, no snapshot claim Crisp does not back.

Why it holds: the change set is the run's intent, written before any request; only writes
Crisp answered 2xx enter the snapshot, committed per batch; so whatever a kill interrupts is
simply still in the next change set. Re-sending it is safe: a create whose answer was lost is
found by email (adoption, or `people_exists` on the create), never created twice; data merges
and profile patches are idempotent; a delete of someone already gone counts as done.

`CRISP_CRASH_TRIALS` (default 6 with the state in DuckDB, a quarter of it in Postgres: the same
code path but for the store's SQL, and CI stays under 15 minutes) and `CRISP_CRASH_PEOPLE`
(default 1,500) make it larger.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from crisp_pipeline.activation import ActivationConfig

from .conftest import WEBSITE
from .harness import Pipeline, crisp_env

pytestmark = pytest.mark.usefixtures("state_backend")

TRIALS = int(os.environ.get("CRISP_CRASH_TRIALS", "6"))
PEOPLE = int(os.environ.get("CRISP_CRASH_PEOPLE", "1500"))


def kill_during_a_run(pipeline: Pipeline, rng: random.Random, run_seconds: float) -> int:
    """Start the job in a child process, SIGKILL it at a random moment once it talks to
    Crisp; returns how many requests it had sent."""
    log = pipeline.emulator.emulator.requests
    mark = len(log())
    child = subprocess.Popen(
        [sys.executable, "-m", "crisp_pipeline_tests.crash_child", pipeline.db_path],
        env={**os.environ, "CRASH_ACTIVATION": pipeline.config.model_dump_json()},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(log()) == mark and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, run_seconds))  # anywhere in a run as long as the last one
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    return len(log()) - mark


def test_killing_the_sync_at_random_points_never_duplicates_or_loses_anything(
        emulator, tmp_path, monkeypatch, state_backend):
    crisp_env(monkeypatch, emulator)
    # many syncs in one "day": more than a plugin token's 5,000 requests (ours and Crisp's)
    monkeypatch.setenv("CRISP_DAILY_QUOTA", str(10**9))
    config = ActivationConfig(name="crash", mode="mirror", segment={"table": "people"},
                              fields={"person.nickname": "name"}, attributes=["plan", "score"],
                              guards={"max_deletes": 100_000, "max_delete_fraction": 1.0})
    pipeline = Pipeline(emulator, str(tmp_path / "crash.duckdb"), config)
    rng = random.Random(2024)
    source = {f"p{i:05d}@x.io": {"name": f"P {i}", "plan": rng.choice(["a", "b", "c"]),
                                 "score": i} for i in range(PEOPLE)}
    next_id = PEOPLE
    kills = []
    run_seconds = 8.0  # the first sync creates everyone
    trials = TRIALS if state_backend == "duckdb" else max(TRIALS // 4, 1)
    for trial in range(trials):
        if trial:  # each trial brings new work: changes, arrivals, departures
            for email in rng.sample(sorted(source), len(source) // 4):
                source[email] = {**source[email], "plan": rng.choice(["a", "b", "c", "d"]),
                                 "score": rng.randint(0, 10**6)}
            for email in rng.sample(sorted(source), 10):
                del source[email]
            for _ in range(20):
                source[f"p{next_id:05d}@x.io"] = {"name": f"P {next_id}", "plan": "a",
                                                  "score": next_id}
                next_id += 1
        pipeline.load([{"email": e, **v} for e, v in source.items()])
        emulator.emulator.quota.reset()
        kills.append(kill_during_a_run(pipeline, rng, run_seconds))
        started = time.monotonic()
        clean = pipeline.run()  # the clean run after the crash
        run_seconds = max(time.monotonic() - started, 1.0)
        sync = pipeline.metadata(clean, "crisp_sync")
        assert sync.get("people_deferred", 0) == 0, (trial, sync.get("deferred_because"),
                                                     sync.get("outcomes"))
        people = emulator.emulator.people(WEBSITE)
        assert len(people) == len({p["email"] for p in people}) == len(source), trial
        held = {p["email"]: (p["person"]["nickname"], p["data"]) for p in people}
        assert held == {e: (v["name"], {"plan": v["plan"], "score": v["score"]})
                        for e, v in source.items()}, f"trial {trial}: state differs"
        pipeline.assert_snapshot_matches_crisp()
    statuses = {e.status for e in emulator.emulator.requests()}
    assert 409 in statuses or any(k > 0 for k in kills)
    # the kills landed at many different moments of the runs
    assert len(set(kills)) >= trials // 2, kills
    print(f"{trials} kills survived, after {sorted(kills)} requests of the killed runs")
