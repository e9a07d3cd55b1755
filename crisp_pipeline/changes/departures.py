"""What mirror does with the people who left the segment: delete, release, or hold.

A *departed* person is managed on this website and reached by no row of the current source:
neither their identifier nor their email appears in it, accepted or rejected. Each one is
then decided in this order:

1. **Held: someone may still be there.** A row that names nobody (no identifier; keyed by
   email, an invalid email) is still a person, and may be the one who seems to have left.
   Only *new* ambiguity holds deletions, so that rows which never had an identifier do not
   stall mirror forever: a row naming nobody is *new* when no row naming nobody at the last
   mirror sync that held nothing had exactly the same values in every column the activation
   reads (a multiset; with no such sync yet on the website, every such row is new). While there is a new one, every departure is held
   (any of them may be that row; a row that lost its identifier while another gained one is
   new too). Held departures are skips with reason `departure_held` naming the rows; they are
   planned again next run. A run that overrides its guards lets them go ahead.
2. **Held: grace period.** With `mirror.grace_runs` / `grace_hours`, a person is deleted only
   once absent from that many runs in a row and for that long (reason `grace_period`).
3. **Released, not deleted**, when another activation on the same website still holds the
   person, when the mirror's `on_leave` is `release`, or when the activation adopted them
   (they were in Crisp before it) and `delete_adopted` is false. Releasing forgets the
   person here; Crisp keeps them.
4. Otherwise **deleted**.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from crisp_pipeline.activation import MirrorPolicy
from crisp_pipeline.state.store import ABSENCE_SCHEMA

HELD, GRACE = "departure_held", "grace_period"
RELEASE_REASONS = {"other": "held_by_other_activation", "policy": "on_leave_release",
                   "adopted": "adopted"}


@dataclass(frozen=True)
class DepartureContext:
    """What the state knows beyond the segment and the snapshot."""

    website_id: str
    new_unidentified_rows: list[int]  # rows naming nobody that the last clean sync did not see
    absences: pl.DataFrame  # ABSENCE_SCHEMA: who was already absent, since when, how often
    held_elsewhere: frozenset[str]  # departed people_ids another activation holds
    override_guards: bool
    now: datetime


@dataclass(frozen=True)
class Departures:
    decided: pl.DataFrame  # identifier, op (delete|release|skip), reason, message
    absences: pl.DataFrame  # the absences to remember after this run


def decide(departed: pl.DataFrame, policy: MirrorPolicy,
           context: DepartureContext) -> Departures:
    """`departed`: identifier, people_id and origin of each departed person."""
    new_rows = context.new_unidentified_rows
    listed = ", ".join(str(row) for row in new_rows[:10]) + (
        f" and {len(new_rows) - 10} more" if len(new_rows) > 10 else "")
    frame = departed.join(context.absences.select("identifier", "first_absent_at", "runs"),
                          on="identifier", how="left").with_columns(
        pl.col("first_absent_at").fill_null(pl.lit(context.now, pl.Datetime("us", "UTC"))),
        (pl.col("runs").fill_null(0) + 1).alias("runs"))
    absent_for = pl.lit(context.now, pl.Datetime("us", "UTC")) - pl.col("first_absent_at")
    due = ((pl.col("runs") >= max(policy.grace_runs, 1))
           & (absent_for >= timedelta(hours=policy.grace_hours)))
    held = pl.lit(bool(new_rows) and not context.override_guards)
    release_reason = (
        pl.when(pl.col("people_id").is_in(list(context.held_elsewhere)))
        .then(pl.lit(RELEASE_REASONS["other"]))
        .when(pl.lit(policy.on_leave == "release")).then(pl.lit(RELEASE_REASONS["policy"]))
        .when((pl.col("origin").fill_null("adopted") != "created")
              & pl.lit(not policy.delete_adopted)).then(pl.lit(RELEASE_REASONS["adopted"]))
        .otherwise(None))
    decided = frame.select(
        "identifier",
        pl.when(held | ~due).then(pl.lit("skip"))
        .when(release_reason.is_not_null()).then(pl.lit("release"))
        .otherwise(pl.lit("delete")).alias("op"),
        pl.when(held).then(pl.lit(HELD)).when(~due).then(pl.lit(GRACE))
        .otherwise(release_reason).alias("reason"),
        pl.when(held).then(pl.lit(
            f"source row(s) {listed} name nobody and were not in the source at the last "
            "sync: this person may be one of them. Fix those rows, or run with "
            "override_guards to go ahead"))
        .when(~due).then(pl.format(
            "absent from {} run(s) since {}; mirror deletes after "
            f"{max(policy.grace_runs, 1)} run(s) and {policy.grace_hours:g} hour(s)",
            pl.col("runs"), pl.col("first_absent_at").dt.strftime("%Y-%m-%d %H:%M UTC")))
        .when(release_reason == RELEASE_REASONS["other"])
        .then(pl.lit("another activation on this website still holds this person: released, "
                     "not deleted"))
        .when(release_reason == RELEASE_REASONS["policy"])
        .then(pl.lit("mirror.on_leave is release: no longer managed, kept in Crisp"))
        .when(release_reason == RELEASE_REASONS["adopted"])
        .then(pl.lit("was in Crisp before this activation found them and "
                     "mirror.delete_adopted is false: released, kept in Crisp"))
        .otherwise(None).alias("message"),
    )
    absences = frame.select(pl.lit(context.website_id).alias("website_id"), "identifier",
                            "first_absent_at", "runs").cast(ABSENCE_SCHEMA)
    return Departures(decided, absences)


def new_unidentified_rows(current: pl.DataFrame, baseline: pl.DataFrame | None) -> list[int]:
    """The rows of `current` (row_number, fingerprint) beyond what `baseline` (fingerprint)
    held, counting each fingerprint as often as it occurs (None: no mirror sync has accepted
    any yet, so every row naming nobody is new)."""
    if current.is_empty():
        return []
    if baseline is None:
        return current.get_column("row_number").sort().to_list()
    seen = baseline.group_by("fingerprint").len("seen")
    return (current.sort("row_number")
            .with_columns(pl.int_range(pl.len()).over("fingerprint").alias("nth"))
            .join(seen, on="fingerprint", how="left")
            .filter(pl.col("nth") >= pl.col("seen").fill_null(0))
            .get_column("row_number").sort().to_list())
