"""Mirror you can trust (issue 8): identity, ownership, configuration changes, eroding guards,
concurrent runs and stale change sets, each met as a user meets it: an `ActivationConfig`, the
job run end to end through Dagster over the emulator's real sockets, and Crisp's state read
back from the emulator (never from what the code under test computed).

The tests follow the eight cases of the issue, then the mirror policy. Tests whose name starts
with `test_new_setting_` (and the `window_hours` case of the rolling-window test) use settings
the fix introduces (`mirror: {on_leave, delete_adopted, grace_runs}`, `guards.window_hours`,
the run option `crisp_run.lock_wait_seconds`): before the fix they fail because the setting
does not exist. Every other test uses only what the configuration already accepts.

Concurrent runs are separate processes (`concurrent_child`), sharing the DuckDB file; the
emulator runs in this process, so its request log sees both.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

import dagster as dg
import duckdb
import polars as pl
import pytest

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.emulator import FaultPlan, ForcedAnswer, RunningEmulator
from crisp_pipeline.state.budget import spent_today
from crisp_pipeline.state.store import connect_state

from .concurrent_child import reconstructable_job
from .conftest import duckdb_state_only, OTHER_WEBSITE, PLUGIN, WEBSITE, WEBSITE_TOKEN
from .harness import Pipeline, crisp_env

pytestmark = pytest.mark.usefixtures("state_backend")

LOOSE = {"max_deletes": 1000, "max_delete_fraction": 0.5}
SCHEMA = {"email": pl.String, "name": pl.String, "plan": pl.String}
EXTERNAL = {"external_id": "uid", "email": "email"}


# ---------------------------------------------------------------- helpers


def pipeline_for(emulator: RunningEmulator, tmp_path, monkeypatch, *, instance=None,
                 **config) -> Pipeline:
    crisp_env(monkeypatch, emulator)
    config.setdefault("segment", {"table": "people"})
    return Pipeline(emulator, str(tmp_path / "w.duckdb"), ActivationConfig(**config),
                    instance=instance)


def people_ids(emulator: RunningEmulator, website: str = WEBSITE) -> dict[str, str]:
    """email -> people_id of every person Crisp holds on the website."""
    return {p["email"]: p["people_id"] for p in emulator.emulator.people(website)}


def requests_since(emulator: RunningEmulator, mark: int) -> list:
    return emulator.emulator.requests()[mark:]


def deletes_since(emulator: RunningEmulator, mark: int) -> list:
    """Profile deletions Crisp accepted since `mark` in its request log."""
    return [r for r in requests_since(emulator, mark)
            if r.method == "DELETE" and "/people/" in r.path and 200 <= r.status < 300]


def creates_since(emulator: RunningEmulator, mark: int) -> list:
    return [r for r in requests_since(emulator, mark)
            if r.method == "POST" and r.path.endswith("/people/profile")
            and 200 <= r.status < 300]


def mark(emulator: RunningEmulator) -> int:
    return len(emulator.emulator.requests())


def described(requests: list) -> str:
    return f"{len(requests)} request(s): " + ", ".join(
        f"{r.method} {r.path}" for r in requests[:3]) + (" ..." if len(requests) > 3 else "")


def change_set_rows(pipeline: Pipeline, op: str, reason: str | None = None) -> list[dict]:
    frame = pipeline.store.read("change_set")
    if frame.is_empty():
        return []
    frame = frame.filter(pl.col("op") == op)
    if reason is not None:
        frame = frame.filter(pl.col("reason").fill_null("").str.contains(reason))
    return frame.to_dicts()


def load_waiting(db_path: str, rows: list[dict], schema: dict, table: str = "people") -> None:
    """Pipeline.load, waiting out another process holding the DuckDB file (concurrent runs)."""
    frame = pl.DataFrame(rows, schema=schema)
    deadline = time.monotonic() + 60
    while True:
        try:
            connection = duckdb.connect(db_path)
        except duckdb.IOException as error:
            if "lock" not in str(error).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        try:
            connection.register("source_rows", frame.to_arrow())
            connection.execute(f"create or replace table {table} as select * from source_rows")
            return
        finally:
            connection.close()


class Child:
    """The activation's job in a separate process (`concurrent_child`), sharing the DuckDB file."""

    def __init__(self, pipeline: Pipeline, token=PLUGIN, run_config: dict | None = None,
                 go: str | None = None) -> None:
        """With `go` (a path), the child gets ready and starts its run when `start()` is called."""
        self.run_id = str(uuid.uuid4())
        self.go = go
        self.out = tempfile.TemporaryFile(mode="w+")
        self.err = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "TRUST_ACTIVATION": pipeline.config.model_dump_json(),
               "TRUST_DB": pipeline.db_path, "CRISP_TOKEN_IDENTIFIER": token.identifier,
               "CRISP_TOKEN_KEY": token.key, "CRISP_TIER": token.tier}
        env.pop("TRUST_GO", None)
        if go:
            env["TRUST_GO"] = go
        args = [sys.executable, "-m", "crisp_pipeline_tests.concurrent_child", self.run_id]
        if run_config:
            args.append(json.dumps(run_config))
        self.process = subprocess.Popen(args, env=env, stdout=self.out, stderr=self.err)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.go + ".ready"):
            if not self.running() or time.monotonic() > deadline:
                raise AssertionError("the child never got ready: " + json.dumps(self.wait()))
            time.sleep(0.01)

    def start(self) -> None:
        with open(self.go, "w"):
            pass

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = 120) -> dict:
        self.process.wait(timeout=timeout)
        self.out.seek(0)
        lines = [line for line in self.out.read().splitlines() if line.startswith("{")]
        if not lines:
            self.err.seek(0)
            return {"run_id": self.run_id, "success": False,
                    "failure": "child printed no outcome: " + self.err.read()[-3000:]}
        return json.loads(lines[-1])

    def kill(self) -> None:
        if self.running():
            self.process.kill()
            self.process.wait(timeout=30)


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in started:
            child.kill()


def wait_for_first_request(emulator: RunningEmulator, since: int, child: Child,
                           token=PLUGIN, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.running():
        if any(r.token == token.identifier for r in requests_since(emulator, since)):
            return
        time.sleep(0.01)
    raise AssertionError("the child run never talked to Crisp (or ended first): "
                         + json.dumps(child.wait(timeout=30)))


# ================================================================ the eight cases of issue 8


# ---------------------------------------------------------------- 1. one Crisp person, two rows


@pytest.mark.parametrize("second_email", ["shared@x.io", "SHARED@x.io"])
@duckdb_state_only
def test_two_external_ids_sharing_an_email_are_both_rejected_and_nobody_is_created(
        emulator, tmp_path, monkeypatch, second_email):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="shared", mode="mirror",
                            identifier=EXTERNAL, attributes=["plan"], guards=LOOSE)
    pipeline.load([{"uid": 1, "email": "shared@x.io", "plan": "a"},
                   {"uid": 2, "email": second_email, "plan": "b"},
                   {"uid": 3, "email": "solo@x.io", "plan": "c"}])
    pipeline.run()
    assert set(pipeline.crisp()) == {"solo@x.io"}, "a person was created for the shared email"
    rejected = pipeline.store.read("rejected")
    shared = rejected.filter(pl.col("reason") == "shared_email") if rejected.height else rejected
    assert sorted(shared["identifier"].to_list()) == ["1", "2"], rejected.to_dicts()
    assert set(shared["field"]) == {"email"}


def test_mirror_never_deletes_a_person_a_current_source_row_still_reaches(
        emulator, tmp_path, monkeypatch):
    """uid 1 is synced; uid 2 arrives with the same email (in another case); uid 1 leaves.
    At no point may the person be deleted: some source row reaches them at every run."""
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="reach", mode="mirror",
                            identifier=EXTERNAL, attributes=["plan"], guards=LOOSE)
    others = [{"uid": 10 + i, "email": f"o{i}@x.io", "plan": "x"} for i in range(8)]
    uid1 = {"uid": 1, "email": "shared@x.io", "plan": "a"}
    uid2 = {"uid": 2, "email": "SHARED@x.io", "plan": "b"}
    pipeline.load([uid1, *others])
    pipeline.run()
    shared_id = people_ids(emulator)["shared@x.io"]
    start = mark(emulator)
    for step, source in enumerate([[uid1, uid2, *others], [uid2, *others]], start=2):
        pipeline.load(source)
        pipeline.run(expect_success=None)
        ids = people_ids(emulator)
        assert ids.get("shared@x.io") == shared_id, (
            f"run {step}: shared@x.io is {ids.get('shared@x.io')} in Crisp, was {shared_id}")
    deleted = deletes_since(emulator, start)
    assert not deleted, "deleted: " + described(deleted)
    assert set(people_ids(emulator)) == {"shared@x.io"} | {o["email"] for o in others}


# ---------------------------------------------------------------- 2. identifier changed


def test_changing_the_identifier_rekeys_people_without_deleting_or_recreating_anyone(
        emulator, tmp_path, monkeypatch):
    base = dict(name="rekey", mode="mirror", attributes=["plan"],
                guards={"max_deletes": 100, "max_delete_fraction": 0.6})
    rows = [{"uid": 100 + i, "email": f"p{i:02d}@x.io", "plan": "pro"} for i in range(20)]
    by_email = pipeline_for(emulator, tmp_path, monkeypatch, **base)
    by_email.load(rows)
    by_email.run()
    before = people_ids(emulator)
    assert len(before) == 20

    by_uid = Pipeline(emulator, by_email.db_path,
                      ActivationConfig(**base, segment={"table": "people"}, identifier=EXTERNAL),
                      instance=by_email.instance)
    start = mark(emulator)
    result = by_uid.run(expect_success=None)
    deleted, created = deletes_since(emulator, start), creates_since(emulator, start)
    assert not deleted, "an identifier change deleted people: " + described(deleted)
    assert not created, "an identifier change re-created people: " + described(created)
    assert people_ids(emulator) == before, "people lost their people_id"
    crisp = by_uid.crisp()
    assert {email: person["data"] for email, person in crisp.items()} == {
        row["email"]: {"uid": row["uid"], "plan": "pro"} for row in rows}, \
        by_uid.failure_text(result)


# ---------------------------------------------------------------- 3. identifier went missing


@duckdb_state_only
def test_a_row_whose_email_went_blank_does_not_delete_the_person(emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="blank", mode="mirror",
                            fields={"person.nickname": "name"}, attributes=["plan"],
                            guards=LOOSE)
    rows = [{"email": f"k{i}@x.io", "name": f"K{i}", "plan": "pro"} for i in range(10)]
    pipeline.load(rows, schema=SCHEMA)
    pipeline.run()
    before = people_ids(emulator)

    start = mark(emulator)
    pipeline.load([{**rows[0], "email": None}, *rows[1:]], schema=SCHEMA)
    pipeline.run(expect_success=None)  # may succeed: the deletion is only held
    deleted = deletes_since(emulator, start)
    assert not deleted and people_ids(emulator) == before, (
        "k0 (email now NULL in the source) was deleted: " + described(deleted))
    held = change_set_rows(pipeline, "skip", "departure_held")
    assert "k0@x.io" in {row["identifier"] for row in held}, pipeline.store.read(
        "change_set").to_dicts()

    pipeline.load(rows, schema=SCHEMA)  # the email is back: nothing was lost
    pipeline.run()
    assert people_ids(emulator) == before
    pipeline.assert_snapshot_matches_crisp()


@duckdb_state_only
def test_rows_that_never_had_an_email_do_not_stall_a_real_departure(
        emulator, tmp_path, monkeypatch):
    """Guards the fix against holding every deletion forever: only *new* ambiguity holds."""
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="nomail", mode="mirror",
                            fields={"person.nickname": "name"}, attributes=["plan"],
                            guards=LOOSE)
    rows = [{"email": f"p{i}@x.io", "name": f"P{i}", "plan": "pro"} for i in range(20)]
    unidentified = [{"email": None, "name": f"Anon {i}", "plan": "free"} for i in range(3)]
    pipeline.load(rows + unidentified, schema=SCHEMA)
    pipeline.run()
    pipeline.run()  # a second run with the very same source
    assert len(pipeline.crisp()) == 20

    pipeline.load([r for r in rows if r["email"] != "p5@x.io"] + unidentified, schema=SCHEMA)
    pipeline.run()
    crisp = pipeline.crisp()
    assert "p5@x.io" not in crisp, "a real departure was held because of rows that never " \
        "had an email"
    assert set(crisp) == {r["email"] for r in rows} - {"p5@x.io"}


# ---------------------------------------------------------------- 4. two activations, one website


def test_a_mirror_never_deletes_a_person_another_activation_still_holds(
        emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    db = str(tmp_path / "w.duckdb")
    mirror_a = Pipeline(emulator, db, ActivationConfig(
        name="team_a", mode="mirror", segment={"table": "people_a"}, attributes=["plan_a"],
        guards=LOOSE))
    upsert_b = Pipeline(emulator, db, ActivationConfig(
        name="team_b", mode="upsert", segment={"table": "people_b"}, attributes=["plan_b"]),
        instance=mirror_a.instance)
    only_a = [{"email": f"a{i}@x.io", "plan_a": "a"} for i in range(6)]
    shared_a = [{"email": f"s{i}@x.io", "plan_a": "a"} for i in range(3)]
    b_rows = ([{"email": f"s{i}@x.io", "plan_b": "b"} for i in range(3)]
              + [{"email": f"b{i}@x.io", "plan_b": "b"} for i in range(3)])
    mirror_a.load(only_a + shared_a, table="people_a")
    mirror_a.run()
    upsert_b.load(b_rows, table="people_b")
    upsert_b.run()
    before = people_ids(emulator)
    assert len(before) == 12

    # s0 and a0 leave A's segment; s0 is still in B's
    mirror_a.load(only_a[1:] + shared_a[1:], table="people_a")
    mirror_a.run(expect_success=None)
    ids = people_ids(emulator)
    assert ids.get("s0@x.io") == before["s0@x.io"], "A deleted s0, whom B still holds"
    assert "a0@x.io" not in ids, "A must still delete people only it holds"

    upsert_b.run()
    crisp = upsert_b.crisp()
    assert "s0@x.io" in crisp, "s0 is in B's segment but not in Crisp, and B does not bring " \
        "them back"
    assert crisp["s0@x.io"]["data"].get("plan_b") == "b"
    upsert_b.assert_snapshot_matches_crisp()


# ---------------------------------------------------------------- 5. website changed


@pytest.mark.parametrize("mode", ["upsert", "mirror"])
@pytest.mark.parametrize("how", ["website_id", "CRISP_WEBSITE_ID"])
def test_changing_the_website_syncs_everyone_to_the_new_one_and_leaves_the_old_alone(
        emulator, tmp_path, monkeypatch, how, mode):
    base = dict(name="moved", mode=mode, fields={"person.nickname": "name"},
                attributes=["plan"], guards=LOOSE)
    rows = [{"email": f"m{i:02d}@x.io", "name": f"M{i}", "plan": "pro"} for i in range(20)]
    first = pipeline_for(emulator, tmp_path, monkeypatch,
                         **base, **({"website_id": WEBSITE} if how == "website_id" else {}))
    first.load(rows, schema=SCHEMA)
    first.run()
    old_site = emulator.emulator.people(WEBSITE)
    assert len(old_site) == 20 and emulator.emulator.people(OTHER_WEBSITE) == []

    if how == "website_id":
        config = ActivationConfig(**base, segment={"table": "people"}, website_id=OTHER_WEBSITE)
    else:
        monkeypatch.setenv("CRISP_WEBSITE_ID", OTHER_WEBSITE)
        config = first.config
    moved = Pipeline(emulator, first.db_path, config, instance=first.instance)
    start = mark(emulator)
    result = moved.run(expect_success=None)
    new_site = moved.crisp(OTHER_WEBSITE)
    assert len(new_site) == len(rows), (
        f"{len(new_site)} of {len(rows)} people in the new website; "
        + moved.failure_text(result))
    assert {e: (p["person"].get("nickname"), p["data"]) for e, p in new_site.items()} == {
        r["email"]: (r["name"], {"plan": r["plan"]}) for r in rows}
    assert emulator.emulator.people(WEBSITE) == old_site, "the old website was changed"
    assert not [r for r in requests_since(emulator, start)
                if f"/website/{WEBSITE}/" in r.path and r.method != "GET"], \
        "writes were sent to the old website"
    moved.run()  # nothing changed: the state agrees with the new website
    assert moved.writes_of_last_run() == 0
    if how == "website_id":  # (the harness's store follows the configured website only)
        moved.assert_snapshot_matches_crisp(OTHER_WEBSITE)


# ---------------------------------------------------------------- 6. a flapping source


def test_a_flapping_source_cannot_delete_more_than_the_guards_over_the_window(
        emulator, tmp_path, monkeypatch):
    """200 people, default guards (5%): each run misses a different 9 people (4.5%, under the
    per-run limit), the previous run's 9 come back. Over 12 runs, at most 10 deletions."""
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="flap", mode="mirror",
                            attributes=["plan"])
    emails = [f"f{i:03d}@x.io" for i in range(200)]
    pipeline.load([{"email": e, "plan": "pro"} for e in emails])
    pipeline.run()
    first_ids = people_ids(emulator)
    assert len(first_ids) == 200
    rng = random.Random(8)
    start = mark(emulator)
    missing: set[str] = set()
    refused = 0
    for _ in range(12):
        missing = set(rng.sample(sorted(set(emails) - missing), 9))
        pipeline.load([{"email": e, "plan": "pro"} for e in emails if e not in missing])
        result = pipeline.run()
        if pipeline.refusal(result):
            assert not pipeline.checks(result)["mirror_guards"].passed
            refused += 1
    deleted = len(deletes_since(emulator, start))
    changed = sum(1 for e, pid in first_ids.items() if people_ids(emulator).get(e) != pid)
    assert deleted <= 10, f"{deleted} people deleted over 12 runs ({refused} runs refused)"
    assert changed <= 10, f"{changed} people lost their people_id"


# ---------------------------------------------------------------- 7. two runs at once


def concurrent_pipeline(emulator, tmp_path, monkeypatch, name, people) -> tuple[Pipeline, list]:
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name=name, mode="mirror",
                            fields={"person.nickname": "name"}, attributes=["score"],
                            guards={"max_deletes": 1000, "max_delete_fraction": 1.0})
    monkeypatch.setenv("CRISP_DAILY_QUOTA", str(10**6))
    rows = [{"email": f"c{i:03d}@x.io", "name": f"C{i}", "score": i} for i in range(people)]
    pipeline.load(rows, schema={"email": pl.String, "name": pl.String, "score": pl.Int64})
    pipeline.run()
    return pipeline, rows


def test_two_runs_of_one_activation_at_once_then_a_normal_run_leave_crisp_equal_to_the_source(
        emulator, tmp_path, monkeypatch):
    """Two processes run the activation's job at once (say a scheduled run still sending, and
    a `dg launch` by hand), the source changing between their reads; then a normal run.
    Crisp must end equal to the source, and the snapshot equal to Crisp.

    The first run is slow (one request in flight, every answer 300 ms) and has 20 people to
    update; the second starts while it is busy, with the source changed again for those 20
    and for 90 more people, and four requests in flight."""
    schema = {"email": pl.String, "name": pl.String, "score": pl.Int64}
    pipeline, hot = concurrent_pipeline(emulator, tmp_path, monkeypatch, "twice", 20)
    cold = [{"email": f"z{i:03d}@x.io", "name": f"Z{i}", "score": i} for i in range(90)]
    load_waiting(pipeline.db_path, hot + cold, schema)
    pipeline.run()
    second = [{**r, "score": 1000 + r["score"]} for r in hot] + cold
    third = [{**r, "score": 2000 + r["score"]} for r in hot + cold]
    in_flight = lambda n: {"resources": {"crisp": {"config": {"max_in_flight": n}}}}  # noqa: E731
    with children() as started:
        first_run = Child(pipeline, go=str(tmp_path / "go_first"), run_config=in_flight(1))
        second_run = Child(pipeline, go=str(tmp_path / "go_second"), run_config=in_flight(4))
        started += [first_run, second_run]
        first_run.wait_ready()
        second_run.wait_ready()
        load_waiting(pipeline.db_path, second, schema)
        emulator.emulator.set_faults(FaultPlan(latency_ms=300))
        start = mark(emulator)
        first_run.start()
        wait_for_first_request(emulator, start, first_run)  # it is syncing
        load_waiting(pipeline.db_path, third, schema)  # the source changes
        second_run.start()
        outcomes = [first_run.wait(), second_run.wait()]
    for outcome in outcomes:
        assert outcome["success"] or "locked by run" in outcome["failure"], outcome
    emulator.emulator.set_faults(FaultPlan())

    pipeline.run()  # a normal run afterwards
    crisp = pipeline.crisp()
    expected = {r["email"]: (r["name"], {"score": r["score"]}) for r in third}
    actual = {e: (p["person"].get("nickname"), p["data"]) for e, p in crisp.items()}
    wrong = sorted(e for e in expected.keys() | actual.keys() if expected.get(e) != actual.get(e))
    assert not wrong, (f"{len(wrong)} of {len(expected)} people differ from the source: "
                       + ", ".join(f"{e} holds {actual.get(e)}, source {expected.get(e)}"
                                   for e in wrong[:3]))
    pipeline.assert_snapshot_matches_crisp()


def _hold_activation(emulator, tmp_path, monkeypatch, name):
    """A child run busy syncing 80 changed people slowly (4 in flight, ~300 ms per answer)."""
    pipeline, rows = concurrent_pipeline(emulator, tmp_path, monkeypatch, name, 80)
    changed = [{**r, "score": 1000 + r["score"]} for r in rows]
    pipeline.load(changed, schema={"email": pl.String, "name": pl.String, "score": pl.Int64})
    emulator.emulator.set_faults(FaultPlan(latency_ms=300))
    start = mark(emulator)
    holder = Child(pipeline, run_config={"resources": {"crisp": {"config": {"max_in_flight": 4}}}})
    wait_for_first_request(emulator, start, holder)
    # the second run, in this process, uses another token: its requests can be told apart
    crisp_env(monkeypatch, emulator, token=WEBSITE_TOKEN)
    return pipeline, holder, changed, start


def _tokens(emulator, since, token) -> list:
    return [r for r in requests_since(emulator, since) if r.token == token.identifier]


@duckdb_state_only  # (the Postgres lock is proven by the next test and test_shared_state)
def test_a_second_run_while_the_first_holds_the_activation_waits_or_ends_without_sending(
        emulator, tmp_path, monkeypatch):
    with children() as started:
        pipeline, holder, changed, start = _hold_activation(emulator, tmp_path, monkeypatch,
                                                            "held")
        started.append(holder)
        second = pipeline.run(expect_success=None)
        first = holder.wait()
    assert first["success"], first
    mine, theirs = _tokens(emulator, start, WEBSITE_TOKEN), _tokens(emulator, start, PLUGIN)
    if second.success:  # it waited for the first run to end
        overlapping = [r for r in mine if r.at < max(r.at for r in theirs)]
        assert not overlapping, ("the second run sent requests while the first held the "
                                 "activation: " + described(overlapping))
    else:  # it gave up without sending
        text = pipeline.failure_text(second)
        assert f"locked by run {first['run_id']}" in text, text
        assert not mine, "the second run sent " + described(mine)
    emulator.emulator.set_faults(FaultPlan())
    assert {e: p["data"]["score"] for e, p in pipeline.crisp().items()} == {
        r["email"]: r["score"] for r in changed}


def test_new_setting_lock_wait_seconds_a_second_run_gives_up_naming_the_holder(
        emulator, tmp_path, monkeypatch):
    with children() as started:
        pipeline, holder, _, start = _hold_activation(emulator, tmp_path, monkeypatch, "waits")
        started.append(holder)
        began = time.monotonic()
        second = pipeline.job.execute_in_process(
            instance=pipeline.instance, raise_on_error=False,
            run_config={"resources": {"crisp_run": {"config": {"lock_wait_seconds": 2}}}})
        waited = time.monotonic() - began
        still_holding = holder.running()
        first = holder.wait()
    assert still_holding, "the first run ended before the second gave up: the test proves nothing"
    assert not second.success
    text = pipeline.failure_text(second)
    assert f"locked by run {first['run_id']}" in text, text
    mine = _tokens(emulator, start, WEBSITE_TOKEN)
    assert not mine, "the second run sent " + described(mine)
    assert waited < 20, f"the second run took {waited:.1f} s to give up (lock_wait_seconds: 2)"


# ---------------------------------------------------------------- 8. a stale change set


def test_reexecuting_a_failed_sync_does_not_apply_a_deletion_planned_before_the_person_came_back(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="stale", mode="mirror",
                            attributes=["plan"], guards=LOOSE)
    monkeypatch.setenv("TRUST_ACTIVATION", pipeline.config.model_dump_json())
    monkeypatch.setenv("TRUST_DB", pipeline.db_path)
    job = reconstructable_job()
    everyone = [{"email": f"{n}@x.io", "plan": "pro"}
                for n in ["bob", "ada", "cid", "dan", "eve", "fay", "gus", "hal"]]
    with dg.instance_for_test() as instance:
        pipeline.load(everyone)
        assert dg.execute_job(job, instance).success
        bob = people_ids(emulator)["bob@x.io"]

        pipeline.load(everyone[1:])  # bob leaves; run 2 plans his deletion, its sync fails
        emulator.emulator.set_faults(FaultPlan(forced=[ForcedAnswer(401, "unauthorized",
                                                                     method="DELETE")]))
        failed = dg.execute_job(job, instance)
        assert [e.step_key for e in failed.get_step_failure_events()] == ["stale__crisp_sync"]
        assert [r["identifier"] for r in change_set_rows(pipeline, "delete")] == ["bob@x.io"]
        assert people_ids(emulator).get("bob@x.io") == bob

        emulator.emulator.set_faults(FaultPlan())
        pipeline.load(everyone)  # bob comes back
        start = mark(emulator)
        # re-execute run 2 from failure: on main, only its crisp_sync runs, on its change set
        dg.execute_job(job, instance, reexecution_options=dg.ReexecutionOptions.from_failure(
            failed.run_id, instance))
        deleted = deletes_since(emulator, start)
        assert not deleted, "the stale change set's deletion was sent: " + described(deleted)
        assert people_ids(emulator).get("bob@x.io") == bob, "bob, back in the source, was deleted"
        assert dg.execute_job(job, instance).success
        assert people_ids(emulator).get("bob@x.io") == bob
    pipeline.assert_snapshot_matches_crisp()


# ================================================================ mirror policy: release,
# adopted people, rolling window, grace runs


@duckdb_state_only
def test_new_setting_on_leave_release_keeps_the_person_in_crisp_and_stops_managing_them(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="release", mode="mirror",
                            attributes=["plan"], guards=LOOSE, mirror={"on_leave": "release"})
    rows = [{"email": f"r{i}@x.io", "plan": "pro"} for i in range(5)]
    pipeline.load(rows)
    pipeline.run()
    before = people_ids(emulator)
    start = mark(emulator)
    pipeline.load(rows[:4])  # r4 leaves
    pipeline.run()
    deleted = deletes_since(emulator, start)
    assert not deleted and people_ids(emulator) == before, \
        "r4 was deleted although on_leave is release: " + described(deleted)
    assert "r4@x.io" not in set(pipeline.snapshot()["identifier"]), "r4 is still managed"
    released = pipeline.store.read("deletions").filter(pl.col("identifier") == "r4@x.io")
    assert released["action"].to_list() == ["released"]


def _adopted_setup(emulator, tmp_path, monkeypatch, **mirror):
    emulator.emulator.store.create(WEBSITE, {"email": "old@x.io", "person": {"nickname": "O"}})
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="adopted", mode="mirror",
                            attributes=["plan"], guards=LOOSE, **mirror)
    rows = [{"email": "old@x.io", "plan": "pro"}] + [{"email": f"c{i}@x.io", "plan": "pro"}
                                                     for i in range(5)]
    pipeline.load(rows)
    pipeline.run()
    ids = people_ids(emulator)
    pipeline.load(rows[2:])  # old (adopted) and c0 (created) leave
    pipeline.run()
    return pipeline, ids


@duckdb_state_only
def test_mirror_by_default_releases_an_adopted_person_who_leaves_instead_of_deleting_them(
        emulator, tmp_path, monkeypatch):
    """Default `mirror.delete_adopted: false` (an ActivationConfig that main accepts)."""
    pipeline, before = _adopted_setup(emulator, tmp_path, monkeypatch)
    ids = people_ids(emulator)
    assert ids.get("old@x.io") == before["old@x.io"], "the adopted person was deleted"
    assert "c0@x.io" not in ids, "a person the activation created must still be deleted"
    audit = {row["identifier"]: row for row in pipeline.store.read("deletions").to_dicts()}
    assert audit["old@x.io"].get("action") == "released", audit


@duckdb_state_only
def test_new_setting_delete_adopted_true_deletes_an_adopted_person_who_leaves(
        emulator, tmp_path, monkeypatch):
    _, before = _adopted_setup(emulator, tmp_path, monkeypatch,
                               mirror={"delete_adopted": True})
    ids = people_ids(emulator)
    assert "old@x.io" in before and "old@x.io" not in ids
    assert "c0@x.io" not in ids


def test_a_refusal_shown_by_the_check_stands_though_the_window_moves_on_before_the_sync(
        emulator, tmp_path, monkeypatch):
    """The check and the sync judge the guards as of when the change set was computed: the
    window's oldest deletion leaving it between the two (a daily schedule, "Materialize all"
    running other activations in between) must not let the sync delete what the check
    refused. (Found in review: the sync judged as of its own start.)"""
    from crisp_pipeline.orchestration import assets

    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="edge", mode="mirror",
                            attributes=["plan"], guards={"max_deletes": 1,
                                                         "max_delete_fraction": 1.0,
                                                         "window_hours": 3 / 3600})
    rows = [{"email": f"e{i}@x.io", "plan": "pro"} for i in range(4)]
    pipeline.load(rows)
    pipeline.run()
    pipeline.load(rows[:3])
    pipeline.run()  # one deletion: within max_deletes, and in the 3 s window
    judged = []
    real_verdict = assets.current_verdict

    def late_verdict(store, config):  # (the sync's judgement)
        time.sleep(3.5)  # the deletion leaves the window after the check, before the sync
        verdict = real_verdict(store, config)
        judged.append(verdict.passed)
        return verdict
    monkeypatch.setattr(assets, "current_verdict", late_verdict)
    pipeline.load(rows[:2])
    result = pipeline.run()
    assert not pipeline.checks(result)["mirror_guards"].passed
    assert pipeline.refusal(result) and judged[-1] is False
    assert set(pipeline.crisp()) == {"e0@x.io", "e1@x.io", "e2@x.io"}


@pytest.mark.parametrize("guards", [
    {"max_deletes": 3, "max_delete_fraction": 1.0},  # the window is on by default (24 h)
    {"max_deletes": 3, "max_delete_fraction": 1.0, "window_hours": 24}])  # NEW SETTING
def test_deletions_are_counted_over_the_rolling_window(emulator, tmp_path, monkeypatch, guards):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="window", mode="mirror",
                            attributes=["plan"], guards=guards)
    rows = [{"email": f"w{i}@x.io", "plan": "pro"} for i in range(10)]
    pipeline.load(rows)
    pipeline.run()
    pipeline.load(rows[2:])  # 2 deletions: within max_deletes
    pipeline.run()
    assert len(pipeline.crisp()) == 8
    pipeline.load(rows[4:])  # 2 more: 4 in the window, more than max_deletes (3)
    result = pipeline.run()
    assert set(pipeline.crisp()) == {r["email"] for r in rows[2:]}, \
        "the window's deletions went beyond max_deletes"
    assert pipeline.refusal(result) and not pipeline.checks(result)["mirror_guards"].passed
    pipeline.run(override_guards=True)
    assert set(pipeline.crisp()) == {r["email"] for r in rows[4:]}


def test_new_setting_grace_runs_deletes_only_on_the_second_absent_run(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="grace", mode="mirror",
                            attributes=["plan"], guards=LOOSE, mirror={"grace_runs": 2})
    rows = [{"email": f"g{i}@x.io", "plan": "pro"} for i in range(10)]
    pipeline.load(rows)
    pipeline.run()
    before = people_ids(emulator)
    pipeline.load(rows[1:])  # g0 absent once
    pipeline.run()
    assert people_ids(emulator).get("g0@x.io") == before["g0@x.io"], \
        "g0 deleted on the first absent run"
    pipeline.run()  # absent a second time
    assert "g0@x.io" not in people_ids(emulator)


# ---------------------------------------------------------------- two activations at once


def test_two_activations_on_one_website_at_once_share_the_budget_and_lose_nothing(
        emulator, tmp_path, monkeypatch):
    """A mirror and an upsert with overlapping people run at the same moment in two
    processes, paying from one token's daily budget that is too small for both: together
    they never spend past it (Crisp answers no 429), no person is created twice whatever the
    race between one's adoption and the other's create, and once the budget is back the two
    activations' values sit side by side on every shared person; the mirror deleted nobody."""
    crisp_env(monkeypatch, emulator)
    monkeypatch.setenv("CRISP_DAILY_QUOTA", "90")
    db = str(tmp_path / "w.duckdb")
    shared = [f"s{i:02d}@x.io" for i in range(30)]
    alpha = Pipeline(emulator, db, ActivationConfig(
        name="alpha", mode="mirror", segment={"table": "people_a"},
        fields={"person.nickname": "name"}, guards=LOOSE))
    beta = Pipeline(emulator, db, ActivationConfig(
        name="beta", segment={"table": "people_b"}, attributes=["plan_b"]))
    alpha.load([{"email": e, "name": e.split("@")[0].upper()}
                for e in shared + [f"a{i:02d}@x.io" for i in range(30)]], table="people_a")
    beta.load([{"email": e, "plan_b": "pro"}
               for e in shared + [f"b{i:02d}@x.io" for i in range(30)]], table="people_b")
    with children() as started:
        runs = [Child(alpha, go=str(tmp_path / "go_alpha")),
                Child(beta, go=str(tmp_path / "go_beta"))]
        started += runs
        for run in runs:
            run.wait_ready()
        for run in runs:
            run.start()
        outcomes = [run.wait() for run in runs]
    assert all(outcome["success"] for outcome in outcomes), outcomes
    log = emulator.emulator.requests()
    assert len(log) <= 90 and all(entry.status != 429 for entry in log), len(log)
    assert spent_today(connect_state(db), PLUGIN.identifier) <= 90

    monkeypatch.setenv("CRISP_DAILY_QUOTA", "10000")
    emulator.emulator.quota.reset()
    for _ in range(2):  # the deferred rest, then a run that must find nothing left to do
        alpha.run()
        beta.run()
    assert alpha.writes_of_last_run() == 0 and beta.writes_of_last_run() == 0
    people = emulator.emulator.people(WEBSITE)
    emails = [p["email"] for p in people]
    assert len(emails) == len(set(emails)) == 90, "a person was created twice or lost"
    held = {p["email"]: (p["person"].get("nickname"), p["data"].get("plan_b")) for p in people}
    for email in shared:
        assert held[email] == (email.split("@")[0].upper(), "pro"), (email, held[email])
    assert not [e for e in log if e.method == "DELETE"]
    alpha.assert_snapshot_matches_crisp()
    beta.assert_snapshot_matches_crisp()
