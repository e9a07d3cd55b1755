"""Each mode, through Dagster against the emulator: a sequence of source changes (new people,
changed fields and attributes, nulls, people leaving and coming back) leaves Crisp exactly as
the mode defines, and the snapshot always equals what Crisp holds.

The expected Crisp state is computed by a small model of the modes (`expected_crisp`), not
written out by hand, and compared with the emulator's state after every run.
"""

from __future__ import annotations

import pytest

from crisp_pipeline.activation import ActivationConfig

from .conftest import WEBSITE
from .harness import Pipeline, crisp_env

pytestmark = pytest.mark.usefixtures("state_backend")

SCHEMA = {"email": str, "full_name": str, "phone": str, "plan": str, "mrr": float}


def person(email, name, phone, plan, mrr):
    return {"email": email, "full_name": name, "phone": phone, "plan": plan, "mrr": mrr}


STEPS = [
    # 1: two new people, one already in Crisp (upper-case in the source), one who will appear
    [person("ada@x.io", "Ada", None, "pro", 10.0), person("bob@x.io", "Bob", "555", "free", 0.0),
     person("OLD@x.io", "Old Timer", None, "pro", 5.0),
     person("dan@x.io", "Dan", None, "trial", 1.0)],
    # 2: attribute changes, a field change, nulls that clear, a newcomer
    [person("ada@x.io", "Ada", None, "team", 12.5), person("bob@x.io", "Robert", None, "free", 0.0),
     person("old@x.io", "Old Timer", None, "pro", None),
     person("dan@x.io", "Dan", None, "trial", 1.0),
     person("cid@x.io", "Cid", "777", "trial", 1.0)],
    # 3: bob leaves
    [person("ada@x.io", "Ada", None, "team", 12.5), person("old@x.io", "Old Timer", None, "pro", None),
     person("dan@x.io", "Dan", None, "trial", 1.0), person("cid@x.io", "Cid", "777", "trial", 1.0)],
    # 4: bob comes back, with his first name again
    [person("ada@x.io", "Ada", None, "team", 12.5), person("bob@x.io", "Bob", None, "free", 0.0),
     person("old@x.io", "Old Timer", None, "pro", None),
     person("dan@x.io", "Dan", None, "trial", 1.0), person("cid@x.io", "Cid", "777", "trial", 1.0)],
]
PREEXISTING = {"old@x.io": {"nickname": "Old", "data": {"plan": "legacy", "foreign": "keep"}},
               "outsider@x.io": {"nickname": "Out", "data": {"plan": "x"}}}


def view(nickname, phone, data):
    return {"nickname": nickname, "phone": phone or None,
            "data": {k: v for k, v in data.items() if v is not None}}


def expected_crisp(mode: str, steps_run: list[list[dict]], appeared: set[str]) -> dict:
    """What Crisp must hold after these steps, per the modes' definition."""
    state = {email: view(p["nickname"], None, p["data"]) for email, p in PREEXISTING.items()}
    managed: set[str] = set()
    for source in steps_run:
        rows = {row["email"].lower(): row for row in source}
        for email, row in rows.items():
            if mode == "update_only" and email not in state and email not in appeared:
                continue  # never created
            before = state.get(email, view(None, None, {}))
            data = {**before["data"], "plan": row["plan"], "mrr": row["mrr"]}
            state[email] = view(row["full_name"], row["phone"], data)
            managed.add(email)
        if mode == "mirror":
            for email in managed - set(rows):
                state.pop(email, None)
            managed &= set(rows)
    return state


def actual_crisp(pipeline: Pipeline) -> dict:
    return {email: view(p["person"].get("nickname"), p["person"].get("phone"), p["data"])
            for email, p in pipeline.crisp().items()}


@pytest.fixture
def seeded(emulator):
    for email, p in PREEXISTING.items():
        people_id = emulator.emulator.store.create(WEBSITE, {"email": email,
                                                             "person": {"nickname": p["nickname"]}})
        emulator.emulator.store.save_data(WEBSITE, people_id, p["data"])
    return emulator


@pytest.mark.parametrize("mode", ["upsert", "update_only", "mirror"])
def test_a_sequence_of_source_changes_leaves_crisp_as_the_mode_defines(
        seeded, tmp_path, monkeypatch, mode):
    crisp_env(monkeypatch, seeded)
    config = ActivationConfig(
        name=f"people_{mode}", mode=mode, segment={"table": "people"},
        fields={"person.nickname": "full_name", "person.phone": "phone"},
        attributes=["plan", "mrr"], guards={"max_deletes": 10, "max_delete_fraction": 0.5})
    pipeline = Pipeline(seeded, str(tmp_path / "w.duckdb"), config)
    appeared: set[str] = set()
    for index, source in enumerate(STEPS):
        if mode == "update_only" and index == 1:
            # Dan is created in Crisp by someone else (the chat widget) between two runs
            seeded.emulator.store.create(WEBSITE, {"email": "dan@x.io",
                                                   "person": {"nickname": "Dan (chat)"}})
            appeared.add("dan@x.io")
        pipeline.load(source, schema=SCHEMA)
        result = pipeline.run()
        assert actual_crisp(pipeline) == expected_crisp(mode, STEPS[:index + 1], appeared), \
            f"after step {index + 1}"
        pipeline.assert_snapshot_matches_crisp()
        emails = [p["email"] for p in seeded.emulator.people(WEBSITE)]
        assert len(emails) == len(set(emails)), "a person was duplicated"
        if mode == "update_only":
            skipped = pipeline.metadata(result, "change_set")["skips"]
            assert skipped == sum(1 for row in source
                                  if row["email"].lower() not in PREEXISTING | {e: 1 for e in appeared})

    pipeline.run()  # nothing changed in the source
    assert pipeline.writes_of_last_run() == 0
    assert pipeline.metadata(pipeline.run(), "crisp_sync")["write_requests"] == 0


def test_people_already_in_crisp_are_adopted_not_duplicated(seeded, tmp_path, monkeypatch):
    crisp_env(monkeypatch, seeded)
    config = ActivationConfig(name="adopt", segment={"table": "people"},
                              fields={"person.nickname": "full_name"}, attributes=["plan"])
    pipeline = Pipeline(seeded, str(tmp_path / "w.duckdb"), config)
    pipeline.load([{"email": "Old@X.io", "full_name": "Old", "plan": "legacy"}])
    result = pipeline.run()
    assert pipeline.metadata(result, "crisp_snapshot")["adopted"] == 1
    # Crisp already held exactly these values: adoption makes the run write nothing
    assert pipeline.metadata(result, "change_set")["updates"] == 0
    assert pipeline.writes_of_last_run() == 0
    assert [p["email"] for p in seeded.emulator.people(WEBSITE)].count("old@x.io") == 1
    assert pipeline.crisp()["old@x.io"]["data"] == {"plan": "legacy", "foreign": "keep"}


def test_a_person_created_between_plan_and_sync_is_adopted_on_people_exists(
        emulator, tmp_path, monkeypatch):
    """The snapshot looked them up and found nobody; by the time the sync creates them, Crisp
    has them (another tool, or an earlier create whose answer was lost): no duplicate."""
    crisp_env(monkeypatch, emulator)
    config = ActivationConfig(name="race", segment={"table": "people"},
                              fields={"person.nickname": "full_name"}, attributes=["plan"])
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), config)
    pipeline.load([{"email": "late@x.io", "full_name": "Late", "plan": "pro"}])
    snapshot_only = pipeline.job.execute_in_process(
        instance=pipeline.instance, op_selection=["race__segment", "race__crisp_snapshot",
                                                  "race__change_set"])
    assert snapshot_only.success
    emulator.emulator.store.create(WEBSITE, {"email": "late@x.io", "person": {"nickname": "L"}})
    sync_only = pipeline.job.execute_in_process(instance=pipeline.instance,
                                                op_selection=["race__crisp_sync"])
    assert sync_only.success
    people = emulator.emulator.people(WEBSITE)
    assert len(people) == 1 and people[0]["person"]["nickname"] == "Late"
    assert people[0]["data"] == {"plan": "pro"}
    pipeline.assert_snapshot_matches_crisp()


def test_a_create_that_meets_an_existing_person_patches_only_mapped_fields_that_differ(
        emulator, tmp_path, monkeypatch):
    """The adoption lookup went unanswered (503s), so the sync creates; Crisp answers
    people_exists: the person's real name is never overwritten by the create's stand-in
    nickname, and nothing they already hold is sent again."""
    from crisp_pipeline.emulator import FaultPlan, ForcedAnswer

    crisp_env(monkeypatch, emulator)
    people_id = emulator.emulator.store.create(WEBSITE, {
        "email": "ada@x.io", "person": {"nickname": "Ada Lovelace", "phone": "555"}})
    config = ActivationConfig(name="exists", segment={"table": "people"},
                              fields={"person.phone": "phone"}, attributes=["plan"])
    pipeline = Pipeline(emulator, str(tmp_path / "w.duckdb"), config)
    pipeline.load([{"email": "ada@x.io", "phone": "555", "plan": "pro"}])
    emulator.emulator.set_faults(FaultPlan(forced=[ForcedAnswer(
        503, "unavailable", method="GET", path_contains="people/profile/ada", times=6)]))
    pipeline.run()
    person = pipeline.crisp()["ada@x.io"]
    assert person["people_id"] == people_id
    assert person["person"]["nickname"] == "Ada Lovelace" and person["data"] == {"plan": "pro"}
    profile_patches = [e for e in pipeline.requests_of_last_run()
                       if e.method == "PATCH" and "people/profile" in e.path]
    assert profile_patches == []  # the phone was already right
    pipeline.assert_snapshot_matches_crisp()
