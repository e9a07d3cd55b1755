"""How a run treats the DuckDB state file it keeps open (`state.store.file_kept_open`): its
commits are durable in the WAL and checkpointed once, when the file is let go; and the
step's objects, not the whole process's, are what Python's cycle collector walks while a step
runs (`orchestration.run_scope`)."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import duckdb
import pytest

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.state.store import connect_file, file_kept_open

from .harness import Pipeline, crisp_env

ROWS = 500_000  # five row groups of DuckDB's 122,880 rows


@pytest.fixture
def state_file(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("CRISP_PIPELINE_DB_HOLD_SECONDS", "30")
    path = str(tmp_path / "state.duckdb")
    with duckdb.connect(path) as connection:
        connection.execute(f"create table t as select range as i, repeat('x', 40) || range "
                           f"as s from range({ROWS})")
    return path


@contextlib.contextmanager
def held_by_another_process(path: str) -> Iterator[None]:
    """The DuckDB file opened for writing by another process for the block."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, time
        connection = duckdb.connect({path!r})
        print("holding", flush=True)
        time.sleep(60)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield
    finally:
        holder.kill()
        holder.wait()


def wal_bytes(path: str) -> int:
    return os.path.getsize(f"{path}.wal") if os.path.exists(f"{path}.wal") else 0


def test_a_held_file_checkpoints_when_let_go_not_at_each_commit(state_file):
    connect = connect_file(state_file)
    with file_kept_open(state_file):
        logged = [0]
        for step in range(3):  # each large enough for DuckDB to checkpoint after it
            with connect() as connection:
                connection.execute(f"update t set s = s || '{step}' || repeat('y', 60)")
            logged.append(wal_bytes(state_file))  # committed: in the WAL
        assert logged == sorted(set(logged))  # and none checkpointed while held
    assert wal_bytes(state_file) == 0
    with duckdb.connect(state_file, read_only=True) as connection:
        assert connection.execute("select s from t where i = 3").fetchone()[0] == \
            "x" * 40 + "3" + "".join(f"{step}" + "y" * 60 for step in range(3))


def test_commits_of_a_held_file_survive_a_killed_process(state_file):
    """Nothing committed is lost when the process dies before letting go of the file."""
    child = textwrap.dedent(f"""
        import os
        from crisp_pipeline.state.store import connect_file, file_kept_open
        connect = connect_file({state_file!r})
        with file_kept_open({state_file!r}):
            with connect() as connection:
                connection.execute("update t set s = 'committed' where i < 1000")
            os._exit(9)  # no close, no checkpoint
    """)
    done = subprocess.run([sys.executable, "-c", child], env={
        **os.environ, "CRISP_PIPELINE_DB_HOLD_SECONDS": "30"}, timeout=120)
    assert done.returncode == 9
    assert wal_bytes(state_file) > 0
    with duckdb.connect(state_file, read_only=True) as connection:
        assert connection.execute("select count(*) from t where s = 'committed'"
                                  ).fetchone()[0] == 1000


def test_a_file_opened_for_single_uses_keeps_duckdbs_defaults(state_file, monkeypatch):
    """Without the hold, every use's connection is the last one: DuckDB checkpoints when it
    closes (the setting above lasts only while the file is held)."""
    monkeypatch.setenv("CRISP_PIPELINE_DB_HOLD_SECONDS", "0")
    with file_kept_open(state_file), connect_file(state_file)() as connection:
        connection.execute("update t set s = 'one use' where i % 3 = 0")
    assert wal_bytes(state_file) == 0
    with file_kept_open(state_file), connect_file(state_file)() as connection:
        assert connection.execute("select current_setting('checkpoint_threshold')"
                                  ).fetchone()[0] == "16.0 MiB"


def test_a_step_leaves_the_objects_from_before_it_to_the_collector_and_gives_them_back(
        emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    config = ActivationConfig(name="gcs", segment={"table": "people"}, mode="upsert",
                              attributes=["plan"])
    pipeline = Pipeline(emulator, str(tmp_path / "g.duckdb"), config)
    pipeline.load([{"email": "a@x.io", "plan": "pro"}])
    seen: list[int] = []
    from crisp_pipeline.sync import prepare
    normalize = prepare.normalize_segment

    def watched(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return normalize(*args, **kwargs)
    monkeypatch.setattr(prepare, "normalize_segment", watched)
    before = gc.get_freeze_count()
    pipeline.run()
    assert seen and seen[0] > before + 10_000  # Dagster's objects and ours, set aside
    assert gc.get_freeze_count() == before  # and handed back
    assert pipeline.crisp()["a@x.io"]["data"] == {"plan": "pro"}


def test_objects_the_process_froze_stay_frozen_through_a_run(emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    config = ActivationConfig(name="gcp", segment={"table": "people"}, mode="upsert",
                              attributes=["plan"])
    pipeline = Pipeline(emulator, str(tmp_path / "g.duckdb"), config)
    pipeline.load([{"email": "a@x.io", "plan": "pro"}])
    sentinel = [object()]  # (tracked by the collector)
    gc.freeze()  # (as a server that forks workers does)
    try:
        assert not any(o is sentinel for o in gc.get_objects())  # frozen: not listed
        pipeline.run()
        assert not any(o is sentinel for o in gc.get_objects())  # and never thawed
    finally:
        gc.unfreeze()
    assert any(o is sentinel for o in gc.get_objects())
    assert pipeline.crisp()["a@x.io"]["data"] == {"plan": "pro"}


def test_a_wait_for_a_file_another_process_holds_ends_at_the_limit(state_file, monkeypatch):
    """CRISP_PIPELINE_DB_WAIT_SECONDS bounds the wait: the backoff between tries grows to
    2 s, and a last sleep must not carry the wait past the limit (the run then defers what
    it could not record or pay, as documented, instead of waiting on)."""
    from crisp_pipeline.state.store import StateUnavailable, open_duckdb

    with held_by_another_process(state_file):
        monkeypatch.setenv("CRISP_PIPELINE_DB_WAIT_SECONDS", "1")
        waits = []
        for _ in range(8):  # (the backoff is random)
            started = time.monotonic()
            with pytest.raises(StateUnavailable):
                open_duckdb(state_file)
            waits.append(time.monotonic() - started)
        assert max(waits) < 1.5, waits


def test_the_runs_earlier_writes_are_checkpointed_while_the_sync_waits_on_crisp(
        emulator, tmp_path, monkeypatch):
    """The segment's and the change set's writes are in the WAL when the sync starts (the
    file is held from the first step); they are checkpointed while the first requests wait
    on Crisp, so that the step's end has only the sync's own writes left to checkpoint."""
    from crisp_pipeline.emulator.faults import FaultPlan
    from crisp_pipeline.state.store import StateStore

    crisp_env(monkeypatch, emulator)
    monkeypatch.setenv("CRISP_PIPELINE_DB_HOLD_SECONDS", "30")
    config = ActivationConfig(name="ckpt", segment={"table": "people"}, mode="upsert",
                              attributes=["plan", "note"])
    path = str(tmp_path / "c.duckdb")
    pipeline = Pipeline(emulator, path, config)
    people = [{"email": f"p{i}@x.io", "plan": "pro", "note": "n" * 50} for i in range(300)]
    pipeline.load(people)
    pipeline.run()
    pipeline.load([{**p, "note": "changed " * 8} if i % 10 == 0 else p
                   for i, p in enumerate(people)])
    at_start, at_first_record = [], []
    from crisp_pipeline.orchestration import assets
    apply_change_set, record_batch = assets.apply_change_set, StateStore.record_batch

    def starting(*args, **kwargs):
        at_start.append(wal_bytes(path))
        return apply_change_set(*args, **kwargs)

    def recording(self, *args, **kwargs):
        if not at_first_record:  # once Crisp confirmed the first writes
            at_first_record.append(wal_bytes(path))
        return record_batch(self, *args, **kwargs)
    monkeypatch.setattr(assets, "apply_change_set", starting)
    monkeypatch.setattr(StateStore, "record_batch", recording)
    emulator.emulator.set_faults(FaultPlan(latency_ms=200))
    try:
        result = pipeline.run()
    finally:
        emulator.emulator.set_faults(FaultPlan())
    assert result.success
    assert at_start and at_start[0] > 0  # the segment's and change set's commits
    assert at_first_record == [0]  # checkpointed before the sync recorded anything
    assert wal_bytes(path) == 0  # and the sync's own writes when the file was let go
    assert pipeline.crisp()["p0@x.io"]["data"]["note"] == "changed " * 8


class _FailingCheckpoints:
    """A held connection whose checkpoints fail as on a full disk (DuckDB then invalidates
    the database in the process); everything else goes to the real connection."""

    def __init__(self, connection) -> None:
        self.connection, self.closed = connection, False

    def execute(self, query, *args):
        if query.strip().lower() == "checkpoint":
            raise duckdb.FatalException("could not write: No space left on device")
        return self.connection.execute(query, *args)

    def close(self) -> None:
        self.closed = True
        self.connection.close()


def test_a_failed_checkpoint_lets_go_of_the_file_and_loses_no_commit(state_file):
    from crisp_pipeline.state import store as state_store

    connect = connect_file(state_file)
    with file_kept_open(state_file):
        with connect() as connection:
            connection.execute("update t set s = 'committed' where i < 10")
        hold = state_store._HOLDS[os.path.realpath(state_file)]
        failing = hold.connection = _FailingCheckpoints(hold.connection)
        store = state_store.StateStore(connect, "s")
        with pytest.raises(duckdb.FatalException, match="No space left"):
            store.checkpoint()
        assert failing.closed and hold.connection is None  # let go of
        with connect() as connection:  # opened again, from the file and its log
            assert connection.execute("select count(*) from t where s = 'committed'"
                                      ).fetchone()[0] == 10
            connection.execute("update t set s = 'after' where i < 5")
    with duckdb.connect(state_file, read_only=True) as connection:
        assert connection.execute("select count(*) from t where s in ('committed', 'after')"
                                  ).fetchone()[0] == 10


def test_a_file_this_process_does_not_hold_is_not_checkpointed_nor_waited_for(state_file):
    """Opened for single uses, every close checkpoints; and another process may hold the
    file: the sync's checkpoint neither opens nor waits for it."""
    from crisp_pipeline.state.store import StateStore

    with held_by_another_process(state_file):
        started = time.monotonic()
        StateStore(connect_file(state_file), "s").checkpoint()
        assert time.monotonic() - started < 0.5


def _sync_of_30(emulator, tmp_path, monkeypatch, name: str) -> Pipeline:
    crisp_env(monkeypatch, emulator)
    monkeypatch.setenv("CRISP_DAILY_QUOTA", "10000")
    monkeypatch.setenv("CRISP_PIPELINE_DB_HOLD_SECONDS", "30")
    config = ActivationConfig(name=name, segment={"table": "people"},
                              fields={"person.nickname": "name"})
    pipeline = Pipeline(emulator, str(tmp_path / f"{name}.duckdb"), config)
    pipeline.load([{"email": f"b{i}@x.io", "name": f"B{i}"} for i in range(30)])
    return pipeline


def test_a_sync_whose_checkpoint_fails_sends_and_records_everything(
        emulator, tmp_path, monkeypatch, caplog):
    from crisp_pipeline.state.store import StateStore

    pipeline = _sync_of_30(emulator, tmp_path, monkeypatch, "ckfail")

    def failing(self):
        raise duckdb.FatalException("could not write: No space left on device")
    monkeypatch.setattr(StateStore, "checkpoint", failing)
    result = pipeline.run()
    assert result.success and len(pipeline.crisp()) == 30
    pipeline.assert_snapshot_matches_crisp()
    assert "No space left on device" in caplog.text


def test_one_failed_budget_reservation_at_the_start_of_a_sync_stops_nothing(
        emulator, tmp_path, monkeypatch):
    """(A Postgres statement timeout under a shared token, say.) The first spend asks
    again, as it would have without the reservation ahead."""
    from crisp_pipeline.orchestration import assets
    from crisp_pipeline.state import budget

    pipeline = _sync_of_30(emulator, tmp_path, monkeypatch, "bfail")
    add, apply_change_set, failures = budget._add, assets.apply_change_set, []

    def failing_once_in_the_sync(*args, **kwargs):
        if failures == ["armed"]:
            failures.append("failed")
            raise RuntimeError("canceling statement due to statement timeout")
        return add(*args, **kwargs)

    def syncing(*args, **kwargs):
        failures.append("armed")
        return apply_change_set(*args, **kwargs)
    monkeypatch.setattr(budget, "_add", failing_once_in_the_sync)
    monkeypatch.setattr(assets, "apply_change_set", syncing)
    result = pipeline.run()
    assert failures == ["armed", "failed"]
    assert result.success and len(pipeline.crisp()) == 30
    # every request Crisp saw was paid, once
    assert budget.spent_today(pipeline.store._connect, "plugin-id") == len(
        pipeline.requests_of_last_run())


def test_a_sync_whose_budget_cannot_reach_the_file_does_not_wait_for_it_again(
        emulator, tmp_path, monkeypatch):
    from crisp_pipeline.state.budget import StoredBudget
    from crisp_pipeline.state.store import StateStore

    pipeline = _sync_of_30(emulator, tmp_path, monkeypatch, "bheld")
    checkpoints = []
    monkeypatch.setattr(StoredBudget, "reserve_block", lambda self: False)
    monkeypatch.setattr(StateStore, "checkpoint", lambda self: checkpoints.append(1))
    result = pipeline.run()
    assert result.success and len(pipeline.crisp()) == 30 and checkpoints == []


def test_a_file_another_process_is_still_creating_is_waited_for(tmp_path):
    """Several processes starting on a fresh state file: one creates it, and another may
    open it before DuckDB has written its header. That is waited for, not taken for a file
    that is not DuckDB's."""
    import threading

    from crisp_pipeline.state.store import open_duckdb

    path = tmp_path / "state.duckdb"
    path.write_bytes(b"")  # created, header not yet written

    def create() -> None:
        time.sleep(0.3)
        path.unlink()
        duckdb.connect(str(path)).close()
    creator = threading.Thread(target=create)
    creator.start()
    try:
        open_duckdb(str(path)).close()
    finally:
        creator.join()


def test_a_file_that_is_not_duckdbs_fails_at_once_naming_it(tmp_path):
    from crisp_pipeline.state.store import StateUnavailable, open_duckdb

    path = tmp_path / "notes.duckdb"
    path.write_text("not a database " * 1000)
    old = time.time() - 60
    os.utime(path, (old, old))
    started = time.monotonic()
    with pytest.raises(StateUnavailable, match="notes.duckdb"):
        open_duckdb(str(path))
    assert time.monotonic() - started < 1
