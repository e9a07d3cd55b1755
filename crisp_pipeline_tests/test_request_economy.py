"""Requests are the scarce resource: identical data changes are batched, the plan says what a
run will spend, the daily budget is never overspent, and a run cut short resumes where it
stopped without sending anything twice."""

from __future__ import annotations

from collections import Counter

import polars as pl

import pytest

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.emulator import FaultPlan
from crisp_pipeline.state.budget import spent_today
from crisp_pipeline.state.store import connect_state, now

from .conftest import duckdb_state_only, OTHER_WEBSITE, WEBSITE
from .harness import Pipeline, crisp_env

pytestmark = pytest.mark.usefixtures("state_backend")

PLANS = ["free", "starter", "pro", "team", "enterprise"]


def seed_managed_people(pipeline: Pipeline, count: int, website: str = WEBSITE) -> None:
    """People already synced: in the emulator and in the activation's snapshot (set up
    directly, so the test spends its time on the run under test)."""
    store = pipeline.emulator.emulator.store
    rows = []
    for index in range(count):
        email = f"p{index:05d}@x.io"
        people_id = store.create(website, {"email": email, "person": {"nickname": "P"}})
        store.save_data(website, people_id, {"plan": "old"})
        rows.append({"identifier": email, "people_id": people_id, "email": email,
                     "confirmed_at": now(), "data.plan": '"old"'})
    pipeline.store.confirm(pl.DataFrame(rows).cast({"confirmed_at": pl.Datetime("us", "UTC")}),
                           pipeline.fields)


@duckdb_state_only
def test_ten_thousand_people_moved_to_five_plans_take_a_few_dozen_requests(
        emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    config = ActivationConfig(name="plans", segment={"table": "people"}, attributes=["plan"])
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), config)
    seed_managed_people(pipeline, 10_000)
    pipeline.load([{"email": f"p{i:05d}@x.io", "plan": PLANS[i % 5]} for i in range(10_000)])
    result = pipeline.run()
    plan = pipeline.metadata(result, "change_set")
    assert plan["updates"] == 10_000 and plan["requests_planned"] == 20
    assert plan["requests_without_batching"] == 10_000
    writes = [e for e in pipeline.requests_of_last_run() if e.method == "PATCH"]
    assert len(writes) == 20 and {e.path.rsplit("/", 2)[-2:][0] for e in writes} == {"batch"}
    crisp = pipeline.crisp()
    assert Counter(p["data"]["plan"] for p in crisp.values()) == {plan: 2000 for plan in PLANS}
    assert all(crisp[f"p{i:05d}@x.io"]["data"] == {"plan": PLANS[i % 5]} for i in range(10_000))
    pipeline.assert_snapshot_matches_crisp()


@duckdb_state_only
def test_batching_ends_in_the_same_crisp_state_as_one_by_one_writes(
        emulator, tmp_path, monkeypatch):
    """Creates and updates, shared and individual values, clears: two websites, one synced
    with batching and one without, end identical; batching spends far fewer requests."""
    rows = [{"email": f"m{i:04d}@x.io", "name": f"M {i}", "plan": PLANS[i % 3],
             "seats": i if i % 4 == 0 else None, "vip": i % 2 == 0} for i in range(300)]
    changed = [dict(row, plan=PLANS[(i % 3) + 2] if i % 5 else None,
                    seats=None if i % 8 == 0 else row["seats"], name=f"M{i}" if i % 7 else row["name"])
               for i, row in enumerate(rows)] + [
        {"email": f"n{i:04d}@x.io", "name": "N", "plan": "pro", "seats": None, "vip": True}
        for i in range(25)]
    schema = {"email": pl.String, "name": pl.String, "plan": pl.String, "seats": pl.Int64,
              "vip": pl.Boolean}
    spent = {}
    states = {}
    for batch_size, website in ((500, WEBSITE), (1, OTHER_WEBSITE)):
        crisp_env(monkeypatch, emulator, website=website)
        config = ActivationConfig(name=f"batch_{batch_size}", segment={"table": "people"},
                                  fields={"person.nickname": "name"},
                                  attributes=["plan", "seats", "vip"], batch_size=batch_size)
        pipeline = Pipeline(emulator, str(tmp_path / f"w{batch_size}.duckdb"), config)
        writes = 0
        for source in (rows, changed):
            pipeline.load(pl.DataFrame(source, schema=schema))
            result = pipeline.run()
            writes += pipeline.writes_of_last_run()
            assert pipeline.metadata(result, "crisp_sync")["write_requests"] == \
                pipeline.metadata(result, "change_set")["requests_planned"]
        pipeline.assert_snapshot_matches_crisp(website)
        spent[batch_size] = writes
        states[batch_size] = {email: (p["person"], p["data"])
                              for email, p in pipeline.crisp(website).items()}
    assert states[500] == states[1] and len(states[500]) == 325
    assert spent[500] < 0.7 * spent[1], spent


def test_a_budget_cut_mid_run_resumes_next_run_without_sending_anything_twice(
        emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    monkeypatch.setenv("CRISP_DAILY_QUOTA", "150")
    config = ActivationConfig(name="budget", segment={"table": "people"}, attributes=["plan"])
    # the default file name: its catalog `crisp_pipeline` is also the budget's schema name
    pipeline = Pipeline(emulator, str(tmp_path / "crisp_pipeline.duckdb"), config)
    people = [{"email": f"b{i:03d}@x.io", "plan": f"plan-{i}"} for i in range(100)]
    pipeline.load(people)

    first = pipeline.run()  # ends successfully, with the rest deferred
    sync = pipeline.metadata(first, "crisp_sync")
    assert sync["requests_sent"] <= 150 and sync["people_deferred"] > 0
    assert "budget ran out" in sync["deferred_because"]
    assert spent_today(connect_state(pipeline.db_path), "plugin-id") == 150
    with_data = sum(1 for p in pipeline.crisp().values() if p["data"])
    assert 0 < with_data < 100  # the cut fell inside the run
    pipeline.assert_snapshot_matches_crisp()
    plan = pipeline.metadata(first, "change_set")
    assert plan["requests_planned"] == 200 and plan["days_to_finish"] == 2

    again = pipeline.run()  # same day: nothing left to spend, nothing sent
    assert pipeline.requests_of_last_run() == []
    assert pipeline.metadata(again, "crisp_sync")["people_deferred"] > 0

    monkeypatch.setenv("CRISP_DAILY_QUOTA", "1000")  # a new budget (as on the next day)
    pipeline.run()
    crisp = pipeline.crisp()
    assert {email: p["data"] for email, p in crisp.items()} == {
        p["email"]: {"plan": p["plan"]} for p in people}
    pipeline.assert_snapshot_matches_crisp()
    log = emulator.emulator.requests()
    creates = [e for e in log if e.method == "POST"]
    data_writes = Counter(e.path for e in log if e.method == "PATCH")
    assert len(creates) == 100 and all(e.status == 201 for e in creates)
    assert len(data_writes) == 100 and set(data_writes.values()) == {1}
    assert all(e.status < 400 for e in log)


def test_activations_sharing_a_token_never_spend_past_its_daily_quota(
        emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    monkeypatch.setenv("CRISP_DAILY_QUOTA", "60")
    db = str(tmp_path / "w.duckdb")
    first = Pipeline(emulator, db, ActivationConfig(
        name="first", segment={"table": "people"}, attributes=["plan"]))
    first.load([{"email": f"f{i}@x.io", "plan": "pro"} for i in range(40)])
    first.run()
    spent = spent_today(connect_state(db), "plugin-id")
    assert spent == len(emulator.emulator.requests()) == 43  # listing 2, 40 creates, 1 batch
    second = Pipeline(emulator, db, ActivationConfig(
        name="second", segment={"table": "people"}, attributes=["plan"]))
    second.run()  # adopts the same 40 people: more reads than the 17 requests left
    assert len(second.requests_of_last_run()) == 60 - 43
    assert spent_today(connect_state(db), "plugin-id") == 60


def test_the_order_setting_decides_what_a_short_budget_spends_first(
        emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    for order, expected in ((("delete", "update", "create"), "deletes"),
                            (("create", "update", "delete"), "creates")):
        emulator.emulator.reset()
        config = ActivationConfig(name=f"order_{expected}", segment={"table": "people"},
                                  mode="mirror", fields={"person.nickname": "name"},
                                  order=order, guards={"max_delete_fraction": 1.0})
        pipeline = Pipeline(emulator, str(tmp_path / f"{expected}.duckdb"), config)
        monkeypatch.setenv("CRISP_DAILY_QUOTA", "1000")
        pipeline.load([{"email": f"old{i}@x.io", "name": "Old"} for i in range(10)])
        pipeline.run()
        # today 5 people leave and 5 arrive; after the listing (3 requests) 5 remain (the
        # spent count, not the emulator's log: a Postgres state keeps one budget for both)
        spent = spent_today(connect_state(pipeline.db_path), "plugin-id")
        monkeypatch.setenv("CRISP_DAILY_QUOTA", str(spent + 3 + 5))
        pipeline.load([{"email": f"old{i}@x.io", "name": "Old"} for i in range(5)]
                      + [{"email": f"new{i}@x.io", "name": "New"} for i in range(5)])
        pipeline.run()
        emails = set(pipeline.crisp())
        if expected == "deletes":
            assert emails == {f"old{i}@x.io" for i in range(5)}
        else:
            assert emails == {f"old{i}@x.io" for i in range(10)} | {f"new{i}@x.io"
                                                                   for i in range(5)}
        pipeline.assert_snapshot_matches_crisp()


def test_a_daily_quota_of_zero_sends_nothing_and_defers_everything(
        emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    monkeypatch.setenv("CRISP_DAILY_QUOTA", "0")
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), ActivationConfig(
        name="zero", segment={"table": "people"}, attributes=["plan"]))
    pipeline.load([{"email": f"z{i}@x.io", "plan": "pro"} for i in range(5)])
    result = pipeline.run()
    assert emulator.emulator.requests() == []
    sync = pipeline.metadata(result, "crisp_sync")
    assert sync["people_deferred"] == 5 and sync["people_ok"] == 0


def test_each_outcome_counts_the_requests_its_own_unit_sent(emulator, tmp_path, monkeypatch):
    """Units run concurrently; the requests recorded per unit add up to what Crisp received."""
    crisp_env(monkeypatch, emulator)
    emulator.emulator.set_faults(FaultPlan(latency_ms=20))
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), ActivationConfig(
        name="counted", segment={"table": "people"}, attributes=["plan"]))
    pipeline.load([{"email": f"c{i}@x.io", "plan": f"plan-{i}"} for i in range(32)])
    pipeline.run()
    writes = pipeline.writes_of_last_run()
    outcomes = pipeline.store.read("outcomes")
    per_unit = outcomes.group_by("unit").agg(pl.col("requests").first())
    assert writes == 64 and per_unit.get_column("requests").sum() == writes
    assert set(per_unit.get_column("requests")) == {1}


def test_tiny_and_huge_floats_are_confirmed_as_sent_and_never_sent_again(
        emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), ActivationConfig(
        name="floats", segment={"table": "people"}, attributes=["score"]))
    values = [2.5e-05, 1e-7, 1.0, 1e22, -0.5, 123456.789, 5e-324]
    pipeline.load([{"email": f"f{i}@x.io", "score": v} for i, v in enumerate(values)],
                  schema={"email": pl.String, "score": pl.Float64})
    pipeline.run()
    assert {p["email"]: p["data"]["score"] for p in emulator.emulator.people(WEBSITE)} == {
        f"f{i}@x.io": v for i, v in enumerate(values)}
    pipeline.run()
    assert pipeline.writes_of_last_run() == 0
