"""Crisp as it is, not as we last saw it: people deleted or edited in Crisp by someone else
(a human, through the API, as the emulator's user token) are noticed by reconcile, within its
budget, and put back as the source says."""

from __future__ import annotations

import json

import httpx
import polars as pl
import pytest

from crisp_pipeline.activation import ActivationConfig
from crisp_pipeline.emulator import FaultPlan, ForcedAnswer

from .conftest import PLUGIN, USER, WEBSITE
from .harness import Pipeline, crisp_env


@pytest.fixture
def human(emulator):
    """Someone working in Crisp directly, with their own (user) token."""
    with httpx.Client(base_url=f"{emulator.base_url}website/{WEBSITE}/",
                      auth=(USER.identifier, USER.key), headers={"X-Crisp-Tier": "user"}) as c:
        yield c


def people(count: int, plan: str = "a", start: int = 0) -> list[dict]:
    return [{"email": f"r{i:04d}@x.io", "name": f"Person {i}", "plan": plan}
            for i in range(start, start + count)]


def pipeline_for(emulator, tmp_path, mode: str = "upsert", *, plan: bool = True,
                 **reconcile) -> Pipeline:
    """The nickname, and the plan as people data unless `plan` is false."""
    config = ActivationConfig(name="drift", segment={"table": "people"}, mode=mode,
                              fields={"person.nickname": "name"},
                              attributes=["plan"] if plan else [], reconcile=reconcile)
    return Pipeline(emulator, str(tmp_path / "w.duckdb"), config)


def test_a_person_deleted_in_crisp_is_created_again_though_batch_data_said_202(
        emulator, tmp_path, monkeypatch, human):
    crisp_env(monkeypatch, emulator)
    pipeline = pipeline_for(emulator, tmp_path, verify_every_hours=0)
    pipeline.load(people(3))
    pipeline.run()
    assert human.delete("people/profile/r0001@x.io").status_code == 200
    # every plan changes: one PATCH batch/data for the three, which Crisp accepts (202) even
    # for the person it no longer holds
    pipeline.load(people(3, plan="b"))
    pipeline.run()
    crisp = pipeline.crisp()
    assert set(crisp) == {"r0000@x.io", "r0001@x.io", "r0002@x.io"}
    assert all(p["data"] == {"plan": "b"} for p in crisp.values())
    pipeline.assert_snapshot_matches_crisp()
    drift = pipeline.store.read("drift")
    assert drift.filter(pl.col("field") == "(gone)").get_column("identifier").to_list() == \
        ["r0001@x.io"]


def test_a_batch_data_write_confirms_values_but_never_verifies_the_person(
        emulator, tmp_path, monkeypatch, human):
    crisp_env(monkeypatch, emulator)
    pipeline = pipeline_for(emulator, tmp_path)  # default: verified people wait 24 hours
    pipeline.load(people(3))
    pipeline.run()
    verified = dict(pipeline.snapshot().select("identifier", "verified_at").iter_rows())
    human.delete("people/profile/r0001@x.io")
    pipeline.load(people(3, plan="b"))
    pipeline.run()
    after = pipeline.snapshot()
    # the values went out (202), but nothing proved anyone exists: verified_at unchanged
    assert dict(after.select("identifier", "verified_at").iter_rows()) == verified
    assert set(after.get_column("data.plan")) == {'"b"'}
    # the person Crisp lost is found by the next reconcile that reaches them: a full one
    result = pipeline.run(full_reconcile=True)
    reconcile = pipeline.metadata(result, "crisp_snapshot")["reconcile"]
    assert reconcile["full"] and reconcile["gone"] == 1 and reconcile["verified"] == 2
    assert "r0001@x.io" in pipeline.crisp()
    pipeline.assert_snapshot_matches_crisp()


def test_fields_and_emails_edited_in_crisp_are_written_back(
        emulator, tmp_path, monkeypatch, human):
    crisp_env(monkeypatch, emulator)
    pipeline = pipeline_for(emulator, tmp_path, verify_every_hours=0)
    pipeline.load(people(3))
    pipeline.run()
    human.patch("people/profile/r0000@x.io", json={"person": {"nickname": "Edited"}})
    human.patch("people/data/r0001@x.io", json={"data": {"plan": "z"}})
    human.patch("people/profile/r0002@x.io", json={"email": "moved@elsewhere.io"})
    result = pipeline.run()
    reconcile = pipeline.metadata(result, "crisp_snapshot")["reconcile"]
    assert reconcile["edited"] == 3 and reconcile["gone"] == 0
    assert reconcile["drifted_fields"] == {"person.nickname": 1, "data.plan": 1, "email": 1}
    assert pipeline.metadata(result, "change_set")["updates"] == 3
    crisp = pipeline.crisp()
    assert set(crisp) == {"r0000@x.io", "r0001@x.io", "r0002@x.io"}
    assert crisp["r0000@x.io"]["person"]["nickname"] == "Person 0"
    assert crisp["r0001@x.io"]["data"] == {"plan": "a"}
    pipeline.assert_snapshot_matches_crisp()
    pipeline.run()
    assert pipeline.writes_of_last_run() == 0


def test_update_only_skips_a_person_deleted_in_crisp(emulator, tmp_path, monkeypatch, human):
    crisp_env(monkeypatch, emulator)
    pipeline = pipeline_for(emulator, tmp_path, mode="update_only", verify_every_hours=0)
    for person in people(2):
        human.post("people/profile", json={"email": person["email"],
                                           "person": {"nickname": "Old"}})
    pipeline.load(people(2))
    pipeline.run()
    human.delete("people/profile/r0000@x.io")
    result = pipeline.run()
    changes = pipeline.store.read_change_set()
    assert changes.filter(pl.col("identifier") == "r0000@x.io").select("op", "reason").row(0) \
        == ("skip", "not_in_crisp")
    assert pipeline.writes_of_last_run() == 0 and "r0000@x.io" not in pipeline.crisp()
    assert pipeline.metadata(result, "crisp_snapshot")["reconcile"]["gone"] == 1


def _reread(before: pl.DataFrame, after: pl.DataFrame) -> set[str]:
    return set(before.join(after, on="identifier").filter(
        pl.col("verified_at") != pl.col("verified_at_right")).get_column("identifier"))


def test_the_rolling_reconcile_spends_its_allowance_oldest_verified_first(
        emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    for index in range(2000):  # a website far larger than the segment: a listing costs 41
        emulator.emulator.store.create(WEBSITE, {"email": f"other{index}@x.io",
                                                 "person": {"nickname": "O"}})
    pipeline = pipeline_for(emulator, tmp_path, verify_every_hours=0, max_requests=20)
    pipeline.load(people(30))
    pipeline.run()
    first = pipeline.snapshot().select("identifier", "verified_at")
    result = pipeline.run()
    reconcile = pipeline.metadata(result, "crisp_snapshot")["reconcile"]
    # one request to price a listing (41 pages: too dear), then profile and people data,
    # two reads a person: nine people
    assert reconcile["method"] == "lookup" and reconcile["verified"] == 9
    assert reconcile["requests_sent"] == 19 and len(pipeline.requests_of_last_run()) == 19
    second = pipeline.snapshot().select("identifier", "verified_at")
    oldest = first.sort("verified_at", "identifier").head(9).get_column("identifier")
    assert _reread(first, second) == set(oldest)
    pipeline.run()
    third = pipeline.snapshot().select("identifier", "verified_at")
    next_oldest = second.sort("verified_at", "identifier").head(9).get_column("identifier")
    assert _reread(second, third) == set(next_oldest)
    assert not _reread(second, third) & set(oldest)


def test_the_daily_budget_share_bounds_the_reconcile(emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    monkeypatch.setenv("CRISP_DAILY_QUOTA", "100")
    pipeline = pipeline_for(emulator, tmp_path, verify_every_hours=0, budget_share=0.1)
    pipeline.load(people(5))
    pipeline.run()
    result = pipeline.run()
    reconcile = pipeline.metadata(result, "crisp_snapshot")["reconcile"]
    assert reconcile["allowance"] == 9  # a tenth of the 94 left (5 creates, 1 batch/data)
    # a count, one page, five people-data reads: all five verified for 7 requests
    assert reconcile["method"] == "listing" and reconcile["verified"] == 5
    assert reconcile["requests_sent"] == 7


def test_a_listing_reconciles_many_people_for_a_page_per_fifty(
        emulator, tmp_path, monkeypatch, human):
    crisp_env(monkeypatch, emulator)
    pipeline = pipeline_for(emulator, tmp_path, plan=False, verify_every_hours=0,
                            max_requests=20)
    pipeline.load(people(260))
    pipeline.run()
    human.delete("people/profile/r0100@x.io")
    human.patch("people/profile/r0200@x.io", json={"person": {"nickname": "Edited"}})
    result = pipeline.run()
    reconcile = pipeline.metadata(result, "crisp_snapshot")["reconcile"]
    # 1 count + 6 pages (259 people) instead of 260 lookups
    assert reconcile["method"] == "listing" and reconcile["verified"] == 259
    assert reconcile["gone"] == 1 and reconcile["edited"] == 1
    assert reconcile["requests_sent"] == 1 + 6 + 1  # the missing one is looked up by id
    crisp = pipeline.crisp()
    assert len(crisp) == 260 and crisp["r0200@x.io"]["person"]["nickname"] == "Person 200"


def test_full_reconcile_cost_is_in_the_plan_before_it_is_asked_for(
        emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    pipeline = pipeline_for(emulator, tmp_path)
    pipeline.load(people(120))
    result = pipeline.run()
    plan = pipeline.metadata(result, "change_set")["request_plan"]
    assert plan["full_reconcile"] == {"managed": 0, "by_lookup": 0, "by_listing_at_least": 0}
    result = pipeline.run()
    plan = pipeline.metadata(result, "change_set")["request_plan"]
    assert plan["full_reconcile"] == {"managed": 120, "by_lookup": 240,
                                      "by_listing_at_least": 3 + 1 + 120}
    assert len(pipeline.requests_of_last_run()) == 0  # nobody due: nothing read


def test_numbers_crisp_spells_differently_are_not_changes(emulator, tmp_path, monkeypatch):
    """Crisp (JavaScript) answers `1` for `1.0` and `2.5e-05` for `0.000025`: neither a
    reconcile nor an adoption turns the spelling into a write."""
    crisp_env(monkeypatch, emulator)
    config = ActivationConfig(name="numbers", segment={"table": "people"},
                              attributes=["score"], reconcile={"verify_every_hours": 0})
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), config)
    scores = [1.0, 0.000025, 1e-7, 123456789.0, 1e21, -0.0]
    rows = [{"email": f"n{i}@x.io", "score": s} for i, s in enumerate(scores)]
    pipeline.load(rows, schema={"email": pl.String, "score": pl.Float64})
    pipeline.run()
    held = {p["email"]: p["data"]["score"] for p in pipeline.crisp().values()}
    assert held["n0@x.io"] == 1 and isinstance(held["n0@x.io"], int)  # as JavaScript keeps it
    result = pipeline.run()
    assert pipeline.metadata(result, "crisp_snapshot")["reconcile"]["verified"] == 6
    assert pipeline.metadata(result, "crisp_snapshot")["reconcile"]["edited"] == 0
    assert pipeline.writes_of_last_run() == 0
    # adopted: another activation finds the same people already in Crisp
    other = Pipeline(emulator, str(tmp_path / "other.duckdb"), config)
    other.load(rows, schema={"email": pl.String, "score": pl.Float64})
    other.run()
    assert other.writes_of_last_run() == 0


def test_the_cli_reconciles_in_full_and_the_plan_shows_the_cost_first(
        emulator, tmp_path, monkeypatch, human):
    from click.testing import CliRunner

    from crisp_pipeline.cli import main

    crisp_env(monkeypatch, emulator)
    pipeline = pipeline_for(emulator, tmp_path)
    pipeline.load(people(4))
    pipeline.run()
    human.delete("people/profile/r0003@x.io")
    human.patch("people/profile/r0000@x.io", json={"person": {"nickname": "Edited"}})
    runner = CliRunner()
    plan = runner.invoke(main, ["plan", "drift", "--db", pipeline.db_path])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.output)["plan"]["full_reconcile"]["by_lookup"] == 8
    result = runner.invoke(main, ["reconcile", "drift", "--db", pipeline.db_path, "--full"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["full"] and report["gone"] == 1 and report["edited"] == 1
    assert report["verified"] == 3 and report["requests_sent"] == 4 + 3
    assert PLUGIN.key not in result.output
    pipeline.run()  # the next run puts Crisp back as the source says
    crisp = pipeline.crisp()
    assert len(crisp) == 4 and crisp["r0000@x.io"]["person"]["nickname"] == "Person 0"
    pipeline.assert_snapshot_matches_crisp()


def test_every_kind_of_value_round_trips_through_crisp_with_zero_writes(
        emulator, tmp_path, monkeypatch):
    """Decimals, dates, timestamps with and without a time zone, big and tiny numbers,
    booleans and blanks: after the first sync, a run that re-reads everyone in Crisp plans
    nothing and sends nothing."""
    from datetime import date, datetime, timezone
    from decimal import Decimal

    crisp_env(monkeypatch, emulator)
    config = ActivationConfig(
        name="kinds", segment={"table": "people"}, fields={"person.nickname": "name"},
        attributes=["price", "born", "seen", "seen_utc", "big", "tiny", "flag", "note"],
        reconcile={"verify_every_hours": 0})
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), config)
    rows = pl.DataFrame({
        "email": ["k0@x.io", "k1@x.io", "k2@x.io"],
        "name": ["K0", "K1", ""],
        "price": [Decimal("12.30"), Decimal("0.000001"), None],
        "born": [date(1815, 12, 10), date(2000, 1, 1), None],
        "seen": [datetime(2026, 11, 29, 7, 0, 0, 123456), datetime(2026, 1, 1), None],
        "seen_utc": [datetime(2026, 11, 29, 7, 0, tzinfo=timezone.utc), None,
                     datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)],
        "big": [2**53 - 1, -(2**53 - 1), 0],
        "tiny": [5e-324, 1.7976931348623157e308, 1.0],
        "flag": [True, False, None],
        "note": ["", "ünïcødé \"quoted\"", None],
    }, schema_overrides={"price": pl.Decimal(12, 6),
                         "seen_utc": pl.Datetime("us", "Europe/Paris")})
    pipeline.load(rows)
    pipeline.run()
    result = pipeline.run()
    reconcile = pipeline.metadata(result, "crisp_snapshot")["reconcile"]
    assert reconcile["verified"] == 3 and reconcile["edited"] == 0, reconcile
    changes = pipeline.store.read_change_set().filter(pl.col("op") != "skip")
    assert changes.is_empty(), changes.select("identifier", "changed", "old_values",
                                              "new_values").to_dicts()
    assert pipeline.writes_of_last_run() == 0
    pipeline.assert_snapshot_matches_crisp()


@pytest.mark.parametrize("forced", [
    ForcedAnswer(404, "not_found", "GET", "people/stats"),
    ForcedAnswer(400, "invalid_data", "GET", "people/profiles/2", times=1)],
    ids=["stats_404", "listing_page_400"])
def test_a_refused_count_or_listing_page_ends_the_reconcile_not_the_run(
        emulator, tmp_path, monkeypatch, forced):
    crisp_env(monkeypatch, emulator)
    pipeline = pipeline_for(emulator, tmp_path, plan=False, verify_every_hours=0,
                            max_requests=10)
    pipeline.load(people(120))
    pipeline.run()
    emulator.emulator.set_faults(FaultPlan(forced=[forced]))
    pipeline.load(people(120, plan="b"))
    result = pipeline.run()
    reconcile = pipeline.metadata(result, "crisp_snapshot")["reconcile"]
    assert reconcile["stopped"] and reconcile["gone"] == 0  # nobody forgotten on a failure
    assert pipeline.snapshot().height == 120


def test_retries_never_take_the_reconcile_past_its_allowance(emulator, tmp_path, monkeypatch):
    crisp_env(monkeypatch, emulator)
    pipeline = pipeline_for(emulator, tmp_path, verify_every_hours=0, max_requests=10)
    pipeline.load(people(40))
    pipeline.run()
    emulator.emulator.set_faults(FaultPlan(error_rate=0.6), seed=3)
    result = pipeline.run()
    reconcile = pipeline.metadata(result, "crisp_snapshot")["reconcile"]
    reads = [e for e in pipeline.requests_of_last_run() if e.method == "GET"]
    assert reconcile["allowance"] == 10 and len(reads) <= 10 and reconcile["requests_sent"] <= 10


def test_a_person_written_every_run_is_still_reconciled(emulator, tmp_path, monkeypatch, human):
    """A write verifies nothing it did not send: a person whose plan changes every run still
    comes due, and a nickname edited in Crisp is written back."""
    crisp_env(monkeypatch, emulator)
    pipeline = pipeline_for(emulator, tmp_path, verify_every_hours=0, max_requests=2)
    rows = people(1)
    pipeline.load(rows)
    pipeline.run()
    human.patch("people/profile/r0000@x.io", json={"person": {"nickname": "Edited"}})
    rows[0]["plan"] = "b"
    pipeline.load(rows)
    pipeline.run()
    assert pipeline.crisp()["r0000@x.io"]["person"]["nickname"] == "Person 0"


def test_true_in_crisp_is_not_the_number_one_in_the_source(
        emulator, tmp_path, monkeypatch, human):
    crisp_env(monkeypatch, emulator)
    config = ActivationConfig(name="flags", segment={"table": "people"}, attributes=["active"],
                              reconcile={"verify_every_hours": 0})
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), config)
    pipeline.load([{"email": "a@x.io", "active": 1}])
    pipeline.run()
    human.patch("people/data/a@x.io", json={"data": {"active": True}})
    result = pipeline.run()
    assert pipeline.metadata(result, "crisp_snapshot")["reconcile"]["edited"] == 1
    assert pipeline.crisp()["a@x.io"]["data"] == {"active": 1}
