"""Mirror's departure rule, as a pure function: who is deleted, released or held, and why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from crisp_pipeline.activation import MirrorPolicy
from crisp_pipeline.changes.departures import DepartureContext, decide
from crisp_pipeline.state.store import ABSENCE_SCHEMA

NOW = datetime(2026, 1, 2, 12, tzinfo=UTC)
FIELDS = ["person.nickname", "data.plan"]


def departed(*people: tuple[str, str, str, str]) -> pl.DataFrame:
    """(identifier, origin, nickname JSON, plan JSON) per departed person."""
    return pl.DataFrame(
        [{"identifier": i, "people_id": f"pid-{i}", "origin": o, "old:person.nickname": n,
          "old:data.plan": p} for i, o, n, p in people],
        schema={"identifier": pl.String, "people_id": pl.String, "origin": pl.String,
                "old:person.nickname": pl.String, "old:data.plan": pl.String})


def unidentified(*rows: tuple[int, str | None, str | None]) -> pl.DataFrame:
    return pl.DataFrame([{"row_number": r, "person.nickname": n, "data.plan": p}
                         for r, n, p in rows],
                        schema={"row_number": pl.Int64, "person.nickname": pl.String,
                                "data.plan": pl.String})


def context(rows=(), baseline=None, absences=None, elsewhere=(), override=False):
    return DepartureContext(
        website_id="w", unidentified=unidentified(*rows), baseline=baseline,
        absences=absences if absences is not None else pl.DataFrame(schema=ABSENCE_SCHEMA),
        held_elsewhere=frozenset(elsewhere), override_guards=override, now=NOW)


def ops(result) -> dict[str, tuple[str, str | None]]:
    return {row["identifier"]: (row["op"], row["reason"])
            for row in result.decided.to_dicts()}


ADA = ("ada", "created", '"Ada"', '"pro"')
BOB = ("bob", "created", '"Bob"', '"free"')
POLICY = MirrorPolicy(delete_adopted=True)


def test_a_departure_with_no_ambiguity_is_deleted():
    result = decide(departed(ADA, BOB), FIELDS, POLICY, context(baseline=0))
    assert ops(result) == {"ada": ("delete", None), "bob": ("delete", None)}
    assert result.held == 0


def test_more_rows_naming_nobody_than_before_hold_every_departure():
    result = decide(departed(ADA, BOB), FIELDS, POLICY,
                    context(rows=[(7, '"Someone"', '"x"')], baseline=0))
    assert ops(result) == {"ada": ("skip", "departure_held"), "bob": ("skip", "departure_held")}
    assert result.held == 2
    message = result.decided.get_column("message")[0]
    assert "1 more source row(s)" in message and "rows 7" in message


def test_rows_that_always_named_nobody_do_not_hold_a_real_departure():
    rows = [(1, '"Anon 1"', '"x"'), (2, None, None), (3, '"Anon 3"', '"y"')]
    result = decide(departed(ADA), FIELDS, POLICY, context(rows=rows, baseline=3))
    assert ops(result) == {"ada": ("delete", None)}


def test_a_row_naming_nobody_with_the_persons_last_values_holds_only_them():
    # one row lost its identifier while another was fixed: the count did not grow
    rows = [(4, '"Ada"', '"pro"')]
    result = decide(departed(ADA, BOB), FIELDS, POLICY, context(rows=rows, baseline=1))
    assert ops(result) == {"ada": ("skip", "departure_held"), "bob": ("delete", None)}
    assert "source row 4" in result.decided.filter(pl.col("identifier") == "ada")["message"][0]


def test_all_null_last_values_never_match_a_row_naming_nobody():
    nobody = ("nul", "created", "null", None)
    result = decide(departed(nobody), FIELDS, POLICY,
                    context(rows=[(1, None, None)], baseline=1))
    assert ops(result) == {"nul": ("delete", None)}


def test_override_guards_lets_held_departures_go_ahead():
    result = decide(departed(ADA), FIELDS, POLICY,
                    context(rows=[(4, '"Ada"', '"pro"')], baseline=0, override=True))
    assert ops(result) == {"ada": ("delete", None)} and result.held == 0


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
    person = ("ada", origin, '"Ada"', '"pro"')
    result = decide(departed(person), FIELDS, policy, context(baseline=0, elsewhere=elsewhere))
    assert ops(result)["ada"] == expected


def test_grace_runs_hold_a_departure_until_the_nth_absent_run():
    policy = MirrorPolicy(grace_runs=2)
    first = decide(departed(ADA), FIELDS, policy, context(baseline=0))
    assert ops(first) == {"ada": ("skip", "grace_period")}
    assert first.absences.to_dicts() == [{"website_id": "w", "identifier": "ada",
                                          "first_absent_at": NOW, "runs": 1}]
    second = decide(departed(ADA), FIELDS, policy, context(baseline=0, absences=first.absences))
    assert ops(second) == {"ada": ("delete", None)}
    assert second.absences["runs"].to_list() == [2]


def test_grace_hours_count_from_the_first_absence():
    policy = MirrorPolicy(grace_hours=6)
    absent = pl.DataFrame([{"website_id": "w", "identifier": "ada",
                            "first_absent_at": NOW - timedelta(hours=5), "runs": 3}],
                          schema=ABSENCE_SCHEMA)
    assert ops(decide(departed(ADA), FIELDS, policy,
                      context(baseline=0, absences=absent)))["ada"][1] == "grace_period"
    absent = absent.with_columns(pl.lit(NOW - timedelta(hours=6)).cast(
        pl.Datetime("us", "UTC")).alias("first_absent_at"))
    assert ops(decide(departed(ADA), FIELDS, policy,
                      context(baseline=0, absences=absent)))["ada"] == ("delete", None)
