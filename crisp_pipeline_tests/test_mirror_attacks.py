"""Attacks on mirror's trust rules found by a hostile review of the first fix, each written as
it broke that fix: partial and repeated runs that would plan from another run's state, a
person's email edited in Crisp and the source alike, rows that lose their identifier while
others change, grace streaks carried over, an email passed from a departed person to a managed
one, a killed run's lock, an activation adopting a person while a mirror is deleting, state
files from the previous version, and a dry run hiding a configuration change."""

from __future__ import annotations

import signal
import time

import dagster as dg
import duckdb
import polars as pl

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.emulator import FaultPlan, ForcedAnswer

from .concurrent_child import reconstructable_job
from .conftest import OTHER_WEBSITE, WEBSITE
from .harness import Pipeline, crisp_env
from .test_mirror_trust import (EXTERNAL, Child, children, deletes_since, mark, people_ids,
                                pipeline_for)

LOOSE = {"max_deletes": 1000, "max_delete_fraction": 1.0}
NAMES = ["bob", "ada", "cid", "dan", "eve", "fay"]


def everyone() -> list[dict]:
    return [{"email": f"{name}@x.io", "plan": "pro"} for name in NAMES]


def test_a_reexecution_from_a_failed_snapshot_step_reads_the_source_again(
        emulator, tmp_path, monkeypatch):
    """Run 2 staged a segment without bob, then failed adopting a newcomer; bob came back;
    re-executing from the failed step must not plan from run 2's segment."""
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="stale2", mode="mirror",
                            attributes=["plan"], guards=LOOSE)
    monkeypatch.setenv("TRUST_ACTIVATION", pipeline.config.model_dump_json())
    monkeypatch.setenv("TRUST_DB", pipeline.db_path)
    job = reconstructable_job()
    newcomer = [{"email": "new@x.io", "plan": "pro"}]
    with dg.instance_for_test() as instance:
        pipeline.load(everyone())
        assert dg.execute_job(job, instance).success
        bob = people_ids(emulator)["bob@x.io"]
        pipeline.load(everyone()[1:] + newcomer)
        emulator.emulator.set_faults(FaultPlan(forced=[ForcedAnswer(401, "unauthorized",
                                                                    method="GET")]))
        failed = dg.execute_job(job, instance)
        assert not failed.success
        emulator.emulator.set_faults(FaultPlan())
        pipeline.load(everyone() + newcomer)  # bob is back
        start = mark(emulator)
        again = dg.execute_job(job, instance, reexecution_options=dg.ReexecutionOptions
                               .from_failure(failed.run_id, instance))
        assert again.success
    assert not deletes_since(emulator, start), "bob, back in the source, was deleted"
    assert people_ids(emulator).get("bob@x.io") == bob and "new@x.io" in people_ids(emulator)


def test_materializing_only_the_change_set_and_sync_never_uses_a_dry_runs_segment(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="part", mode="mirror",
                            attributes=["plan"], guards=LOOSE)
    pipeline.load(everyone())
    pipeline.run()
    pipeline.load(everyone()[1:])
    pipeline.run(dry_run=True)  # a preview while bob is briefly out of the source
    pipeline.load(everyone())
    start = mark(emulator)
    result = pipeline.job.execute_in_process(
        instance=pipeline.instance, raise_on_error=False,
        asset_selection=[dg.AssetKey(["part", "change_set"]), dg.AssetKey(["part", "crisp_sync"])])
    assert result.success, pipeline.failure_text(result)
    assert not deletes_since(emulator, start), "bob, in the source, was deleted"


def test_an_email_changed_in_crisp_and_in_the_source_is_the_same_person(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="edit", mode="mirror",
                            attributes=["plan"], guards=LOOSE, mirror={"delete_adopted": True})
    rows = [{"email": f"k{i}@x.io", "plan": "pro"} for i in range(5)]
    pipeline.load(rows)
    pipeline.run()
    k0 = people_ids(emulator)["k0@x.io"]
    emulator.emulator.store.update(WEBSITE, k0, {"email": "new0@x.io"})  # support edits it
    pipeline.load([{"email": "new0@x.io", "plan": "pro"}] + rows[1:])  # and so does the source
    start = mark(emulator)
    pipeline.run()
    assert not deletes_since(emulator, start)
    assert people_ids(emulator).get("new0@x.io") == k0
    pipeline.assert_snapshot_matches_crisp()


def test_a_blank_email_with_other_changes_in_the_row_still_holds_the_departure(
        emulator, tmp_path, monkeypatch):
    schema = {"email": pl.String, "name": pl.String, "plan": pl.String}
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="blank", mode="mirror",
                            fields={"person.nickname": "name"}, attributes=["plan"],
                            guards=LOOSE)
    rows = [{"email": f"k{i}@x.io", "name": f"K{i}", "plan": "pro"} for i in range(10)]
    junk = {"email": None, "name": "Anonymous", "plan": "free"}
    pipeline.load(rows + [junk], schema=schema)
    pipeline.run()
    pipeline.run()
    # the junk row is cleaned up as k0 loses their email and changes plan: same count
    pipeline.load([{"email": None, "name": "K0", "plan": "team"}] + rows[1:], schema=schema)
    start = mark(emulator)
    pipeline.run()
    assert not deletes_since(emulator, start)
    held = pipeline.store.read("change_set").filter(pl.col("reason") == "departure_held")
    assert held["identifier"].to_list() == ["k0@x.io"]


def test_a_row_with_no_id_under_an_external_id_holds_the_departure(
        emulator, tmp_path, monkeypatch):
    schema = {"uid": pl.Int64, "email": pl.String, "plan": pl.String}
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="noid", mode="mirror",
                            identifier=EXTERNAL, attributes=["plan"], guards=LOOSE)
    rows = [{"uid": i, "email": f"k{i}@x.io", "plan": "pro"} for i in range(10)]
    pipeline.load(rows, schema=schema)
    pipeline.run()
    pipeline.load([{"uid": None, "email": None, "plan": "pro"}] + rows[1:], schema=schema)
    start = mark(emulator)
    pipeline.run()
    assert not deletes_since(emulator, start), "k0 deleted though a row naming nobody is new"


def test_a_grace_streak_does_not_survive_a_mode_or_website_change(
        emulator, tmp_path, monkeypatch):
    base = dict(name="grace", attributes=["plan"], guards=LOOSE, mirror={"grace_runs": 2})
    mirror = pipeline_for(emulator, tmp_path, monkeypatch, mode="mirror", **base)
    upsert = Pipeline(emulator, mirror.db_path, ActivationConfig(
        mode="upsert", segment={"table": "people"}, **base), instance=mirror.instance)
    other = Pipeline(emulator, mirror.db_path, ActivationConfig(
        mode="mirror", website_id=OTHER_WEBSITE, segment={"table": "people"}, **base),
        instance=mirror.instance)
    rows = [{"email": f"g{i}@x.io", "plan": "pro"} for i in range(10)]
    for detour in (upsert, other):
        mirror.load(rows)
        mirror.run()
        mirror.load(rows[1:])
        mirror.run()  # g0 absent once: grace
        assert "g0@x.io" in people_ids(emulator)
        detour.load(rows)
        detour.run()
        mirror.load(rows[1:])
        mirror.run()  # back: g0 absent for the first time in a row again
        assert "g0@x.io" in people_ids(emulator), f"g0 deleted after a detour by {detour}"


def test_an_email_passed_from_a_departed_person_to_a_managed_one_goes_through(
        emulator, tmp_path, monkeypatch):
    schema = {"uid": pl.Int64, "email": pl.String, "plan": pl.String}
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="pass", mode="mirror",
                            identifier=EXTERNAL, attributes=["plan"], guards=LOOSE)
    rows = [{"uid": i, "email": f"u{i}@x.io", "plan": "pro"} for i in range(1, 6)]
    pipeline.load(rows, schema=schema)
    pipeline.run()
    u1 = people_ids(emulator)["u1@x.io"]
    # uid 2 leaves; uid 1 takes u2's address
    pipeline.load([{"uid": 1, "email": "u2@x.io", "plan": "pro"}] + rows[2:], schema=schema)
    pipeline.run()
    pipeline.run()
    held = {p["data"]["uid"]: p for p in emulator.emulator.people(WEBSITE)}
    assert set(held) == {1, 3, 4, 5} and held[1]["email"] == "u2@x.io"
    assert held[1]["people_id"] == u1


def test_the_lock_of_a_killed_run_is_taken_over(emulator, tmp_path, monkeypatch):
    """A run worker killed (OOM) mid-sync stays "started" in an instance with no run
    monitoring; its process is gone, so the next run takes the lock over."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="oom", attributes=["plan"])
    pipeline.load([{"email": f"k{i:02d}@x.io", "plan": "pro"} for i in range(40)])
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("TRUST_PERSISTENT", "1")
    emulator.emulator.set_faults(FaultPlan(latency_ms=200))
    start = mark(emulator)
    with children() as started:
        child = Child(pipeline, run_config={"resources": {"crisp": {"config": {
            "max_in_flight": 1}}}})
        started.append(child)
        while child.running() and not any(r.method == "POST"
                                           for r in emulator.emulator.requests()[start:]):
            time.sleep(0.01)
        child.process.send_signal(signal.SIGKILL)
        child.process.wait(timeout=30)
    emulator.emulator.set_faults(FaultPlan())
    with dg.DagsterInstance.get() as instance:
        assert instance.get_run_by_id(child.run_id).status == dg.DagsterRunStatus.STARTED
        result = pipeline.job.execute_in_process(instance=instance, raise_on_error=False,
                                                 run_config={"resources": {"crisp_run": {
                                                     "config": {"lock_wait_seconds": 3}}}})
    assert result.success, pipeline.failure_text(result)
    assert len(pipeline.crisp()) == 40


def test_a_run_that_selects_some_steps_gives_the_lock_back_at_its_last_one(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="subset", attributes=["plan"])
    pipeline.load([{"email": "a@x.io", "plan": "pro"}])
    keys = [dg.AssetKey(["subset", step]) for step in ("segment", "crisp_snapshot",
                                                        "change_set")]
    preview = pipeline.job.execute_in_process(raise_on_error=False, asset_selection=keys)
    assert preview.success
    # another instance (materialize() in the same process): it cannot see the first run
    full = pipeline.job.execute_in_process(raise_on_error=False, run_config={
        "resources": {"crisp_run": {"config": {"lock_wait_seconds": 2}}}})
    assert full.success, pipeline.failure_text(full)
    assert set(pipeline.crisp()) == {"a@x.io"}


def test_an_activation_adopting_a_person_while_a_mirror_deletes_keeps_them(
        emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    monkeypatch.setenv("CRISP_DAILY_QUOTA", str(10**6))
    db = str(tmp_path / "w.duckdb")
    mirror = Pipeline(emulator, db, ActivationConfig(
        name="ra", mode="mirror", segment={"table": "people_a"}, attributes=["plan"],
        guards=LOOSE))
    upsert = Pipeline(emulator, db, ActivationConfig(
        name="rb", segment={"table": "people_b"}, attributes=["tier"]), instance=mirror.instance)
    rows = [{"email": f"d{i:02d}@x.io", "plan": "p"} for i in range(30)]
    mirror.load(rows + [{"email": "keep@x.io", "plan": "p"}], table="people_a")
    mirror.run()
    mirror.load([{"email": "keep@x.io", "plan": "p"}], table="people_a")  # 30 leave the mirror
    upsert.load([{"email": "d29@x.io", "tier": "gold"}], table="people_b")
    emulator.emulator.set_faults(FaultPlan(latency_ms=150))
    start = mark(emulator)
    with children() as started:
        child = Child(mirror, run_config={"resources": {"crisp": {"config": {
            "max_in_flight": 1}}}})
        started.append(child)
        while child.running() and not deletes_since(emulator, start):
            time.sleep(0.01)
        upsert.run()  # takes d29 on while the mirror is deleting (waits for its deletes)
        outcome = child.wait()
    emulator.emulator.set_faults(FaultPlan())
    assert outcome["success"], outcome
    upsert.run()
    crisp = people_ids(emulator)
    if "d29@x.io" in set(upsert.snapshot()["identifier"]):
        assert "d29@x.io" in crisp, "the mirror deleted a person the upsert holds"
    assert crisp.keys() - {"keep@x.io"} <= {"d29@x.io"}
    upsert.assert_snapshot_matches_crisp()


def test_a_state_file_from_the_previous_version_keeps_its_people_safe(
        emulator, tmp_path, monkeypatch):
    """A snapshot written before snapshots were kept per website: its people are migrated
    with the origin the old outcomes prove, and another activation's old snapshot still
    protects the people it holds."""
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="old", mode="mirror",
                            attributes=["plan"], guards=LOOSE)
    pipeline.load([{"email": f"o{i}@x.io", "plan": "pro"} for i in range(4)])
    pipeline.run()
    with duckdb.connect(pipeline.db_path) as connection:  # as the previous version left it
        connection.execute("create table crisp_old.before as select identifier, people_id, "
                           'email, confirmed_at, "data.plan" from crisp_old.snapshot')
        connection.execute("drop table crisp_old.snapshot")
        connection.execute("alter table crisp_old.before rename to snapshot")
        connection.execute("create schema crisp_other")
        connection.execute("create table crisp_other.snapshot as select identifier, "
                           "people_id, email from crisp_old.snapshot where identifier = "
                           "'o3@x.io'")
    pipeline.load([{"email": "o0@x.io", "plan": "pro"}])
    pipeline.run()
    assert set(pipeline.crisp()) == {"o0@x.io", "o3@x.io"}  # created: deleted; o3 held
    origins = dict(pipeline.snapshot().select("identifier", "origin").iter_rows())
    assert origins == {"o0@x.io": "created"}


def test_a_dry_run_does_not_hide_a_configuration_change_from_the_real_run(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="dry", attributes=["plan"])
    pipeline.load([{"email": "a@x.io", "plan": "pro", "tier": None}])
    pipeline.run()
    emulator.emulator.store.save_data(WEBSITE, people_ids(emulator)["a@x.io"],
                                      {"plan": "pro", "tier": "gold"})
    wider = pipeline_for(emulator, tmp_path, monkeypatch, name="dry",
                         attributes=["plan", "tier"], instance=pipeline.instance)
    wider.run(dry_run=True)
    result = wider.run()
    for asset in ("crisp_snapshot", "change_set"):  # where the plan and its cost are read
        changes = wider.metadata(result, asset)["configuration_changes"]
        assert any("data.tier" in change for change in changes), (asset, changes)
    assert wider.crisp()["a@x.io"]["data"] == {"plan": "pro"}  # the null cleared the key


def test_a_blank_email_under_upsert_is_still_held_when_the_activation_becomes_a_mirror(
        emulator, tmp_path, monkeypatch):
    rows = [{"email": f"k{i}@x.io", "plan": "pro"} for i in range(6)]
    upsert = pipeline_for(emulator, tmp_path, monkeypatch, name="switch", attributes=["plan"])
    upsert.load(rows)
    upsert.run()
    upsert.load([{"email": None, "plan": "pro"}] + rows[1:], schema={"email": pl.String,
                                                                     "plan": pl.String})
    upsert.run()
    mirror = pipeline_for(emulator, tmp_path, monkeypatch, name="switch", mode="mirror",
                          attributes=["plan"], guards=LOOSE, instance=upsert.instance)
    start = mark(emulator)
    mirror.run()
    assert not deletes_since(emulator, start), "k0 deleted on the switch to mirror"
    assert mirror.metadata(mirror.run(override_guards=True), "crisp_sync")["people_ok"] == 1


def test_a_changing_column_the_activation_does_not_read_never_stalls_a_departure(
        emulator, tmp_path, monkeypatch):
    schema = {"email": pl.String, "plan": pl.String, "seen_at": pl.Int64}
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="volatile", mode="mirror",
                            attributes=["plan"], guards=LOOSE)
    rows = [{"email": f"k{i}@x.io", "plan": "pro", "seen_at": 0} for i in range(6)]
    pipeline.load(rows + [{"email": None, "plan": "free", "seen_at": 1}], schema=schema)
    pipeline.run()
    pipeline.load(rows[:5] + [{"email": None, "plan": "free", "seen_at": 2}], schema=schema)
    pipeline.run()
    assert "k5@x.io" not in pipeline.crisp()


def test_previews_of_the_change_set_do_not_use_up_the_grace_period(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="preview", mode="mirror",
                            attributes=["plan"], guards=LOOSE, mirror={"grace_runs": 2})
    rows = [{"email": f"k{i}@x.io", "plan": "pro"} for i in range(6)]
    pipeline.load(rows)
    pipeline.run()
    pipeline.load(rows[1:])
    preview = [dg.AssetKey(["preview", step]) for step in ("segment", "crisp_snapshot",
                                                           "change_set")]
    for _ in range(2):
        assert pipeline.job.execute_in_process(instance=pipeline.instance,
                                               asset_selection=preview).success
    pipeline.run()  # the first sync with k0 absent: grace
    assert "k0@x.io" in pipeline.crisp()
    pipeline.run()
    assert "k0@x.io" not in pipeline.crisp()


def test_a_state_file_of_the_first_fix_upgrades(emulator, tmp_path, monkeypatch):
    """The `configuration` table of the first version of this fix had no `dry_run` column."""
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="upgrade", attributes=["plan"])
    pipeline.load([{"email": "a@x.io", "plan": "pro"}])
    pipeline.run()
    with duckdb.connect(pipeline.db_path) as connection:
        connection.execute("alter table crisp_upgrade.configuration drop column dry_run")
    pipeline.load([{"email": "a@x.io", "plan": "team"}])
    pipeline.run()
    assert pipeline.crisp()["a@x.io"]["data"] == {"plan": "team"}


def test_the_website_lock_excludes_two_activations_of_one_run(tmp_path):
    """"Materialize all" runs every activation in one run: a mirror deleting and another
    activation adopting on the same website still exclude each other."""
    from crisp_pipeline.state import locks
    from crisp_pipeline.state.store import connect_file

    connect = connect_file(str(tmp_path / "w.duckdb"))
    name = locks.website_lock_name("w")
    with locks.holding(connect, name, "run-1/mirror_a", wait_seconds=0):
        try:
            with locks.holding(connect, name, "run-1/upsert_b", wait_seconds=0.2):
                raise AssertionError("both activations held the website at once")
        except locks.ActivationLocked as refused:
            assert "locked by run run-1/mirror_a" in str(refused)
