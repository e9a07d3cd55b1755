"""The state shared by processes, as pods of a cluster share one Postgres (and processes of
one machine share a DuckDB file): the daily budget and the activation locks hold when
several processes use them at the very same moment.

Each child process is a plain Python interpreter using the state modules directly (no
Dagster), started together behind a barrier file so that their requests really overlap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from crisp_pipeline.state.budget import spent_today
from crisp_pipeline.state.store import connect_state

pytestmark = pytest.mark.usefixtures("state_backend")

PROCESSES = 4

BUDGET_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from crisp_pipeline.state.budget import StoredBudget
    from crisp_pipeline.state.store import connect_state
    path, go, block = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    budget = StoredBudget(connect_state(path), "shared-token", 500, block=block)
    while not go.exists():
        time.sleep(0.002)
    paid = 0
    while budget.try_spend(1):
        paid += 1
    budget.close()
    print(json.dumps({"paid": paid}))
""")

LOCK_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from crisp_pipeline.state import locks
    from crisp_pipeline.state.store import connect_state
    path, go, journal, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    connect = connect_state(path)
    while not go.exists():
        time.sleep(0.002)
    for turn in range(5):
        run_id = f"{name}-{turn}"
        locks.acquire(connect, "contended", run_id, wait_seconds=60)
        with open(journal, "a") as out:
            out.write(f"enter {run_id}\\n"); out.flush()
        time.sleep(0.03)
        with open(journal, "a") as out:
            out.write(f"leave {run_id}\\n"); out.flush()
        locks.release(connect, "contended", run_id)
""")


def _start_together(script: str, args_per_child: list[list[str]], go: Path) -> list[str]:
    children = [subprocess.Popen([sys.executable, "-c", script, *args],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=os.environ.copy())
                for args in args_per_child]
    time.sleep(1.5)  # every child imported and waiting
    go.touch()
    outputs = []
    for child in children:
        out, err = child.communicate(timeout=180)
        assert child.returncode == 0, err[-2000:]
        outputs.append(out)
    return outputs


# (DuckDB lets one process write at a time: blocks of 1 there take 15 s and prove nothing
# blocks of 7 do not)
@pytest.mark.parametrize("state_backend, block", [("duckdb", 7), ("postgres", 1),
                                                  ("postgres", 7)], indirect=["state_backend"])
def test_processes_spending_one_budget_at_once_spend_it_exactly(tmp_path, block, state_backend):
    """No overspend (the quota is never passed) and no lost update (every request paid is
    counted): together the processes pay exactly the quota, and the stored count says so."""
    path = str(tmp_path / "state.duckdb")
    go = tmp_path / "go"
    outputs = _start_together(BUDGET_CHILD, [[path, str(go), str(block)]] * PROCESSES, go)
    paid = [json.loads(out.strip().splitlines()[-1])["paid"] for out in outputs]
    assert sum(paid) == 500, paid
    assert spent_today(connect_state(path), "shared-token") == 500


def test_one_holder_at_a_time_across_processes(tmp_path):
    """Processes taking and giving back one activation's lock in a tight loop: no two ever
    hold it at once (each `enter` is followed by its own `leave`)."""
    path = str(tmp_path / "state.duckdb")
    go, journal = tmp_path / "go", tmp_path / "journal"
    _start_together(LOCK_CHILD, [[path, str(go), str(journal), f"p{i}"]
                                 for i in range(PROCESSES)], go)
    lines = journal.read_text().splitlines()
    assert len(lines) == PROCESSES * 5 * 2
    for enter, leave in zip(lines[::2], lines[1::2]):
        assert enter.startswith("enter ") and leave == "leave " + enter.split()[1], lines


def test_a_run_taking_its_own_lock_again_writes_only_when_its_heartbeat_ages(
        tmp_path, monkeypatch):
    """Every step takes the lock; a step of the run that holds it, in the process that holds
    it, reads it alone while the heartbeat is recent (no write transaction per step), and
    refreshes it once older than `REFRESH_AFTER`. A step in another process (a multi-process
    executor) writes its own pid. Another run is still refused."""
    from datetime import timedelta

    from crisp_pipeline.state import locks

    connect = connect_state(str(tmp_path / "state.duckdb"))

    def holder() -> tuple:
        with connect() as connection:
            return connection.execute(
                f"select pid, heartbeat_at from {locks._table(connection)} "
                "where activation = 'a'").fetchone()

    locks.acquire(connect, "a", "run-1", wait_seconds=0)
    taken = holder()
    locks.acquire(connect, "a", "run-1", wait_seconds=0)
    assert holder() == taken  # read, not written
    later = locks.now() + locks.REFRESH_AFTER + timedelta(seconds=1)
    monkeypatch.setattr(locks, "now", lambda: later)
    locks.acquire(connect, "a", "run-1", wait_seconds=0)
    assert holder()[1] == later
    with connect() as connection:  # (as a step of the run in another process left it)
        connection.execute(f"update {locks._table(connection)} set pid = 1")
    locks.acquire(connect, "a", "run-1", wait_seconds=0)
    assert holder()[0] == os.getpid()
    with pytest.raises(locks.ActivationLocked):
        locks.acquire(connect, "a", "run-2", wait_seconds=0,
                      run_active=lambda run_id: True)


def test_a_long_sync_writes_its_heartbeat_once_a_minute_not_after_every_batch(tmp_path):
    """A sync calls `heartbeat` after every batch it records (every 200 people, several a
    second); the lock is taken over only after `STALE_AFTER` of silence, so the heartbeat is
    written when it last was longer ago than `REFRESH_AFTER`, and a later run's is its own."""
    import uuid

    from crisp_pipeline.state import locks

    connect = connect_state(str(tmp_path / "state.duckdb"))

    def written() -> object:
        with connect() as connection:
            return connection.execute(
                f"select heartbeat_at from {locks._table(connection)} "
                "where activation = 'a'").fetchone()[0]

    one, two = f"run-{uuid.uuid4()}", f"run-{uuid.uuid4()}"
    locks.acquire(connect, "a", one, wait_seconds=0)
    locks.heartbeat(connect, "a", one)
    first = written()
    locks._BEATEN[("a", one)] -= 30  # as if written half a minute ago
    locks.heartbeat(connect, "a", one)
    assert written() == first  # nothing written
    locks._BEATEN[("a", one)] -= 31  # a minute and a second ago
    locks.heartbeat(connect, "a", one)
    assert written() > first
    locks.release(connect, "a", one)
    locks.acquire(connect, "a", two, wait_seconds=0)
    taken = written()
    locks.heartbeat(connect, "a", two)  # another run: its first heartbeat is written
    assert written() > taken


def test_a_budget_kept_past_midnight_reserves_from_the_new_day(tmp_path, monkeypatch,
                                                                state_backend):
    """The budget makes sure of its table once, then only updates the day's row: the next
    day's first reservation adds that day's row, and yesterday's unspent block goes back."""
    from crisp_pipeline.state import budget as budgets

    connect = connect_state(str(tmp_path / "state.duckdb"))
    day = ["2026-12-06"]
    monkeypatch.setattr(budgets, "_today", lambda: day[0])
    kept = budgets.StoredBudget(connect, "midnight", 100, block=10)
    assert kept.try_spend(3)
    assert spent_today(connect, "midnight") == 10  # a block reserved, 7 of it unspent
    day[0] = "2026-12-07"
    assert spent_today(connect, "midnight") == 0
    assert kept.try_spend(2)
    assert spent_today(connect, "midnight") == 10
    kept.close()
    assert spent_today(connect, "midnight") == 2
    day[0] = "2026-12-06"
    assert spent_today(connect, "midnight") == 3  # the 7 unspent went back to their day
