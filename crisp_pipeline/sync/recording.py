"""Engine batches as the rows the state store records: step outcomes, confirmed snapshot
values, people to forget, and the deletion audit."""

from __future__ import annotations

import polars as pl

from crisp_pipeline.state.store import OUTCOME_SCHEMA, SNAPSHOT_KEYS, now

from .engine import Batch

DELETION_SCHEMA = {"run_id": pl.String, "identifier": pl.String, "people_id": pl.String,
                   "email": pl.String, "deleted_at": pl.Datetime("us", "UTC"),
                   "last_values": pl.String}


def outcome_frames(batch: Batch, run_id: str, fields: list[str]
                   ) -> tuple[pl.DataFrame, pl.DataFrame, list[str], pl.DataFrame]:
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
          "confirmed_at": at, **{f: v for f, v in p.confirmed.items() if f in fields}}
         for p in batch.people
         if p.op in ("create", "update") and p.people_id and p.identifier not in gone
         and p.confirmed],
        schema={**SNAPSHOT_KEYS, **{f: pl.String for f in fields}})
    deletions = pl.DataFrame(
        [{"run_id": run_id, "identifier": p.identifier, "people_id": p.people_id,
          "email": p.email, "deleted_at": at, "last_values": p.old_values}
         for p in batch.people if p.identifier in deleted],
        schema=DELETION_SCHEMA)
    return recorded, confirmed, sorted(deleted | gone), deletions
