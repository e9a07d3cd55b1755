"""What mirror does with the people who left the segment: delete, release, or hold.

A *departed* person is managed on this website and reached by no row of the current source:
neither their identifier nor their email appears in it, accepted or rejected. Each one is
then decided in this order:

1. **Held: someone may still be there.** A row that names nobody (no identifier; keyed by
   email, an invalid email) is still a person, and may be the one who seems to have left. Only
   *new* ambiguity holds deletions, so that rows which never had an identifier do not stall
   mirror forever:
   - the source names nobody in more rows than at the last sync that held nothing: every
     departure is held (any of them may be one of the new rows);
   - otherwise a departure is held only when a row naming nobody carries exactly the
     person's last known values (a row that lost its identifier while another gained one).
   Held departures are skips with reason `departure_held`; they are planned again next run.
   A run that overrides its guards lets them go ahead.
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
    unidentified: pl.DataFrame  # row_number + the JSON text of each managed field
    baseline: int | None  # rows naming nobody at the last sync that held nothing
    absences: pl.DataFrame  # ABSENCE_SCHEMA: who was already absent, since when, how often
    held_elsewhere: frozenset[str]  # departed people_ids another activation holds
    override_guards: bool
    now: datetime


@dataclass(frozen=True)
class Departures:
    decided: pl.DataFrame  # identifier, op (delete|release|skip), reason, message
    absences: pl.DataFrame  # the absences to remember after this run
    held: int  # departures held because someone may still be there


def _value_matches(departed: pl.DataFrame, unidentified: pl.DataFrame,
                   fields: list[str]) -> pl.DataFrame:
    """identifier -> the first row naming nobody that carries exactly their last values."""
    if not fields or unidentified.is_empty() or departed.is_empty():
        return pl.DataFrame(schema={"identifier": pl.String, "row_number": pl.Int64})
    olds = departed.select("identifier", *[pl.col("old:" + f).alias(f) for f in fields])
    known = pl.any_horizontal([pl.col(f).is_not_null() & (pl.col(f) != "null")
                               for f in fields])
    return (olds.filter(known)
            .join(unidentified.select("row_number", *fields), on=fields, how="inner",
                  nulls_equal=True)
            .group_by("identifier").agg(pl.col("row_number").min()))


def decide(departed: pl.DataFrame, fields: list[str], policy: MirrorPolicy,
           context: DepartureContext) -> Departures:
    """`departed`: identifier, people_id, origin and `old:<field>` of each departed person."""
    count = context.unidentified.height
    baseline = count if context.baseline is None else context.baseline
    rows = context.unidentified.get_column("row_number").head(10).cast(pl.String).to_list()
    listed = ", ".join(rows) + (f" and {count - len(rows)} more" if count > len(rows) else "")
    matches = _value_matches(departed, context.unidentified, fields)
    frame = departed.join(matches, on="identifier", how="left")

    previous = context.absences.select("identifier", "first_absent_at", "runs")
    frame = frame.join(previous, on="identifier", how="left").with_columns(
        pl.col("first_absent_at").fill_null(pl.lit(context.now, pl.Datetime("us", "UTC"))),
        (pl.col("runs").fill_null(0) + 1).alias("runs"))
    absent_for = pl.lit(context.now, pl.Datetime("us", "UTC")) - pl.col("first_absent_at")
    due = ((pl.col("runs") >= max(policy.grace_runs, 1))
           & (absent_for >= timedelta(hours=policy.grace_hours)))

    held_by_count = count > baseline and not context.override_guards
    held_by_match = pl.col("row_number").is_not_null() & (not context.override_guards)
    held = pl.lit(held_by_count) | held_by_match
    release_reason = (
        pl.when(pl.col("people_id").is_in(list(context.held_elsewhere)))
        .then(pl.lit(RELEASE_REASONS["other"]))
        .when(pl.lit(policy.on_leave == "release")).then(pl.lit(RELEASE_REASONS["policy"]))
        .when((pl.col("origin").fill_null("adopted") != "created")
              & pl.lit(not policy.delete_adopted)).then(pl.lit(RELEASE_REASONS["adopted"]))
        .otherwise(None))
    held_message = (
        pl.lit(f"{count - baseline} more source row(s) than at the last sync name nobody "
               f"(rows {listed}); this person may be one of them. Fix those rows, or run "
               "with override_guards to go ahead") if held_by_count else
        pl.format("source row {} names nobody but carries this person's last known values; "
                  "fix that row, or run with override_guards to go ahead",
                  pl.col("row_number")))
    decided = frame.select(
        "identifier",
        pl.when(held).then(pl.lit("skip")).when(~due).then(pl.lit("skip"))
        .when(release_reason.is_not_null()).then(pl.lit("release"))
        .otherwise(pl.lit("delete")).alias("op"),
        pl.when(held).then(pl.lit(HELD)).when(~due).then(pl.lit(GRACE))
        .otherwise(release_reason).alias("reason"),
        pl.when(held).then(held_message)
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
        .then(pl.lit("was in Crisp before this activation adopted them and "
                     "mirror.delete_adopted is false: released, kept in Crisp"))
        .otherwise(None).alias("message"),
    )
    absences = frame.select(pl.lit(context.website_id).alias("website_id"), "identifier",
                            "first_absent_at", "runs").cast(ABSENCE_SCHEMA)
    held_count = decided.filter(pl.col("reason") == HELD).height
    return Departures(decided, absences, held_count)
