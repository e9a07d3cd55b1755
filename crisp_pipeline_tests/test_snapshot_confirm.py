"""Confirming values into the snapshot: people already held, held under a new people_id, and
new people, mixed in one batch, each end as confirmed (the in-place fast path never hides a
people_id change or a new person)."""

from __future__ import annotations

import polars as pl
import pytest

from crisp_pipeline.state.store import SNAPSHOT_KEYS, StateStore, connect_state, now

FIELDS = ["person.nickname", "data.plan"]
SCHEMA = {**SNAPSHOT_KEYS, **{f: pl.String for f in FIELDS}}


def rows(*people: tuple) -> pl.DataFrame:
    return pl.DataFrame([{"identifier": i, "people_id": p, "email": i, "confirmed_at": now(),
                          "origin": o, "verified_at": None, "person.nickname": n,
                          "data.plan": d} for i, p, o, n, d in people], schema=SCHEMA)


@pytest.mark.parametrize("batch", [
    # (identifier, people_id, origin, nickname, plan)
    [("a@x.io", "pa", None, None, '"team"')],                       # held: values only
    [("a@x.io", "pa-new", None, None, '"team"')],                   # held, new people_id
    [("c@x.io", "pc", "created", '"Cy"', '"free"')],                # new person
    [("a@x.io", "pa", None, None, '"team"'), ("c@x.io", "pc", "created", '"Cy"', None),
     ("b@x.io", "pb-new", None, '"Bo"', None)],                     # all three at once
])
def test_each_confirmed_person_ends_as_confirmed(tmp_path, batch, state_backend):
    store = StateStore(connect_state(str(tmp_path / "s.duckdb")), "crisp_t", "w")
    store.confirm(rows(("a@x.io", "pa", "created", '"Al"', '"pro"'),
                       ("b@x.io", "pb", "adopted", '"Bee"', '"free"')), FIELDS)
    expected = {r["identifier"]: r for r in store.read_snapshot(FIELDS).iter_rows(named=True)}
    for identifier, people_id, origin, nickname, plan in batch:
        before = expected.get(identifier, {"origin": None, "person.nickname": None,
                                           "data.plan": None})
        expected[identifier] = {
            "identifier": identifier, "people_id": people_id, "email": identifier,
            "origin": before["origin"] or origin,
            "person.nickname": nickname or before["person.nickname"],
            "data.plan": plan or before["data.plan"]}
    store.confirm(rows(*batch), FIELDS)
    held = store.read_snapshot(FIELDS).select(
        "identifier", "people_id", "email", "origin", *FIELDS).sort("identifier")
    want = pl.DataFrame(sorted(expected.values(), key=lambda r: r["identifier"])).select(
        "identifier", "people_id", "email", "origin", *FIELDS).cast(
        {c: pl.String for c in ["identifier", "people_id", "email", "origin", *FIELDS]})
    assert held.to_dicts() == want.to_dicts()


def test_the_database_refuses_two_identifiers_for_one_crisp_person(tmp_path, state_backend):
    """Identity is the database's constraint, not only the code's care: a second identifier
    for a people_id already held (or a second row for an identifier) fails the whole batch,
    which leaves the snapshot as it was."""
    store = StateStore(connect_state(str(tmp_path / "s.duckdb")), "crisp_t", "w")
    store.confirm(rows(("a@x.io", "pa", "created", '"Al"', None)), FIELDS)
    with pytest.raises(Exception, match="(?i)constraint|duplicate|unique"):
        store.confirm(rows(("c@x.io", "pc", "created", None, None),
                           ("b@x.io", "pa", "created", '"Bo"', None)), FIELDS)
    held = store.read_snapshot(FIELDS)
    assert held.get_column("identifier").to_list() == ["a@x.io"]
