"""Engine batches and releases as the rows the state store records: step outcomes, confirmed
snapshot values, people no longer managed, and the deletion audit."""

from __future__ import annotations

import polars as pl

from crisp_pipeline.state.store import DELETION_SCHEMA, OUTCOME_SCHEMA, SNAPSHOT_KEYS, now

from .engine import Batch

Frames = tuple[pl.DataFrame, pl.DataFrame, list[str], pl.DataFrame]


def outcome_frames(batch: Batch, run_id: str, fields: list[str], website_id: str) -> Frames:
    at = now()
    recorded = pl.DataFrame(
        [{"run_id": run_id, "identifier": s.identifier, "people_id": s.people_id, "op": s.op,
          "step": s.step, "status": s.status, "reason": s.reason, "message": s.message,
          "unit": s.unit, "requests": s.requests, "at": at} for s in batch.steps],
        schema=OUTCOME_SCHEMA)
    deleted = {s.identifier for s in batch.steps if s.step == "delete" and s.status == "ok"}
    gone = {p.identifier for p in batch.people if p.status == "gone"}

    def email_of(person) -> str | None:
        if "email" in person.confirmed:
            return person.values.get("email")
        return person.email if person.op == "create" else None

    confirmed = pl.DataFrame(
        [{"identifier": p.identifier, "people_id": p.people_id, "email": email_of(p),
          "confirmed_at": at, "origin": p.origin,
          **{f: v for f, v in p.confirmed.items() if f in fields}}
         for p in batch.people
         if p.op in ("create", "update") and p.people_id and p.identifier not in gone
         and p.confirmed],
        schema={**SNAPSHOT_KEYS, **{f: pl.String for f in fields}})
    deletions = pl.DataFrame(
        [{"run_id": run_id, "website_id": website_id, "identifier": p.identifier,
          "people_id": p.people_id, "email": p.email, "action": "deleted", "reason": None,
          "deleted_at": at, "last_values": p.old_values}
         for p in batch.people if p.identifier in deleted],
        schema=DELETION_SCHEMA)
    return recorded, confirmed, sorted(deleted | gone), deletions


def release_frames(releases: pl.DataFrame, run_id: str, website_id: str) -> Frames:
    """Releases send nothing: the person is forgotten here and the release audited."""
    at = now()
    recorded = releases.select(
        pl.lit(run_id).alias("run_id"), "identifier", "people_id", "op",
        pl.lit("release").alias("step"), pl.lit("ok").alias("status"), "reason", "message",
        pl.lit(None, pl.Int64).alias("unit"), pl.lit(0, pl.Int64).alias("requests"),
        pl.lit(at).alias("at")).cast(OUTCOME_SCHEMA)
    deletions = releases.select(
        pl.lit(run_id).alias("run_id"), pl.lit(website_id).alias("website_id"), "identifier",
        "people_id", "email", pl.lit("released").alias("action"), "reason",
        pl.lit(at).alias("deleted_at"), pl.col("old_values").alias("last_values")
    ).cast(DELETION_SCHEMA)
    empty = pl.DataFrame(schema=SNAPSHOT_KEYS)
    return recorded, empty, releases.get_column("identifier").to_list(), deletions
