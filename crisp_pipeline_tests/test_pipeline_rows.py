"""Bad rows, bad segments, external ids, dry runs and mirror's guards, through Dagster."""

from __future__ import annotations

import datetime as dt

import polars as pl

from crisp_pipeline.activation import ActivationConfig

from .conftest import WEBSITE
from .harness import Pipeline, crisp_env


def pipeline_for(emulator, tmp_path, monkeypatch, **config) -> Pipeline:
    crisp_env(monkeypatch, emulator)
    config.setdefault("segment", {"table": "people"})
    return Pipeline(emulator, str(tmp_path / "w.duckdb"), ActivationConfig(**config))


def test_bad_rows_are_rejected_with_row_and_field_while_the_others_sync(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="rows",
                            fields={"person.nickname": "full_name"}, attributes=["plan", "mrr"])
    pipeline.load(pl.DataFrame({
        "email": ["good@x.io", None, "not-an-email", "Twin@x.io", "twin@x.io ", "nan@x.io",
                  "long@x.io", "  Fine@X.io  "],
        "full_name": ["Good", "Nobody", "Bad", "Twin 1", "Twin 2", "Nan", "L" * 300, "Fine"],
        "plan": ["pro", "pro", "pro", "pro", "pro", "pro", "pro", "x" * 1025],
        "mrr": [1.0, 1.0, 1.0, 1.0, 1.0, float("nan"), 1.0, 2.0],
    }))
    result = pipeline.run()
    assert set(pipeline.crisp()) == {"good@x.io"}
    rejected = pipeline.store.read("rejected")
    found = {(row["row_number"], row["field"], row["reason"]) for row in rejected.to_dicts()}
    assert found == {(2, "email", "missing_identifier"), (3, "email", "invalid_email"),
                     (4, "email", "duplicate_identifier"), (5, "email", "duplicate_identifier"),
                     (6, "data.mrr", "not_a_finite_number"),
                     (7, "person.nickname", "too_long"), (8, "data.plan", "too_long")}
    messages = {row["row_number"]: row["message"] for row in rejected.to_dicts()}
    assert "twin@x.io appears in rows 4, 5" in messages[4]
    assert "not-an-email is not a valid email address" in messages[3]
    assert "1025 characters; Crisp takes at most 1024" in messages[8]
    skips = pipeline.store.read("change_set").filter(pl.col("op") == "skip")
    assert skips.height == 7
    assert "row 7 (long@x.io):" in skips.filter(pl.col("identifier") == "long@x.io")["message"][0]
    check = pipeline.checks(result)["segment_usable"]
    assert not check.passed and check.severity.value == "WARN"


def test_a_segment_whose_every_row_is_rejected_stops_before_crisp(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="allbad", attributes=["plan"])
    pipeline.load([{"email": "nope", "plan": "a"}, {"email": None, "plan": "b"}])
    result = pipeline.run(expect_success=False)
    assert pipeline.checks(result)["segment_usable"].severity.value == "ERROR"
    assert result.is_node_untouched("allbad__crisp_sync")
    assert pipeline.requests_of_last_run() == []


def test_a_missing_column_or_an_unsendable_type_fails_before_any_request(
        emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="shape",
                            attributes=["plan", "tags"])
    pipeline.load([{"email": "a@x.io", "plan": "pro"}])
    result = pipeline.run(expect_success=False)
    assert "no column(s) ['tags']" in pipeline.failure_text(result)
    pipeline.load(pl.DataFrame({"email": ["a@x.io"], "plan": ["pro"], "tags": [["a", "b"]]}))
    result = pipeline.run(expect_success=False)
    text = pipeline.failure_text(result)
    assert "column 'tags' (for data.tags) is List(String)" in text and "array_to_string" in text
    assert emulator.emulator.requests() == []


def test_a_sql_error_names_the_activation_and_duckdbs_message(emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="sqlerr",
                            segment={"sql": "select email from no_such_table"})
    result = pipeline.run(expect_success=False)
    text = pipeline.failure_text(result)
    assert "activation 'sqlerr': the segment query failed in DuckDB" in text
    assert "no_such_table" in text


def test_dates_timestamps_and_booleans_become_crisp_values(emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="types",
                            attributes=["signup", "seen_at", "vip", "seats"])
    pipeline.load(pl.DataFrame({
        "email": ["t@x.io"], "signup": [dt.date(2024, 5, 1)],
        "seen_at": [dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)], "vip": [True],
        "seats": [3]}))
    pipeline.run()
    assert pipeline.crisp()["t@x.io"]["data"] == {"signup": "2024-05-01",
                                                  "seen_at": "2024-05-01T12:30:00Z",
                                                  "vip": True, "seats": 3}
    pipeline.run()
    assert pipeline.writes_of_last_run() == 0


def test_an_external_id_keys_people_and_follows_their_email(emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="ext",
                            identifier={"external_id": "user_id", "email": "email"},
                            fields={"person.nickname": "name"}, attributes=["plan"])
    pipeline.load([{"user_id": 42, "email": "first@x.io", "name": "Kay", "plan": "pro"}])
    pipeline.run()
    first = pipeline.crisp()["first@x.io"]
    assert first["data"] == {"user_id": 42, "plan": "pro"}
    pipeline.load([{"user_id": 42, "email": "second@x.io", "name": "Kay", "plan": "pro"}])
    pipeline.run()
    crisp = pipeline.crisp()
    assert set(crisp) == {"second@x.io"} and crisp["second@x.io"]["people_id"] == first["people_id"]
    snapshot = pipeline.snapshot().to_dicts()
    assert [(r["identifier"], r["people_id"], r["email"]) for r in snapshot] == [
        ("42", first["people_id"], "second@x.io")]
    pipeline.assert_snapshot_matches_crisp()


def test_a_new_person_waits_while_a_managed_person_still_holds_their_email(
        emulator, tmp_path, monkeypatch):
    """Keyed by an external id, one person moves to another email as a new person takes
    their old one: Crisp holds one person per email, so the new person is created only
    once the managed one has let the email go (the next run)."""
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="taken",
                            identifier={"external_id": "user_id", "email": "email"},
                            attributes=["plan"])
    bystanders = [{"user_id": i, "email": f"b{i}@x.io", "plan": "free"} for i in range(3, 6)]
    pipeline.load([{"user_id": 1, "email": "a@x.io", "plan": "pro"}, *bystanders])
    pipeline.run()
    pipeline.load([{"user_id": 1, "email": "moved@x.io", "plan": "pro"},
                   {"user_id": 2, "email": "a@x.io", "plan": "team"}, *bystanders])
    pipeline.run()
    planned = {r["identifier"]: (r["op"], r["reason"])
               for r in pipeline.store.read("change_set").to_dicts()}
    assert planned == {"1": ("update", None), "2": ("skip", "email_taken")}
    crisp = pipeline.crisp()
    assert "a@x.io" not in crisp and crisp["moved@x.io"]["data"]["plan"] == "pro"
    pipeline.run()
    assert pipeline.crisp()["a@x.io"]["data"] == {"user_id": 2, "plan": "team"}
    pipeline.assert_snapshot_matches_crisp()


def test_keys_crisp_holds_that_no_activation_manages_are_never_touched(
        emulator, tmp_path, monkeypatch):
    people_id = emulator.emulator.store.create(WEBSITE, {"email": "k@x.io",
                                                         "person": {"nickname": "K"}})
    emulator.emulator.store.save_data(WEBSITE, people_id, {"plan": "old", "theirs": 1})
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="keys", attributes=["plan"])
    pipeline.load([{"email": "k@x.io", "plan": "new"}])
    pipeline.run()
    pipeline.load(pl.DataFrame({"email": ["k@x.io"], "plan": [None]}, schema={
        "email": pl.String, "plan": pl.String}))
    pipeline.run()
    assert pipeline.crisp()["k@x.io"]["data"] == {"theirs": 1}  # plan cleared, theirs kept


def test_a_dry_run_plans_everything_and_sends_no_write(emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="dry", attributes=["plan"])
    pipeline.load([{"email": f"d{i}@x.io", "plan": "pro"} for i in range(5)])
    result = pipeline.run(dry_run=True)
    assert pipeline.writes_of_last_run() == 0 and pipeline.crisp() == {}
    assert pipeline.metadata(result, "change_set")["creates"] == 5
    # seen, not synced: an observation of crisp_sync, no materialization, a tagged run
    assert pipeline.metadata(result, "crisp_sync") == {}
    observed = [e.asset_observation_data.asset_observation for e in result.all_events
                if e.event_type_value == "ASSET_OBSERVATION"]
    assert [o.metadata["dry_run"].value for o in observed] == [True]
    assert pipeline.instance.get_run_by_id(result.run_id).tags["crisp/dry_run"] == "true"
    assert not pipeline.checks(result).get("no_failed_writes")
    pipeline.run()
    assert len(pipeline.crisp()) == 5


def mirror(emulator, tmp_path, monkeypatch, **guards) -> Pipeline:
    return pipeline_for(emulator, tmp_path, monkeypatch, name="mirrored", mode="mirror",
                        attributes=["plan"], guards=guards)


def test_mirror_refuses_an_empty_segment_unless_overridden(emulator, tmp_path, monkeypatch):
    pipeline = mirror(emulator, tmp_path, monkeypatch, max_deletes=100, max_delete_fraction=1.0)
    pipeline.load([{"email": f"m{i}@x.io", "plan": "pro"} for i in range(3)])
    pipeline.run()
    pipeline.load(pl.DataFrame(schema={"email": pl.String, "plan": pl.String}))
    result = pipeline.run()  # a refusal is an outcome, not a crash
    guard = pipeline.checks(result)["mirror_guards"]
    assert not guard.passed and "is empty" in guard.description
    assert "override_guards: true" in guard.description
    assert "is empty" in pipeline.refusal(result)
    assert not result.asset_materializations_for_node("mirrored__crisp_sync")
    assert pipeline.writes_of_last_run() == 0 and len(pipeline.crisp()) == 3
    pipeline.run(override_guards=True)
    assert pipeline.crisp() == {}


def test_mirror_refuses_too_many_deletions_and_a_dry_run_shows_who(emulator, tmp_path, monkeypatch):
    pipeline = mirror(emulator, tmp_path, monkeypatch, max_deletes=2, max_delete_fraction=0.5)
    pipeline.load([{"email": f"m{i}@x.io", "plan": "pro"} for i in range(10)])
    pipeline.run()
    pipeline.load([{"email": f"m{i}@x.io", "plan": "pro"} for i in range(7)])
    result = pipeline.run()
    guard = pipeline.checks(result)["mirror_guards"]
    assert "3 people would be deleted, more than max_deletes (2)" in guard.description
    assert pipeline.writes_of_last_run() == 0
    dry = pipeline.run(dry_run=True, override_guards=True)
    assert pipeline.writes_of_last_run() == 0
    deletes = pipeline.store.read("change_set").filter(pl.col("op") == "delete")
    assert sorted(deletes["identifier"]) == ["m7@x.io", "m8@x.io", "m9@x.io"]
    assert pipeline.metadata(dry, "change_set")["deletes"] == 3
    pipeline.run(override_guards=True)
    assert sorted(pipeline.crisp()) == [f"m{i}@x.io" for i in range(7)]
    audit = pipeline.store.read("deletions")
    assert sorted(audit["identifier"]) == ["m7@x.io", "m8@x.io", "m9@x.io"]
    assert all('"data.plan":"pro"' in values for values in audit["last_values"])


def test_mirror_never_deletes_a_person_whose_row_is_only_rejected(emulator, tmp_path, monkeypatch):
    pipeline = mirror(emulator, tmp_path, monkeypatch, max_deletes=10, max_delete_fraction=1.0)
    pipeline.load(pl.DataFrame({"email": ["a@x.io", "b@x.io"], "plan": ["pro", "pro"]}))
    pipeline.run()
    pipeline.load(pl.DataFrame({"email": ["a@x.io", "b@x.io"], "plan": ["pro", "x" * 2000]}))
    result = pipeline.run()
    assert pipeline.metadata(result, "change_set")["deletes"] == 0
    assert set(pipeline.crisp()) == {"a@x.io", "b@x.io"}


def test_mirror_deletes_only_people_it_manages(emulator, tmp_path, monkeypatch):
    emulator.emulator.store.create(WEBSITE, {"email": "human@x.io", "person": {"nickname": "H"}})
    pipeline = mirror(emulator, tmp_path, monkeypatch, max_deletes=10, max_delete_fraction=1.0)
    pipeline.load([{"email": "a@x.io", "plan": "pro"}, {"email": "b@x.io", "plan": "pro"}])
    pipeline.run()
    pipeline.load([{"email": "a@x.io", "plan": "pro"}])
    pipeline.run()
    assert set(pipeline.crisp()) == {"a@x.io", "human@x.io"}


def test_change_sets_are_kept_per_run_and_queryable(emulator, tmp_path, monkeypatch):
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="history", attributes=["plan"])
    pipeline.load([{"email": "h@x.io", "plan": "a"}])
    first = pipeline.run()
    pipeline.load([{"email": "h@x.io", "plan": "b"}])
    second = pipeline.run()
    history = pipeline.store.read("change_set_history")
    assert history.select("run_id", "op", "new_values").rows() == [
        (first.run_id, "create", '{"data.plan":"a"}'),
        (second.run_id, "update", '{"data.plan":"b"}')]
    outcomes = pipeline.store.read("outcomes")
    assert sorted(outcomes.select("run_id", "op", "step", "status").rows()) == sorted([
        (first.run_id, "create", "create", "ok"), (first.run_id, "create", "data", "ok"),
        (second.run_id, "update", "data", "ok")])


def test_a_null_number_is_left_as_crisp_holds_it_and_never_planned(
        emulator, tmp_path, monkeypatch):
    """Crisp takes no empty integer, so a number cannot be cleared: a null source value is
    not planned, not sent and not refused run after run."""
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="numbers",
                            fields={"company.metrics.employees": "employees"})
    schema = {"email": pl.String, "employees": pl.Int64}
    pipeline.load([{"email": "n@x.io", "employees": 12}], schema=schema)
    pipeline.run()
    pipeline.load([{"email": "n@x.io", "employees": None}], schema=schema)
    for _ in range(2):
        result = pipeline.run()
        assert pipeline.metadata(result, "change_set")["updates"] == 0
        assert pipeline.writes_of_last_run() == 0
    assert pipeline.crisp()["n@x.io"]["company"]["metrics"]["employees"] == 12


def test_one_email_crisp_cannot_look_up_never_blocks_the_other_rows(
        emulator, tmp_path, monkeypatch):
    """`a/b@x.io` passes the email check, but Crisp answers 404 `not_found` to a lookup by it
    (a `/` in the path): that row alone fails or syncs, every run, and the others sync."""
    pipeline = pipeline_for(emulator, tmp_path, monkeypatch, name="slash", attributes=["plan"])
    good = [{"email": f"ok{i}@x.io", "plan": "pro"} for i in range(3)]
    pipeline.load(good)
    pipeline.run()
    for plan in ("team", "enterprise"):  # the odd row arrives alone: it is looked up by email
        pipeline.load([{"email": "a/b@x.io", "plan": plan}] + [{**g, "plan": plan} for g in good])
        pipeline.run()
        assert {e: p["data"]["plan"] for e, p in pipeline.crisp().items()
                if e.startswith("ok")} == {g["email"]: plan for g in good}
