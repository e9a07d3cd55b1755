"""Mirror's departure rule, as a pure function: who is deleted, released or held, and why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from crisp_pipeline.activation import MirrorPolicy
from crisp_pipeline.changes.departures import DepartureContext, decide, new_unidentified_rows
from crisp_pipeline.state.store import ABSENCE_SCHEMA

NOW = datetime(2026, 1, 2, 12, tzinfo=UTC)


def departed(*people: tuple[str, str | None]) -> pl.DataFrame:
    """(identifier, origin) per departed person."""
    return pl.DataFrame([{"identifier": i, "people_id": f"pid-{i}", "origin": o}
                         for i, o in people],
                        schema={"identifier": pl.String, "people_id": pl.String,
                                "origin": pl.String})


def context(new_rows=(), absences=None, elsewhere=(), override=False):
    return DepartureContext(
        website_id="w", new_unidentified_rows=list(new_rows),
        absences=absences if absences is not None else pl.DataFrame(schema=ABSENCE_SCHEMA),
        held_elsewhere=frozenset(elsewhere), override_guards=override, now=NOW)


def ops(result) -> dict[str, tuple[str, str | None]]:
    return {row["identifier"]: (row["op"], row["reason"])
            for row in result.decided.to_dicts()}


def rows(*fingerprints: str) -> pl.DataFrame:
    return pl.DataFrame({"row_number": list(range(1, len(fingerprints) + 1)),
                         "fingerprint": list(fingerprints)})


ADA, BOB = ("ada", "created"), ("bob", "created")
POLICY = MirrorPolicy(delete_adopted=True)


def test_a_departure_with_no_ambiguity_is_deleted():
    result = decide(departed(ADA, BOB), POLICY, context())
    assert ops(result) == {"ada": ("delete", None), "bob": ("delete", None)}


def test_a_new_row_naming_nobody_holds_every_departure_and_names_the_row():
    result = decide(departed(ADA, BOB), POLICY, context(new_rows=[7]))
    assert ops(result) == {"ada": ("skip", "departure_held"), "bob": ("skip", "departure_held")}
    assert "source row(s) 7 name nobody" in result.decided.get_column("message")[0]


def test_override_guards_lets_held_departures_go_ahead():
    result = decide(departed(ADA), POLICY, context(new_rows=[4], override=True))
    assert ops(result) == {"ada": ("delete", None)}


def test_rows_naming_nobody_are_new_only_beyond_the_baseline_multiset():
    # the same anonymous rows as last time: nothing new, whatever their order
    assert new_unidentified_rows(rows("a", "b", "b"), rows("b", "a", "b")) == []
    # one more copy of b, and a row never seen: both new
    assert new_unidentified_rows(rows("a", "b", "b", "c"), rows("a", "b")) == [3, 4]
    # one anonymous row left and another appeared (a swap): the newcomer is new
    assert new_unidentified_rows(rows("a", "z"), rows("a", "b")) == [2]
    # no mirror sync has accepted any on this website yet: every one is new
    assert new_unidentified_rows(rows("a", "b"), None) == [1, 2]
    assert new_unidentified_rows(rows(), None) == []


@pytest.mark.parametrize("policy,origin,elsewhere,expected", [
    (MirrorPolicy(), "created", (), ("delete", None)),
    (MirrorPolicy(), "adopted", (), ("release", "adopted")),
    (MirrorPolicy(), None, (), ("release", "adopted")),  # origin unknown: never deleted
    (MirrorPolicy(delete_adopted=True), "adopted", (), ("delete", None)),
    (MirrorPolicy(on_leave="release"), "created", (), ("release", "on_leave_release")),
    (MirrorPolicy(delete_adopted=True), "created", ("pid-ada",),
     ("release", "held_by_other_activation")),
])
def test_who_is_released_instead_of_deleted(policy, origin, elsewhere, expected):
    result = decide(departed(("ada", origin)), policy, context(elsewhere=elsewhere))
    assert ops(result)["ada"] == expected


def test_grace_runs_hold_a_departure_until_the_nth_absent_run():
    policy = MirrorPolicy(grace_runs=2)
    first = decide(departed(ADA), policy, context())
    assert ops(first) == {"ada": ("skip", "grace_period")}
    assert first.absences.to_dicts() == [{"website_id": "w", "identifier": "ada",
                                          "first_absent_at": NOW, "runs": 1}]
    second = decide(departed(ADA), policy, context(absences=first.absences))
    assert ops(second) == {"ada": ("delete", None)}
    assert second.absences["runs"].to_list() == [2]


def test_grace_hours_count_from_the_first_absence():
    policy = MirrorPolicy(grace_hours=6)
    absent = pl.DataFrame([{"website_id": "w", "identifier": "ada",
                            "first_absent_at": NOW - timedelta(hours=5), "runs": 3}],
                          schema=ABSENCE_SCHEMA)
    assert ops(decide(departed(ADA), policy,
                      context(absences=absent)))["ada"][1] == "grace_period"
    absent = absent.with_columns(pl.lit(NOW - timedelta(hours=6)).cast(
        pl.Datetime("us", "UTC")).alias("first_absent_at"))
    assert ops(decide(departed(ADA), policy,
                      context(absences=absent)))["ada"] == ("delete", None)
